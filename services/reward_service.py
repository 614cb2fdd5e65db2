"""One reward model as a Ray Serve deployment that returns scores and d score / d image.

    app = reward_app(RewardTerm(name="digits_boldness"), RewardConfig(...))   # one app per reward model
    serve.run(app, name="distar-reward-digits_boldness", route_prefix=None)

Requests carry image tensors (through Ray's object store, never JSON) and prompts; concurrent requests from
several training workers are batched into one forward/backward (`@serve.batch`). Batching is exact: each
score depends on its own image only, so d sum(scores) / d images is the per-image gradient.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from ray import serve

from distar.config import RewardConfig, RewardTerm
from distar.device import pick_device
from distar.remote_reward import DEPLOYMENT, RemoteRewardClient
from distar.remote_reward import reward_app_name as app_name
from distar.rewards import build_reward_model
from distar.rewards.base import RewardOutput, WeightedReward

log = logging.getLogger("distar.services.reward_service")


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=16)
class RewardModel:
    """Scores images [B, C, H, W] in [0, 1] with one unweighted reward model; weights apply in the client."""

    def __init__(self, name: str, path: str | None = None, device: str = "auto"):
        self.device = pick_device(device)
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


def deploy_rewards(reward_cfg: RewardConfig) -> list[str]:
    """The one deploy of the reward apps (training and eval): one Serve application per reward term,
    reusing any already running; returns the names of those it started."""
    serve.start(proxy_location="Disabled")
    running = serve.status().applications
    started = []
    for term in reward_cfg.terms:
        name = app_name(term.name)
        if name in running and str(running[name].status).endswith("RUNNING"):
            log.info("reward %r: using the running Serve app %r", term.name, name)
            continue
        serve.run(reward_app(term, reward_cfg), name=name, route_prefix=None, logging_config={"log_level": "WARNING"})
        started.append(name)
    return started


@contextmanager
def serve_reward_client(rewards: list[tuple[str, str | None]]) -> Iterator[RemoteRewardClient]:
    """A RewardClient over Serve deployments of `rewards` [(name, path)], each unweighted (evaluation).

    Ray is $RAY_ADDRESS / an initialised session, else a private local cluster; on exit the apps this
    call started are deleted, and a cluster it started is shut down."""
    import ray

    from distar.ray_train import connect

    cfg = RewardConfig(terms=tuple(RewardTerm(name=n, path=p) for n, p in rewards), backend="serve")
    started_ray = connect()
    started: list[str] = []
    try:
        started = deploy_rewards(cfg)
        yield RemoteRewardClient.from_config(cfg)
    finally:
        for name in started:
            serve.delete(name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
