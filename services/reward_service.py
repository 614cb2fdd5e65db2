"""One reward model as a Ray Serve deployment that returns scores and d score / d image.

    app = reward_app(RewardTerm(name="digits_boldness"), RewardConfig(...))   # one app per reward model
    serve.run(app, name="distar-reward-digits_boldness", route_prefix=None)

Requests carry image tensors (through Ray's object store, never JSON) and prompts; concurrent requests from
several training workers are batched into one forward/backward (`@serve.batch`). Batching is exact: each
score depends on its own image only, so d sum(scores) / d images is the per-image gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
from ray import serve

from distar.config import RewardConfig, RewardTerm
from distar.rewards import build_reward_model
from distar.rewards.base import RewardOutput, WeightedReward

APP_PREFIX = "distar-reward-"
DEPLOYMENT = "RewardModel"


def app_name(term_name: str) -> str:
    return f"{APP_PREFIX}{term_name}"


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=16)
class RewardModel:
    """Scores images [B, C, H, W] in [0, 1] with one unweighted reward model; weights apply in the client."""

    def __init__(self, name: str, path: str | None = None, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.reward = WeightedReward([(name, 1.0, build_reward_model(name, path, self.device))])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _score_many(self, requests: list[tuple[torch.Tensor, list[str], bool]]) -> list[RewardOutput]:
        out: list[RewardOutput | None] = [None] * len(requests)
        for with_grad in (True, False):
            idx = [i for i, r in enumerate(requests) if r[2] == with_grad]
            shapes = {tuple(requests[i][0].shape[1:]) for i in idx}
            if not idx or len(shapes) != 1:  # different image sizes: score one by one
                for i in idx:
                    out[i] = self._score(*requests[i])
                continue
            images = torch.cat([requests[i][0] for i in idx])
            prompts = [p for i in idx for p in requests[i][1]]
            res = self._score(images, prompts, with_grad)
            bounds = torch.tensor([0] + [requests[i][0].shape[0] for i in idx]).cumsum(0).tolist()
            for j, i in enumerate(idx):
                lo, hi = bounds[j], bounds[j + 1]
                out[i] = RewardOutput(total=res.total[lo:hi], grad=None if res.grad is None else res.grad[lo:hi],
                                      parts={k: v[lo:hi] for k, v in res.parts.items()})
        return out

    def _score(self, images: torch.Tensor, prompts: Sequence[str], with_grad: bool) -> RewardOutput:
        res = self.reward.score(images.to(self.device), list(prompts), with_grad=with_grad)
        return RewardOutput(total=res.total.cpu(), grad=None if res.grad is None else res.grad.cpu(),
                            parts={k: v.cpu() for k, v in res.parts.items()})

    async def score(self, images: torch.Tensor, prompts: list[str], with_grad: bool = True) -> RewardOutput:
        return await self._score_many((images, list(prompts), bool(with_grad)))


def reward_app(term: RewardTerm, reward_cfg: RewardConfig, device: str = "auto"):
    """The Serve application of one reward term, sized from `reward_cfg` (replicas, CPUs, GPUs, autoscaling)."""
    opts: dict = {"ray_actor_options": {"num_cpus": reward_cfg.replica_cpus, "num_gpus": reward_cfg.replica_gpus}}
    if reward_cfg.max_replicas is not None and reward_cfg.max_replicas > reward_cfg.num_replicas:
        opts["autoscaling_config"] = {"min_replicas": reward_cfg.num_replicas, "max_replicas": reward_cfg.max_replicas,
                                      "initial_replicas": reward_cfg.num_replicas, "target_ongoing_requests": 2}
    else:
        opts["num_replicas"] = reward_cfg.num_replicas
    return RewardModel.options(**opts).bind(term.name, term.path, device)


def build_app(args: dict):
    """Entry for `serve run` / `serve deploy` configs (deploy/rewards.yaml): args = {name, path?, device?}."""
    return RewardModel.bind(args["name"], args.get("path"), args.get("device", "auto"))
