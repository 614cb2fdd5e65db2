"""DI* on Ray Train with ray.strategy=fsdp: two CPU workers (gloo) shard generator and fake score with FSDP2,
train the 2-D world as well as DDP does, write sharded checkpoints (each rank its own shards), log image
grids from a collective forward, and resume on a re-run with the same run name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distar.checkpoint import StateIO, load_generator_state
from distar.config import load_config
from distar.train_loop import LoopHooks, build_state
from distar.worlds.gaussian2d import Generator2D

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def _cfg(tmp: Path, *extra: str):
    return load_config("gaussian2d", [
        "name=fsdp", "train.steps=60", "train.batch_size=128", "train.fake_warmup_steps=20", "train.log_every=15",
        "train.checkpoint_every=30", f"train.out_dir={tmp / 'fsdp'}", f"ray.storage_path={tmp / 'ray_results'}",
        "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.strategy=fsdp", "train.device=cpu",
        "model.init=narrow", "loss.alpha_rew=0.2", "reward.terms=[{name: region}]", *extra])


def test_two_worker_fsdp_trains_checkpoints_full_state_and_resumes(ray_cluster, tmp_path):
    from mlflow import MlflowClient

    from distar.ray_train import run_on_ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_on_ray(_cfg(tmp_path, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}", "train.sample_every=30"))
    assert summary["strategy"] == "fsdp" and summary["step"] == 60 and summary["resumed_from_step"] == -1
    history = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [15, 30, 45, 60]
    # the bar the DDP test sets: the EMA generator approaches the reference mixture from the narrow start
    assert history[-1]["eval/energy_distance"] < 0.7 * history[0]["eval/energy_distance"], history
    assert all(h["reward/region"] > 0 and h["gen/grad_norm"] > 0 for h in history)

    ckpt = Path(summary["checkpoint"])  # Ray's copy of the step-60 checkpoint: sharded, each rank wrote its own
    assert sorted(p.name for p in (ckpt / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "train_state.pt").exists() and not (ckpt / "generator.safetensors").exists()
    state = build_state(_cfg(tmp_path), torch.device("cpu"), LoopHooks())
    StateIO().load(state, ckpt)       # into one process: full tensors with the unsharded shapes
    assert state.step == 60
    exported = load_generator_state(summary["final_dir"])
    Generator2D(128).load_state_dict(exported)
    assert all(torch.equal(exported[k], state.ema.shadow[k]) for k in exported)  # final/ is the EMA generator
    client = MlflowClient(uri)
    arts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "images")}
    assert {"images/step_0000030.png", "images/step_0000060.png"} <= arts   # grids from a collective forward

    summary = run_on_ray(_cfg(tmp_path, "train.steps=75", "train.checkpoint_every=15"))
    assert summary["step"] == 75 and summary["resumed_from_step"] == 60
    history = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 75
    assert history[-1]["eval/energy_distance"] < 0.7 * history[0]["eval/energy_distance"], history
