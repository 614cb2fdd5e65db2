"""The digits world's proxy rewards (trained on the reward split; the gold formula is never used here).

    alignment  r_align(x, c) = log p_clf(digit(c) | x)   small CNN classifier; digit parsed from the prompt text
    boldness   r_bold(x, c)  = f(x)                        small CNN regressor fitted to gold labels of real digits

Both are nn.Modules with forward(images [B, C, H, W] in [0, 1], any size, prompts) -> [B], differentiable in
the images (resizing happens in torch). Prompts that name no single digit get alignment 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import models, text
from .files import weight_file


class AlignmentReward(nn.Module):
    def __init__(self):
        super().__init__()
        self.classifier = models.DigitCNN(10)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"alignment reward: {images.shape[0]} images but {len(prompts)} prompts")
        logp = torch.log_softmax(self.classifier(images), dim=-1)
        digits = torch.tensor([text.parse_digit(p) for p in prompts], device=images.device)
        picked = logp.gather(1, digits.clamp(min=0)[:, None])[:, 0]
        return torch.where(digits >= 0, picked, torch.zeros_like(picked))


class BoldnessReward(nn.Module):
    def __init__(self):
        super().__init__()
        self.regressor = models.DigitCNN(1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.regressor(images)[:, 0]


def build_alignment_reward(path: str | Path | None = None, device: torch.device | str = "cpu") -> AlignmentReward:
    """path: a weights dir or a .safetensors file; None = the shipped weights."""
    m = models.load_weights(AlignmentReward(), weight_file(path, "alignment"))
    return m.to(device).eval().requires_grad_(False)


def build_boldness_reward(path: str | Path | None = None, device: torch.device | str = "cpu") -> BoldnessReward:
    m = models.load_weights(BoldnessReward(), weight_file(path, "boldness"))
    return m.to(device).eval().requires_grad_(False)
