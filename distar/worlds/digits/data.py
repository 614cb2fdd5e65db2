"""scikit-learn's handwritten digits (1,797 images, 8x8, ten classes) at 16x16, in fixed seeded splits.

Images are floats in [0, 1] with ink = 1 and blank = 0, shape [N, 1, 16, 16] (bilinear upsampling of the
8x8 originals, whose values 0..16 are divided by 16). Three disjoint splits, fixed by `SPLIT_SEED`:
    teacher  - trains the reference diffusion (and its text encoder)
    reward   - trains the proxy rewards (alignment classifier, boldness regressor)
    heldout  - trains the judges and is the real set Frechet distances are measured against
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import text

SIZE = 16
SPLIT_SEED = 20241028
SPLIT_SIZES = {"teacher": 900, "reward": 450, "heldout": 447}  # sums to 1,797


def to_16(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] (any size, 1 or 3 channels) in [0, 1] -> [N, 1, 16, 16], differentiable (used by every model)."""
    if images.dim() != 4:
        raise ValueError(f"digit images: expected [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] == 3:
        images = images.mean(dim=1, keepdim=True)
    elif images.shape[1] != 1:
        raise ValueError(f"digit images: expected 1 or 3 channels, got {images.shape[1]}")
    if images.shape[-2:] != (SIZE, SIZE):
        images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False,
                               antialias=images.shape[-1] > SIZE)
    return images


@functools.lru_cache(maxsize=1)
def _all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x, torch.tensor(d.target, dtype=torch.long)


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 16, 16] in [0, 1], labels [N]) of split `name` (teacher | reward | heldout)."""
    if name not in SPLIT_SIZES:
        raise ValueError(f"digits split {name!r}: expected one of {sorted(SPLIT_SIZES)}")
    x, y = _all()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    start = 0
    for k, n in SPLIT_SIZES.items():
        if k == name:
            idx = perm[start:start + n]
            return x[idx].clone(), y[idx].clone()
        start += n
    raise AssertionError


def gold_boldness(images: torch.Tensor) -> torch.Tensor:
    """The simulated human preference: mean ink intensity per image [B] (images in [0, 1], ink = 1).

    Only ever used as labels on real images (to fit the proxy) and as a judge; never as a training signal."""
    return to_16(images).clamp(0.0, 1.0).flatten(1).mean(dim=1)


def random_prompts(labels: torch.Tensor, rng: torch.Generator) -> list[str]:
    """One prompt per label, a template drawn at random (text, not the label)."""
    idx = torch.randint(0, len(text.TEMPLATES), (labels.shape[0],), generator=rng).tolist()
    return [text.prompts_for_class(int(k))[i] for k, i in zip(labels.tolist(), idx)]
