"""The digits world's built-in model names (distar.registry.BUILTIN_MODELS): each returns (bundle, multistep).

    digits-teacher   the reference diffusion, multi-step (DDIM with CFG); honours steps / guidance
    digits-onestep   the shipped one-step generator (SIM-distilled from the teacher), loaded for inference only
"""
from __future__ import annotations

import torch

from ...config import DigitsModel
from .bundle import DigitsBundle, build_bundle
from .inference import generator_bundle


def teacher(device: torch.device, weights_dir: str | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[DigitsBundle, bool]:
    return build_bundle(DigitsModel(weights_dir=weights_dir), device), True  # the teacher samples in float32


def onestep(device: torch.device, weights_dir: str | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[DigitsBundle, bool]:
    return generator_bundle(DigitsModel(weights_dir=weights_dir), device, dtype), False
