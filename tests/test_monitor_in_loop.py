"""The reward-hacking monitor acting inside the real training loop (2-D world): reward-only training hacks
(the trained reward climbs while the held-out energy distance to the reference grows) and is stopped, with
the best evaluation's generator kept as final/; a healthy DI* run with the same rule runs to the end."""
import json

import pytest
import torch

from distar.checkpoint import load_generator_state
from distar.config import load_config
from distar.train_loop import run_training

MONITOR = ("train.monitor={held_out: eval/energy_distance, mode: min, trained: reward/total, tolerance: 0.25, "
           "patience: 2, action: keep_best}")


def _run(tmp_path, name, *overrides):
    torch.set_num_threads(1)
    cfg = load_config("gaussian2d", [f"train.out_dir={tmp_path / name}", "train.steps=300", "train.log_every=25",
                                     "train.fake_warmup_steps=50", "reward.terms=[{name: region}]", MONITOR,
                                     *overrides])
    return run_training(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor")
    hacked = _run(tmp, "reward_only", "loss.divergence=none", "loss.alpha_rew=0.3")
    healthy = _run(tmp, "di_star", "loss.alpha_rew=0.1")
    return tmp, hacked, healthy


def test_reward_only_run_is_stopped_and_keeps_its_best_generator(runs):
    tmp, hacked, _ = runs
    h = hacked.history
    assert h[-1]["step"] < 300, [m["step"] for m in h]                 # stopped early
    best = min(h, key=lambda m: m["eval/energy_distance"])
    assert h[-1]["eval/energy_distance"] > 1.25 * best["eval/energy_distance"]
    assert h[-1]["reward/total"] > best["reward/total"]                 # ...while the trained reward climbed
    final, kept = load_generator_state(tmp / "reward_only" / "final"), load_generator_state(tmp / "reward_only" / "best")
    assert all(torch.equal(final[k], kept[k]) for k in final)
    meta = json.loads((tmp / "reward_only" / "final" / "meta.json").read_text())
    assert meta["step"] == best["step"]


def test_healthy_di_star_run_is_not_stopped(runs):
    _, _, healthy = runs
    assert healthy.history[-1]["step"] == 300
    assert healthy.history[-1]["eval/energy_distance"] < healthy.history[0]["eval/energy_distance"]
