"""Exponential moving average of a module's trainable parameters (the generator that gets exported).

Only parameters with requires_grad are averaged, so LoRA training keeps a shadow of the adapters alone
rather than a float32 copy of a frozen 2.6B-parameter base.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, in float32, after each generator update."""

    def __init__(self, net: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in net.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for k, p in net.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, net: nn.Module) -> nn.Module:
        """Write the averaged weights into `net`'s parameters (cast to their dtypes)."""
        params = dict(net.named_parameters())
        missing = [k for k in self.shadow if k not in params]
        if missing:
            raise KeyError(f"EMA.copy_to: module lacks averaged parameters {missing[:3]}...")
        for k, s in self.shadow.items():
            params[k].copy_(s.to(device=params[k].device, dtype=params[k].dtype))
        return net

    def averaged(self, net: nn.Module) -> nn.Module:
        """A deep copy of `net` carrying the averaged weights."""
        return self.copy_to(copy.deepcopy(net))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
