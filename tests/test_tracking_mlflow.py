"""MLflow without Ray: a run logs params/metrics/images, the EMA generator registers as a pyfunc with an
alias, and `distar generate --model models:/NAME@ALIAS` draws from it (the registry hook of loading.py)."""
from __future__ import annotations

import pytest
import torch

from distar import tracking
from distar.checkpoint import load_generator_state, save_generator_dir
from distar.config import dump_config, load_config


@pytest.fixture
def registered(tmp_path, monkeypatch):
    from distar.worlds import build_bundle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config("digits", ["mlflow.enabled=true", "mlflow.registered_model=distar-digits", "name=t"])
    bundle = build_bundle(cfg.model, "cpu")
    with torch.no_grad():
        for p in bundle.generator.parameters():
            p.add_(0.01)                                       # a "trained" generator, distinct from the init
    ckpt = save_generator_dir(tmp_path / "final", bundle.generator.state_dict(), dump_config(cfg), {"step": 1},
                              train_state={"step": 1})
    assert tracking.tracking_uri(cfg.mlflow) == uri
    run_id = tracking.start_run(uri, cfg, dump_config(cfg), "t")
    log = tracking.RunLogger(uri, run_id)
    log.metrics(5, {"gen/loss": 1.5, "reward/total": 0.25, "step": 5})
    log.images(5, torch.rand(4, 1, 16, 16))
    tracking.finish_run(uri, run_id, ok=True)
    info = tracking.register_generator(uri, run_id, ckpt, "distar-digits", "champion")
    return uri, run_id, info, ckpt


def test_run_params_metrics_images_and_alias(registered):
    from mlflow import MlflowClient

    uri, run_id, info, _ = registered
    c = MlflowClient(uri, registry_uri=uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.world"] == "digits"
    assert run.data.metrics == {"gen/loss": 1.5, "reward/total": 0.25}
    # MLflow's step-indexed image API: the UI shows the grid at step 5 (key "samples")
    pngs = [a.path for a in c.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert len(pngs) == 1 and pngs[0].startswith("images/samples+step+5+"), pngs
    assert info["model_uri"] == "models:/distar-digits@champion"
    assert str(c.get_model_version_by_alias("distar-digits", "champion").version) == info["version"] == "1"
    # same run name again = the same MLflow run (a resumed training run), params not re-logged
    cfg = load_config("digits", ["mlflow.enabled=true", "name=t", "train.steps=999"])
    assert tracking.start_run(uri, cfg, dump_config(cfg), "t") == run_id


def test_generate_from_registry_uri(registered, tmp_path):
    from distar.cli import main
    from distar.model_registry import resolve_registry_uri

    _, _, _, ckpt = registered
    from safetensors.torch import load_file

    local = resolve_registry_uri("models:/distar-digits@champion")  # the registered diffusers pipeline
    want, got = load_generator_state(ckpt), load_file(str(local / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert not (local / "train_state.pt").exists()
    assert main(["generate", "--model", "models:/distar-digits@champion", "--prompt", "a handwritten digit 3",
                 "--n", "2", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "grid.png").is_file()


def test_registry_errors_name_the_uri(registered, capsys):
    from distar.cli import main

    for uri in ("models:/distar-digits@nope", "models:/no-such-model@champion", "models:/bad"):
        assert main(["generate", "--model", uri, "--prompt", "3", "--n", "1", "--out", "/tmp/distar-x"]) == 2
        err = capsys.readouterr().err
        assert uri in err and "Traceback" not in err
