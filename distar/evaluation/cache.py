"""The generation cache: one PNG per (model, prompt index, image index), so evaluation is resumable.

    OUT/images/<label>/p00012_0.png     image 0 of prompt 12
    OUT/images/<label>/meta.json        spec, settings, seed, prompts, generation seconds per prompt index

Scoring always reads the PNGs back (8-bit, as any image a user would see), so a fresh run and a resumed one
score identical pixels. A cache written with other settings (spec, steps, seed, prompt text) is refused
rather than silently mixed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..images import read_png, save_png


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@=+-]+", "_", label).strip("_") or "model"


class GenerationCache:
    def __init__(self, root: Path, label: str, identity: dict):
        self.dir = Path(root) / "images" / slug(label)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta_path = self.dir / "meta.json"
        self.identity = json.loads(json.dumps(identity, default=str))
        self.meta = {"identity": self.identity, "prompts": {}, "seconds": {}}
        if self.meta_path.is_file():
            old = json.loads(self.meta_path.read_text())
            if old.get("identity") != self.identity:
                raise UserError(f"--out {str(root)!r}: the cached images of {label!r} were made with "
                                f"{old.get('identity')}, not {self.identity}; use another --out or delete {self.dir}")
            self.meta = old

    def path(self, i: int, j: int) -> Path:
        return self.dir / f"p{i:05d}_{j}.png"

    def missing(self, indices: list[int], prompts: list[str], n_images: int) -> list[int]:
        """Prompt indices with any image missing; raises if a cached index was made for another prompt."""
        out = []
        for i, p in zip(indices, prompts):
            old = self.meta["prompts"].get(str(i))
            if old is not None and old != p:
                raise UserError(f"--prompts: prompt {i} is now {p!r} but {self.dir} holds images of {old!r}; "
                                f"use another --out")
            if old is None or not all(self.path(i, j).is_file() for j in range(n_images)):
                out.append(i)
        return out

    def put(self, i: int, prompt: str, images: torch.Tensor, seconds: float) -> None:
        """Images [n_images, C, H, W] of prompt i and the generation seconds they took."""
        for j, im in enumerate(images):
            save_png(im, self.path(i, j))
        self.meta["prompts"][str(i)] = prompt
        self.meta["seconds"][str(i)] = seconds

    def flush(self) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1))
        tmp.replace(self.meta_path)

    def load(self, i: int, j: int) -> torch.Tensor:
        """[C, H, W] float in [0, 1]."""
        return read_png(self.path(i, j))

    def seconds_per_image(self, indices: list[int], n_images: int) -> float:
        secs = [self.meta["seconds"][str(i)] for i in indices if str(i) in self.meta["seconds"]]
        return float(sum(secs) / (len(secs) * n_images)) if secs else float("nan")
