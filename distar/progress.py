"""Progress bars (tqdm) for long loops: fake warm-up, in-process training, evaluation, the digits rebuild.

Bars go to stderr and stay off when `distar` logging is quieter than INFO (`--quiet`) or `enabled=False`
(e.g. inside Ray workers, whose output the driver would interleave)."""
from __future__ import annotations

import logging
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    return logging.getLogger("distar").getEffectiveLevel() <= logging.INFO


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True, **kwargs) -> Iterable[T]:
    """`iterable` wrapped in a tqdm bar when enabled, else returned as is."""
    if not (enabled and progress_enabled()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=1.0, **kwargs)
