"""Serving throughput and latency, batching on vs off, in one run on loopback.

    python -m jobs.bench_serving [--clients 1 8 32] [--requests 400] [--seconds 15] [--out bench.json]

Starts a private local Ray cluster, deploys the generator app twice (routes /on: @serve.batch, /off: one
request per model call), and for each client count runs that many concurrent loopback clients, each
POSTing one-image requests back to back, until --requests answers or --seconds pass (after a short
warm-up). Reports images/s, p50/p99 latency and the mean batch size; stops everything it started.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path



async def load(url: str, clients: int, max_requests: int, max_seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    budget = iter(range(max_requests))
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        for s in range(min(clients, 8)):  # warm-up: connections, first batches
            await c.post(url, json={"prompt": "a handwritten digit 1", "seed": s})
        t0 = time.perf_counter()

        async def client(k: int) -> None:
            nonlocal errors
            for i in budget:
                if time.perf_counter() - t0 > max_seconds:
                    return
                t = time.perf_counter()
                r = await c.post(url, json={"prompt": f"a handwritten digit {i % 10}", "seed": i})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        await asyncio.gather(*[client(k) for k in range(clients)])
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"clients": clients, "images": len(latencies), "errors": errors, "seconds": round(wall, 2),
            "images_per_s": round(len(latencies) / wall, 1), "p50_ms": round(1000 * q[49], 1),
            "p99_ms": round(1000 * q[98], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=400, help="answers per measurement (upper bound)")
    ap.add_argument("--seconds", type=float, default=15.0, help="time per measurement (upper bound)")
    ap.add_argument("--model", default="digits-onestep")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from distar.serving.config import GeneratorAppConfig
    from services.generator_app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode in ("on", "off"):
            cfg = GeneratorAppConfig(model=args.model, batching=mode == "on", max_batch_size=args.max_batch_size,
                                     batch_wait_timeout_s=args.batch_wait_ms / 1000, max_ongoing_requests=128)
            serve.run(build_app(cfg), name=f"bench-{mode}", route_prefix=f"/{mode}")
        for clients in args.clients:
            for mode in ("on", "off"):
                handle = serve.get_app_handle(f"bench-{mode}")
                before = handle.batch_stats.remote().result()
                row = asyncio.run(load(f"http://127.0.0.1:{port}/{mode}/generate", clients, args.requests, args.seconds))
                after = handle.batch_stats.remote().result()
                n_batches = after["batches"] - before["batches"]
                row = {"batching": mode, **row,
                       "mean_batch": round((after["requests"] - before["requests"]) / n_batches, 1) if n_batches else 1.0}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{'batching':>8} {'clients':>7} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'n':>5}")
    for r in rows:
        print(f"{r['batching']:>8} {r['clients']:>7} {r['images_per_s']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} "
              f"{r['mean_batch']:>6} {r['images']:>5}")
    for clients in args.clients:
        on, off = (next(r for r in rows if r["clients"] == clients and r["batching"] == m) for m in ("on", "off"))
        print(f"{clients} clients: batching gives {on['images_per_s'] / max(off['images_per_s'], 1e-9):.1f}x throughput")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
