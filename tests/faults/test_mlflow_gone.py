"""MLflow goes away: a tracking server at a dead port costs training one warning (the numbers stay in
metrics.jsonl); a registration that fails at the end leaves the model in final/ and gives the
`distar register` command, which registers it later into a local SQLite MLflow."""
from __future__ import annotations

import json
import logging
import shlex
import socket

import pytest
import torch

from distar.checkpoint import load_generator_state
from distar.config import load_config
from distar.train_loop import LoopHooks, run_training

from . import g2d

pytestmark = pytest.mark.faults


@pytest.fixture()
def dead_uri(monkeypatch):
    """http://127.0.0.1:PORT where nothing listens (the port was just free), MLflow told not to retry."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return f"http://127.0.0.1:{port}"


def test_dead_tracking_server_mid_run_costs_one_warning(tmp_path, dead_uri, caplog):
    from distar.tracking import RunLogger

    logger = RunLogger(dead_uri, "0" * 32)
    cfg = load_config("gaussian2d", g2d.overrides(tmp_path / "run", "train.steps=40", "train.sample_every=10"))
    torch.set_num_threads(1)
    with caplog.at_level(logging.WARNING, logger="distar"):
        res = run_training(cfg, hooks=LoopHooks(on_log=logger.metrics, on_images=logger.images))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and dead_uri in warnings[0] and "training continues" in warnings[0], warnings
    assert [h["step"] for h in res.history] == [10, 20, 30, 40]
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [10, 20, 30, 40] and (res.final_dir / "generator.safetensors").is_file()


def test_tracking_server_that_hangs_costs_one_bounded_wait(tmp_path, caplog):
    """A server that accepts connections and never answers (a listening socket nobody reads)."""
    from distar.tracking import RunLogger

    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        logger = RunLogger(f"http://127.0.0.1:{hole.getsockname()[1]}", "0" * 32, wait_s=2.0)
        cfg = load_config("gaussian2d", g2d.overrides(tmp_path / "run", "train.steps=40"))
        torch.set_num_threads(1)
        with caplog.at_level(logging.WARNING, logger="distar"):
            res = run_training(cfg, hooks=LoopHooks(on_log=logger.metrics))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "has not answered for 2 s at step 10" in warnings[0], warnings
    assert [h["step"] for h in res.history] == [10, 20, 30, 40]


def test_failed_registration_keeps_final_and_distar_register_does_it_later(tmp_path, dead_uri, capsys):
    from distar.cli import main
    from distar.model_registry import resolve_registry_uri
    from distar.ray_train import _register
    from distar.tracking import RegistrationError

    run = tmp_path / "run"
    g2d.train(run, "train.steps=10", "mlflow.enabled=true", "mlflow.registered_model=g2d-faults")
    cfg = load_config(run / "config.yaml")
    with pytest.raises(RegistrationError) as err:
        _register(cfg, dead_uri, "0" * 32, run / "final")
    message = str(err.value)
    assert f"the model is in {run / 'final'}" in message and (run / "final" / "generator.safetensors").is_file()
    command = shlex.split(message.split("Register it later with: ")[1])
    assert command == ["distar", "register", "--run-dir", str(run), "--tracking-uri", dead_uri]
    # MLflow is back (here: a local SQLite store); the same command with its URI registers the model
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(command[1:-1] + [db]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_uri"] == "models:/g2d-faults@champion" and out["version"] == "1"
    local = resolve_registry_uri("models:/g2d-faults@champion", tracking_uri=db)
    got, want = load_generator_state(local), load_generator_state(run / "final")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_register_refuses_a_directory_that_is_not_a_finished_run(tmp_path, capsys):
    from distar.cli import main

    assert main(["register", "--run-dir", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'db'}"]) == 2
    assert "not a finished run" in capsys.readouterr().err
