"""A reward replica SIGKILLed from outside while training scores through it: Serve replaces the replica, the
client sends the lost requests again, the run finishes every step, and the log (and `reward/service_retries`
in metrics.jsonl) says how many requests were retried."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from distar.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.timeout(300),
              pytest.mark.usefixtures("serve_module")]

STEPS, EVERY = 120, 10


def _kill_reward_replica_after_first_log(metrics: Path, timeout_s: float = 180.0) -> dict:
    """SIGKILL this test cluster's replica of the `region` reward once training has logged a step."""
    import psutil

    t0 = time.monotonic()
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() - t0 < timeout_s:
        time.sleep(0.05)
    step = json.loads(metrics.read_text().splitlines()[0])["step"] if metrics.is_file() else None
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("ServeReplica:distar-reward-region" in part for part in proc.cmdline()):
                os.kill(proc.pid, signal.SIGKILL)
                return {"killed": proc.pid, "after_step": step}
        except psutil.NoSuchProcess:
            continue
    return {"after_step": step}


def test_training_survives_a_killed_reward_replica(ray_cluster, tmp_path):
    from distar.ray_train import run_on_ray
    from services.reward_service import deploy_rewards

    cfg = load_config("gaussian2d", [
        "name=replica_kill", f"train.steps={STEPS}", "train.batch_size=64", "model.hidden=32",
        "train.fake_warmup_steps=10", f"train.log_every={EVERY}", f"train.out_dir={tmp_path / 'run'}",
        f"ray.storage_path={tmp_path / 'ray_results'}", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
        "train.device=cpu", "train.threads=1", "loss.alpha_rew=0.2", "reward.terms=[{name: region}]",
        "reward.backend=serve", "reward.timeout_s=10", "reward.retries=3"])
    killed: dict = {}
    killer = threading.Thread(target=lambda: killed.update(
        _kill_reward_replica_after_first_log(tmp_path / "run" / "metrics.jsonl")))
    killer.start()
    summary = run_on_ray(cfg, deploy_rewards=deploy_rewards)
    killer.join()
    assert killed.get("killed"), f"no reward replica process was found to kill: {killed}"
    assert killed["after_step"] is not None and killed["after_step"] < STEPS, killed
    assert summary["step"] == STEPS
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(EVERY, STEPS + 1, EVERY))
    assert all("reward/service_retries" in h for h in history)
    assert all(h["reward/region"] > 0 for h in history)      # every logged step was scored by a live replica
    retried = history[-1]["reward/service_retries"]
    print(f"replica killed after step {killed['after_step']}; requests retried: {retried:g}")
