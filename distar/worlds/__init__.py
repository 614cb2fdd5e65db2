"""Worlds: model bundles (reference, fake score, generator, decoder, prompts) at every scale."""
from __future__ import annotations

import torch

from ..bundle import ModelBundle
from ..registry import WORLDS, resolve


def build_bundle(model_cfg, device: torch.device | str = "cpu") -> ModelBundle:
    """The bundle for `model_cfg.world` (one of distar.registry.WORLDS), on `device`."""
    return resolve(WORLDS, model_cfg.world, "world")(model_cfg, torch.device(device))
