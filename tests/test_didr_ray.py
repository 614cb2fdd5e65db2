"""DIDR (loss.reward_mode=diffused) on the cluster path: two Ray Train workers sharding generator and fake score
with FSDP2, the reward on its Ray Serve deployment scoring the proxy's denoised images (with gradient), as DI*'s
x0 reward does. The 2-D world, where the region reward is analytic."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distar.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def test_didr_trains_on_fsdp_workers_with_the_reward_on_serve(ray_cluster, tmp_path: Path):
    from distar.ray_train import run_on_ray
    from services.reward_service import deploy_rewards

    cfg = load_config("gaussian2d", [
        "name=didr", "train.steps=20", "train.batch_size=64", "train.fake_warmup_steps=5", "train.log_every=10",
        "train.checkpoint_every=20", f"train.out_dir={tmp_path / 'didr'}", f"ray.storage_path={tmp_path / 'ray'}",
        "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.strategy=fsdp", "train.device=cpu", "model.init=narrow",
        "loss.divergence=kl", "loss.weighting=uniform", "loss.reward_mode=diffused", "loss.drp_steps=2",
        "loss.alpha_rew=0.5", "reward.terms=[{name: region}]", "reward.backend=serve"])
    summary = run_on_ray(cfg, deploy_rewards=deploy_rewards)
    assert summary["strategy"] == "fsdp" and summary["step"] == 20
    history = [json.loads(line) for line in (tmp_path / "didr" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [10, 20]
    for h in history:
        assert h["reward/beta"] == 2.0                       # beta = 1 / alpha_rew
        assert h["reward/service_retries"] == 0              # the proxy's reward came through the Serve client
        assert h["reward/drp_score_norm"] > 0 and math.isfinite(h["reward/drp_region"])
        assert "reward/total" not in h                       # no x0 reward term in diffused mode
    assert (Path(summary["final_dir"]) / "generator.safetensors").is_file()
