"""Scoring cached images with reward models (in process here; through Ray Serve via services/).

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


@contextmanager
def local_reward_client(rewards: list[tuple[str, str | None]], device: str = "cpu") -> Iterator:
    """A RewardClient that builds the rewards here (the Serve counterpart is
    services.reward_service.serve_reward_client, which the command layer picks)."""
    from ..rewards import build_reward_model
    from ..rewards.base import LocalRewardClient, WeightedReward

    try:
        models = [(n, 1.0, build_reward_model(n, p, device)) for n, p in rewards]
    except (ValueError, FileNotFoundError, OSError) as err:
        raise UserError(f"--rewards: {str(err).splitlines()[0]}") from None
    yield LocalRewardClient(WeightedReward(models).to(device))


def score_images(client, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """{reward name: [n] scores} of images [n, C, H, W] in [0, 1], no gradient."""
    out = client.submit(images, list(prompts), with_grad=False).result()
    return {k: v.detach().cpu().double() for k, v in out.parts.items()}
