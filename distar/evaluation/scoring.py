"""Scoring cached images with reward models, in process or through the Ray Serve reward deployments.

    --rewards image_reward:/w/ImageReward aesthetic:/w/aesthetic pickscore clip_score:/w/clip

Each reward is scored unweighted (weight 1) and without gradient; the table reports each one's mean raw
output (CLIP score is 100 x cosine, as in the paper's column).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..errors import UserError

# paper column name of each reward, in the paper's column order
DISPLAY = {"image_reward": "ImageReward", "aesthetic": "Aesthetic", "pickscore": "PickScore", "clip_score": "CLIP",
           "hpsv2": "HPSv2"}


def parse_rewards(items: Sequence[str]) -> list[tuple[str, str | None]]:
    """`name[:path]` -> [(name, path)]; an unknown name raises UserError naming --rewards."""
    from ..registry import REWARDS

    out = []
    for it in items:
        name, _, path = it.partition(":")
        if name not in REWARDS:
            raise UserError(f"--rewards {it!r}: unknown reward {name!r}; expected one of {sorted(REWARDS)}")
        if name in [n for n, _ in out]:
            raise UserError(f"--rewards: {name!r} given twice")
        out.append((name, path or None))
    order = list(DISPLAY)
    return sorted(out, key=lambda t: order.index(t[0]) if t[0] in order else len(order))


def reward_config(rewards: list[tuple[str, str | None]]):
    from ..config import RewardConfig, RewardTerm

    return RewardConfig(terms=tuple(RewardTerm(name=n, path=p) for n, p in rewards), backend="serve")


@contextmanager
def reward_client(rewards: list[tuple[str, str | None]], backend: str, device: str = "cpu") -> Iterator:
    """A RewardClient over the rewards: `local` builds them here, `serve` uses (or starts) Serve apps.

    With `serve`, Ray is $RAY_ADDRESS / an initialised session, else a private local cluster that is shut
    down (with the apps this call started) on exit."""
    if backend == "local":
        from ..rewards import build_reward_model
        from ..rewards.base import LocalRewardClient, WeightedReward

        try:
            models = [(n, 1.0, build_reward_model(n, p, device)) for n, p in rewards]
        except (ValueError, FileNotFoundError, OSError) as err:
            raise UserError(f"--rewards: {str(err).splitlines()[0]}") from None
        yield LocalRewardClient(WeightedReward(models).to(device))
        return
    import ray
    from ray import serve

    from ..ray_train import _connect
    from ..remote_reward import RemoteRewardClient

    cfg = reward_config(rewards)
    started_ray = _connect()
    from services.reward_service import app_name, reward_app

    started: list[str] = []
    try:
        serve.start(proxy_location="Disabled")
        running = serve.status().applications
        for term in cfg.terms:
            if app_name(term.name) not in running:
                serve.run(reward_app(term, cfg), name=app_name(term.name), route_prefix=None,
                          logging_config={"log_level": "WARNING"})
                started.append(app_name(term.name))
        yield RemoteRewardClient.from_config(cfg)
    finally:
        for name in started:
            serve.delete(name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()


def score_images(client, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """{reward name: [n] scores} of images [n, C, H, W] in [0, 1], no gradient."""
    out = client.submit(images, list(prompts), with_grad=False).result()
    return {k: v.detach().cpu().double() for k, v in out.parts.items()}
