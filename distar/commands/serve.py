"""`distar serve`: the generator HTTP API and playground on a private local Ray cluster (Ray Serve).

The same application as `serve run deploy/serve_generator.yaml` (services/generator_app.py), with its
config taken from flags. Runs until SIGINT/SIGTERM (or --duration seconds), then drains: requests in flight
are answered (or refused, past `graceful_shutdown_timeout_s`), Serve and the private Ray cluster it started
are shut down, and it exits 0. A second signal while draining aborts at once (exit 130).
"""
from __future__ import annotations

import argparse
import os
import time
FLAGS = {"torch_threads": "--threads", "batch_wait_timeout_s": "--batch-wait-ms", "num_replicas": "--replicas",
         "num_cpus": "--replica-cpus", "num_gpus": "--gpus"}  # config field -> flag, where the names differ


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a generator over HTTP: POST /generate, GET /health, playground at /")
    p.add_argument("--model", default="digits-onestep", help="digits-onestep | checkpoint dir | models:/NAME@ALIAS")
    p.add_argument("--reference", default=None, help="multi-step reference shown beside it (e.g. digits-teacher)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                   help="batch concurrent requests (@serve.batch)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=0.25)
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per replica")
    p.add_argument("--weights-dir", default=None, help="digits weights directory (default: shipped)")
    p.add_argument("--max-ongoing-requests", type=int, default=64, help="per replica, in flight at once")
    p.add_argument("--max-queued-requests", type=int, default=128,
                   help="waiting beyond those in flight; past it: 503 with Retry-After at once")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..errors import UserError
    from ..loading import check_model_spec
    from ..serving.config import GeneratorAppConfig
    from ..stopping import StopSignals

    check_model_spec("--model ", args.model)  # before a Ray cluster starts (replicas would only log it)
    if args.reference:
        check_model_spec("--reference ", args.reference)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    try:
        cfg = GeneratorAppConfig(
            model=args.model, reference=args.reference, weights_dir=args.weights_dir, device=args.device,
            torch_threads=args.threads, batching=args.batching, max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000.0, num_replicas=args.replicas,
            num_cpus=args.replica_cpus, num_gpus=args.gpus, max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests)
    except ValidationError as err:
        e = err.errors()[0]
        field = str(e["loc"][0]) if e["loc"] else ""
        raise UserError(f"{FLAGS.get(field, '--' + field.replace('_', '-'))}: {e['msg']}") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray
    from ray import serve

    from services.generator_app import build_app

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    # after ray.init: its own SIGTERM handler (a C++ stack dump, then exit) is replaced by the flag
    with StopSignals("draining requests in flight, then stopping") as stop:
        try:
            serve.start(http_options={"host": args.host, "port": args.port})
            serve.run(build_app(cfg), name="generator", route_prefix="/")
            print(f"serving {cfg.model} at http://{args.host}:{args.port}/ (batching {'on' if cfg.batching else 'off'}"
                  f"; POST /generate, GET /health, docs at /docs); Ctrl-C or SIGTERM stops", flush=True)
            t0 = time.monotonic()
            while not stop() and (args.duration is None or time.monotonic() - t0 < args.duration):
                time.sleep(0.1)
            print("stopping: " + (f"{stop.name}; " if stop() else "") + "draining requests in flight", flush=True)
            serve.delete("generator")  # the replica answers what it holds while the proxy can still send it
        finally:
            serve.shutdown()
            ray.shutdown()
    print("stopped", flush=True)
    return 0
