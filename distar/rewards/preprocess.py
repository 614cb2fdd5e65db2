"""Differentiable torch versions of the CLIP-family image preprocessing (pure torch).

PIL pipelines (`Resize(n, BICUBIC)`, `CenterCrop(n)`, `Normalize(mean, std)`) cut the autograd graph; these do
the same in torch on images in [0, 1] of any resolution, so a reward's gradient reaches the pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged (tests check gradients in float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def check_images(images: torch.Tensor, prompts, who: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"{who}: {images.shape[0]} images but {len(prompts)} prompts")


def resize_shortest_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size` (bicubic, antialiased like PIL), then center-crop to size x size.

    images: [B, C, H, W] -> [B, C, size, size].
    """
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        # torchvision's integer arithmetic for Resize(size) and CenterCrop(size), so crops line up with PIL's
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        images = images[..., top:top + size, left:left + size]
    return images


def normalize(images: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(images: torch.Tensor, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP input [B, 3, size, size] (resize shortest side, center crop, normalise)."""
    return normalize(resize_shortest_center_crop(upcast(images), size), mean, std)
