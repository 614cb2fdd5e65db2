"""The reward interface: images in [0, 1] and prompts in, one differentiable score per image out.

Every reward model (ImageReward, PickScore, CLIP score, aesthetic, the digits world's proxies, the 2-D
world's region reward) is an `nn.Module` whose `forward(images, prompts) -> [B]` is differentiable in
`images` ([B, C, H, W], any resolution; resizing and normalisation happen inside, in torch).

`WeightedReward` sums several with weights and returns `(total, d total / d images, parts)`; that triple is
what crosses process boundaries (Ray Serve), so the trainer only needs `reward_surrogate_loss(img, grad)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import nn


@dataclass
class RewardOutput:
    total: torch.Tensor                    # [B], weighted sum of the parts
    grad: torch.Tensor | None              # [B, C, H, W], d total / d images (None when not asked for)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B], unweighted


class PendingReward(Protocol):
    def result(self) -> RewardOutput: ...


class RewardClient(Protocol):
    """Where the training step sends images to be scored; `submit` may return before scoring finishes."""

    def submit(self, images: torch.Tensor, prompts: Sequence[str], with_grad: bool = True) -> PendingReward: ...


class WeightedReward(nn.Module):
    """sum_i w_i r_i(images, prompts), frozen, with per-term scores kept for logging."""

    def __init__(self, terms: Sequence[tuple[str, float, nn.Module]]):
        super().__init__()
        if not terms:
            raise ValueError("WeightedReward needs at least one (name, weight, model) term")
        self.names = [n for n, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.models = nn.ModuleList([m for _, _, m in terms])
        self.requires_grad_(False)
        self.eval()

    def score(self, images: torch.Tensor, prompts: Sequence[str], with_grad: bool = True) -> RewardOutput:
        if images.dim() < 2:
            raise ValueError(f"reward images: expected [B, C, H, W] in [0, 1] (or [B, D] points), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward: {images.shape[0]} images but {len(prompts)} prompts")
        x = images.detach().requires_grad_(with_grad)
        with torch.enable_grad() if with_grad else torch.no_grad():
            parts = {n: m(x, list(prompts)).float() for n, m in zip(self.names, self.models)}
            total = sum(w * parts[n] for n, w in zip(self.names, self.weights))
            grad = torch.autograd.grad(total.sum(), x)[0].detach() if with_grad else None
        return RewardOutput(total=total.detach(), grad=grad, parts={k: v.detach() for k, v in parts.items()})


@dataclass
class _Done:
    out: RewardOutput

    def result(self) -> RewardOutput:
        return self.out


class LocalRewardClient:
    """Scores in this process by autograd through the reward models (the reference for remote scoring)."""

    def __init__(self, reward: WeightedReward):
        self.reward = reward

    def submit(self, images: torch.Tensor, prompts: Sequence[str], with_grad: bool = True) -> _Done:
        dev = next(self.reward.parameters(), torch.empty(0)).device
        out = self.reward.score(images.to(dev), prompts, with_grad=with_grad)
        if out.grad is not None:
            out.grad = out.grad.to(images.device)
        return _Done(out)


class CallableRewardClient:
    """Adapts any `fn(images, prompts) -> (reward [B], d reward / d images)` (a remote service, a custom
    scorer) to the RewardClient interface the training step uses."""

    def __init__(self, fn):
        self.fn = fn

    def submit(self, images: torch.Tensor, prompts: Sequence[str], with_grad: bool = True) -> _Done:
        reward, grad = self.fn(images, list(prompts))
        if with_grad and (grad is None or grad.shape != images.shape):
            raise ValueError(f"reward callable returned grad of shape {None if grad is None else tuple(grad.shape)}, "
                             f"expected {tuple(images.shape)}")
        return _Done(RewardOutput(total=reward.detach(), grad=None if grad is None else grad.detach(),
                                  parts={"reward": reward.detach()}))
