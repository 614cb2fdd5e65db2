"""One logger tree, `distar.*`: the CLI and the jobs call `setup_logging` once; library modules only
`logging.getLogger(__name__)`. Verbosity: -1 quiet (warnings), 0 normal (info), 1 verbose (debug)."""
from __future__ import annotations

import logging
import sys

LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


def setup_logging(verbosity: int = 0) -> None:
    """Route `distar.*` records to stderr as `[distar] message` (with the module at -v)."""
    level = LEVELS[max(-1, min(1, verbosity))]
    root = logging.getLogger("distar")
    root.setLevel(level)
    root.propagate = False
    fmt = "[%(name)s] %(message)s" if verbosity > 0 else "[distar] %(message)s"
    handler = next((h for h in root.handlers if getattr(h, "_distar", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._distar = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt))
    handler.setLevel(level)
