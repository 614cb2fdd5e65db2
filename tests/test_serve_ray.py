"""The Ray Serve deployment (services/generator_app.py) over HTTP on the shared local cluster: concurrent
requests are batched (@serve.batch) and each comes back equal to the unbatched service; validation and
the body limit stand in front. (`_local_testing_mode` cannot run @serve.batch in Ray 2.60: the batch queue
asks for a replica context that local mode never sets.)"""
from __future__ import annotations

import asyncio
import socket

import pytest

from distar.serving.config import GeneratorAppConfig
from distar.images import decode_png
from distar.serving.service import Job

from .serve_fixtures import PROMPT, service, weights_dir

serve = pytest.importorskip("ray.serve")


def _config(**kw) -> GeneratorAppConfig:
    return GeneratorAppConfig(model="digits-onestep", weights_dir=weights_dir(), device="cpu", torch_threads=None,
                              num_cpus=0.25, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_http_on_cluster_batches_and_validates(ray_cluster):
    import httpx
    from ray.serve.context import _get_global_client

    from services.generator_app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    port = _get_global_client().http_config.port       # another test may have started Serve first
    serve.run(build_app(_config(max_batch_size=16)), name="generator-test", route_prefix="/generator-test")
    url = f"http://127.0.0.1:{port}/generator-test"
    try:
        async def concurrently():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*[c.post(url + "/generate", json={"prompt": PROMPT, "seed": s})
                                              for s in range(16)])

        responses = asyncio.run(concurrently())
        assert [r.status_code for r in responses] == [200] * 16
        alone = service().generate([Job((PROMPT,), 1, s) for s in range(16)])
        assert [r.content for r in responses] == [a[0] for a in alone]
        assert decode_png(responses[0].content).shape == (1, 16, 16)
        stats = serve.get_app_handle("generator-test").batch_stats.remote().result(timeout_s=30)
        assert stats["requests"] == 16 and stats["max_batch"] > 1, stats

        health = httpx.get(url + "/health", timeout=30).json()
        assert health["batching"] is True and health["model"] == "digits-onestep"
        bad = httpx.post(url + "/generate", json={"prompt": PROMPT, "seed": "x"}, timeout=30)
        assert bad.status_code == 422 and bad.json()["message"].startswith("seed:")
        big = httpx.post(url + "/generate", content=b"{" + b" " * 10_000 + b"}",
                         headers={"content-type": "application/json"}, timeout=30)
        assert big.status_code == 413
    finally:
        serve.delete("generator-test")
