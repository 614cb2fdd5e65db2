"""Shared by tests/test_serve_*.py: digits weights, one loaded GeneratorService, a live uvicorn server.

Weights: the shipped distar/weights/digits when present, else a random-init teacher and text encoder
written to a temp dir (the serving contract - determinism, limits, formats - does not need trained weights).
"""
from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from distar.serving.api import build_api, health_of  # noqa: E402
from distar.serving.service import AsyncGenerator, GeneratorService  # noqa: E402
from distar.worlds.digits import files as digits_files  # noqa: E402

PROMPT = "a handwritten digit 3"
REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def weights_dir() -> str:
    if (digits_files.SHIPPED_DIR / digits_files.FILES["teacher"]).is_file():
        return str(digits_files.SHIPPED_DIR)
    import torch

    from distar.worlds.digits import models

    d = Path(tempfile.mkdtemp(prefix="distar_serve_weights_"))
    torch.manual_seed(0)
    models.save_weights(models.build_unet(), d / digits_files.FILES["teacher"])
    models.save_weights(models.build_text_encoder(), d / digits_files.FILES["text_encoder"])
    return str(d)


@functools.lru_cache(maxsize=1)
def service() -> GeneratorService:
    """digits-onestep with digits-teacher as reference, loaded once per test session."""
    return GeneratorService("digits-onestep", "cpu", reference="digits-teacher", weights_dir=weights_dir())


def make_app(reference: bool = True, batching: bool = False):
    svc = service()
    health = health_of(svc, batching)
    if not reference:
        health = health.model_copy(update={"reference": None})
    return build_api(AsyncGenerator(svc), health)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
