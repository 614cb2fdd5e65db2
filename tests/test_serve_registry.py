"""Serving a generator registered in MLflow (`models:/NAME@ALIAS`, fixed at deploy time): the served
image equals `distar generate --model models:/NAME@ALIAS` for the same prompt and seed."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("mlflow")

from distar.cli import main  # noqa: E402
from distar.serving.api import build_api, health_of  # noqa: E402
from distar.serving.service import AsyncGenerator, GeneratorService  # noqa: E402

URI = "models:/distar-serve@champion"


@pytest.fixture
def registered(tmp_path, monkeypatch):
    from distar import tracking

    try:
        from .registry_fixtures import digits_run
    except ImportError:
        from registry_fixtures import digits_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt, run_id = digits_run(tmp_path, uri, "serve-test")
    tracking.finish_run(uri, run_id, ok=True)
    tracking.register_generator(uri, run_id, ckpt, "distar-serve", "champion")


def test_serves_the_registered_generator(registered, tmp_path):
    svc = GeneratorService(URI, "cpu")
    with TestClient(build_api(AsyncGenerator(svc), health_of(svc, batching=False))) as client:
        r = client.post("/generate", json={"prompt": "a handwritten digit 4", "seed": 21})
        again = client.post("/generate", json={"prompt": "a handwritten digit 4", "seed": 21})
    assert r.status_code == 200 and r.content == again.content
    out = tmp_path / "cli"
    assert main(["generate", "--model", URI, "--prompt", "a handwritten digit 4", "--n", "1", "--seed", "21",
                 "--out", str(out)]) == 0
    assert r.content == (out / "sample_0000.png").read_bytes()
    assert main(["generate", "--model", "digits-onestep", "--prompt", "a handwritten digit 4", "--n", "1",
                 "--seed", "21", "--out", str(tmp_path / "onestep")]) == 0
    assert r.content != (tmp_path / "onestep" / "sample_0000.png").read_bytes()  # really the registered weights
