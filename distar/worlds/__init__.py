"""Worlds: model bundles (reference, fake score, generator, decoder, prompts) at every scale."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..bundle import ModelBundle
from ..registry import SHARDED_WORLDS, WORLDS, resolve


def build_bundle(model_cfg, device: torch.device | str = "cpu") -> ModelBundle:
    """The bundle for `model_cfg.world` (one of distar.registry.WORLDS), on `device`."""
    return resolve(WORLDS, model_cfg.world, "world")(model_cfg, torch.device(device))


def build_sharded_bundle(model_cfg, device: torch.device | str, shard: Callable[[nn.Module], nn.Module]) -> ModelBundle:
    """The bundle with its big networks built already sharded by `shard` where the world can (SHARDED_WORLDS:
    SD1.5 / SDXL), else `build_bundle` (whose modules the FSDP hooks then shard after the fact)."""
    if model_cfg.world in SHARDED_WORLDS:
        return resolve(SHARDED_WORLDS, model_cfg.world, "world")(model_cfg, torch.device(device), shard)
    return build_bundle(model_cfg, device)
