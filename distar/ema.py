"""Exponential moving average of a module's parameters (the generator that gets exported)."""
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
        self.shadow = {k: v.detach().float().clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for k, v in net.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)
            else:
                s.copy_(v)

    def copy_to(self, net: nn.Module) -> nn.Module:
        """Load the averaged weights into `net` (cast to its dtypes)."""
        sd = net.state_dict()
        net.load_state_dict({k: self.shadow[k].to(dtype=sd[k].dtype) for k in sd})
        return net

    def averaged(self, net: nn.Module) -> nn.Module:
        """A deep copy of `net` carrying the averaged weights."""
        return self.copy_to(copy.deepcopy(net))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
