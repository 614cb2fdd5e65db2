"""Differentiable reward models behind one interface (see base.py) and their weighted sum."""
from __future__ import annotations

import torch

from ..registry import REWARDS, resolve
from .base import LocalRewardClient, RewardOutput, WeightedReward


def build_reward_model(name: str, path: str | None = None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """One reward model by registry name (distar.registry.REWARDS), frozen, on `device`."""
    model = resolve(REWARDS, name, "reward").__call__(path, torch.device(device))
    return model.requires_grad_(False).eval()


def build_weighted_reward(reward_cfg, device: torch.device | str = "cpu") -> WeightedReward:
    """The weighted sum of `reward_cfg.terms` (a distar.config.RewardConfig)."""
    terms = [(t.name, t.weight, build_reward_model(t.name, t.path, device)) for t in reward_cfg.terms]
    return WeightedReward(terms).to(device)


__all__ = ["REWARDS", "RewardOutput", "WeightedReward", "LocalRewardClient", "build_reward_model",
           "build_weighted_reward"]
