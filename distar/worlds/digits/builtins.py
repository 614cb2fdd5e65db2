"""The digits world's built-in model names (distar.registry.BUILTIN_MODELS): each returns (bundle, multistep).

    digits-teacher   the reference diffusion, multi-step (DDIM with CFG); honours steps / guidance
    digits-onestep   the shipped one-step generator (SIM-distilled from the teacher)
"""
from __future__ import annotations

import torch

from ...config import DigitsModel
from .bundle import DigitsBundle, build_bundle


def teacher(device: torch.device, weights_dir: str | None = None) -> tuple[DigitsBundle, bool]:
    return build_bundle(DigitsModel(weights_dir=weights_dir), device), True


def onestep(device: torch.device, weights_dir: str | None = None) -> tuple[DigitsBundle, bool]:
    return build_bundle(DigitsModel(weights_dir=weights_dir), device), False
