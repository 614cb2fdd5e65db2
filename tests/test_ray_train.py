"""DI* on Ray Train: a 2-worker DDP run (rewards on Serve, MLflow on) that trains and checkpoints, and resumes on a
re-run with the same run name. Uses the 2-D world (seconds/step). A worker killed from outside (SIGKILL) and
resumed by Ray: tests/faults/test_ray_worker_kill.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distar.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240), pytest.mark.usefixtures("serve_module")]


def _cfg(tmp: Path, name: str, *extra: str):
    return load_config("gaussian2d", [
        f"name={name}", "train.steps=60", "train.batch_size=128", "train.fake_warmup_steps=20", "train.log_every=15",
        "train.checkpoint_every=30", f"train.out_dir={tmp / name}", f"ray.storage_path={tmp / 'ray_results'}",
        "ray.num_workers=2", "ray.cpus_per_worker=0.5", "train.device=cpu", "model.init=narrow", *extra])


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, tmp_path_factory):
    from distar.ray_train import run_on_ray

    tmp = tmp_path_factory.mktemp("ddp")
    cfg = _cfg(tmp, "ddp", "loss.alpha_rew=0.2", "reward.terms=[{name: region}]", "reward.backend=serve",
               "mlflow.enabled=true", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
               "mlflow.registered_model=g2d-test", "mlflow.alias=champion", "train.sample_every=30")
    from services.reward_service import deploy_rewards

    return tmp, cfg, run_on_ray(cfg, deploy_rewards=deploy_rewards)


def test_two_worker_ddp_reduces_loss_and_checkpoints(ddp_run):
    tmp, cfg, summary = ddp_run
    assert summary["workers"] == 2 and summary["step"] == 60 and summary["resumed_from_step"] == -1
    history = [json.loads(line) for line in (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [15, 30, 45, 60]
    # from the narrow start the generator approaches the reference mixture (the quantity DI* minimises)
    assert history[-1]["eval/energy_distance"] < 0.7 * history[0]["eval/energy_distance"], history
    assert all(h["reward/region"] > 0 for h in history)                       # scored by the Serve deployment
    ckpt = Path(summary["checkpoint"])                                        # persisted by ray.train.report
    assert ckpt.parent == tmp / "ray_results" / "ddp"
    state = torch.load(ckpt / "train_state.pt", weights_only=False)
    assert state["step"] == 60
    assert {"generator", "fake_score", "generator_opt", "fake_opt", "ema"} <= set(state)
    assert (ckpt / "generator.safetensors").is_file() and (ckpt / "config.yaml").is_file()
    assert (Path(summary["final_dir"]) / "generator.safetensors").is_file()
    assert not list((tmp / "ddp" / "checkpoints").glob(".*tmp*"))            # atomic writes left no debris


def test_mlflow_run_metrics_and_registered_version(ddp_run):
    from mlflow import MlflowClient

    tmp, cfg, summary = ddp_run
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.alpha_rew"] == "0.2" and run.data.params["ray.num_workers"] == "2"
    for key in ("gen/loss", "fake/loss", "reward/region", "gen/grad_norm", "reward/grad_norm", "perf/images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [15, 30, 45, 60], key
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert {"images/step_0000030.png", "images/step_0000060.png"} <= arts
    mv = client.get_model_version_by_alias("g2d-test", "champion")
    assert str(mv.version) == summary["version"] and mv.run_id == run.info.run_id
    assert summary["model_uri"] == "models:/g2d-test@champion"

    from distar.checkpoint import load_generator_state
    from distar.model_registry import resolve_registry_uri

    local = resolve_registry_uri("models:/g2d-test@champion", tracking_uri=uri)
    got, want = load_generator_state(local), load_generator_state(summary["final_dir"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)  # the EMA generator
    assert not (local / "train_state.pt").exists()


def test_rerun_with_the_same_run_name_resumes_from_the_newest_checkpoint(ddp_run, tmp_path):
    """A second `run_on_ray` with the run's name continues from the step-60 checkpoint Ray kept and trains on (a
    worker killed mid-run and resumed by Ray itself: tests/faults/test_ray_worker_kill.py). It runs on a copy of
    the run's Ray storage alone, so the checkpoint can only come from there (out_dir is new and empty); the other
    tests read the finished run as it was."""
    import shutil

    from distar.ray_train import run_on_ray

    done, _, _ = ddp_run
    tmp = tmp_path
    shutil.copytree(done / "ray_results", tmp / "ray_results")
    summary = run_on_ray(_cfg(tmp, "ddp", "loss.alpha_rew=0.2", "reward.terms=[{name: region}]", "train.steps=75",
                              "train.checkpoint_every=15"))
    assert summary["step"] == 75 and summary["resumed_from_step"] == 60, summary
    steps = [json.loads(line)["step"] for line in (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [75], steps
