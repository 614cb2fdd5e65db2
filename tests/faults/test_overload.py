"""Serving under overload: more concurrent requests than the replica takes plus the proxy's queue. Past the
bound the server answers 503 with Retry-After at once (Serve's max_queued_requests and backpressure_config),
nothing hangs, and it answers 200 again afterwards."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from distar.serving.config import GeneratorAppConfig

from ..serve_fixtures import PROMPT, weights_dir

serve = pytest.importorskip("ray.serve")
pytestmark = [pytest.mark.faults, pytest.mark.ray]

FLOOD = 64
BOUND = 60.0  # seconds: generous, only so that a hung request fails the test instead of stalling it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _flood(url: str) -> list[tuple[int, float, str | None]]:
    """(status, seconds, Retry-After) of FLOOD concurrent requests of 16 images each."""
    import httpx

    async def one(c, seed):
        t0 = time.monotonic()
        r = await c.post(url + "/generate", json={"prompt": PROMPT, "seed": seed, "count": 16, "format": "json"})
        return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

    limits = httpx.Limits(max_connections=FLOOD)
    async with httpx.AsyncClient(timeout=BOUND, limits=limits) as c:
        return await asyncio.gather(*[one(c, s) for s in range(FLOOD)])


def test_past_the_queue_bound_503_with_retry_after_at_once(ray_cluster, serve_module):
    import httpx
    from ray.serve.context import _get_global_client

    from services.generator_app import build_app

    cfg = GeneratorAppConfig(model="digits-onestep", weights_dir=weights_dir(), device="cpu", torch_threads=1,
                             num_cpus=0.25, max_batch_size=2, max_ongoing_requests=2, max_queued_requests=2,
                             retry_after_s=3)
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    port = _get_global_client().http_config.port
    serve.run(build_app(cfg), name="overload-test", route_prefix="/overload-test")
    url = f"http://127.0.0.1:{port}/overload-test"
    try:
        answers = asyncio.run(_flood(url))   # an unanswered request raises httpx.ReadTimeout after BOUND s
        statuses = sorted({s for s, _, _ in answers})
        assert set(statuses) == {200, 503}, statuses
        refused = [(t, ra) for s, t, ra in answers if s == 503]
        served = [t for s, t, _ in answers if s == 200]
        assert len(served) >= cfg.max_ongoing_requests, answers
        assert all(ra == "3" for _, ra in refused), refused
        assert min(t for t, _ in refused) < max(served), answers  # refused at once, not queued behind the work
        after = httpx.post(url + "/generate", json={"prompt": PROMPT, "seed": 0}, timeout=BOUND)
        assert after.status_code == 200
        print(f"{FLOOD} at once: {len(served)} x 200 (slowest {max(served):.2f} s), {len(refused)} x 503 "
              f"(slowest {max(t for t, _ in refused):.2f} s, Retry-After 3)")
    finally:
        serve.delete("overload-test")
