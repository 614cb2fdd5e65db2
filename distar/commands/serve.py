"""`distar serve`: the generator HTTP API and playground on a private local Ray cluster (Ray Serve).

The same application as `serve run deploy/serve_generator.yaml` (services/generator_app.py), with its
config taken from flags. Runs until Ctrl-C (or --duration seconds), then shuts down what it started.
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
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..errors import UserError
    from ..loading import check_model_spec
    from ..serving.config import GeneratorAppConfig

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
            num_cpus=args.replica_cpus, num_gpus=args.gpus)
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
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(cfg), name="generator", route_prefix="/")
        print(f"serving {cfg.model} at http://{args.host}:{args.port}/ (batching {'on' if cfg.batching else 'off'}; "
              f"POST /generate, GET /health, docs at /docs); Ctrl-C stops", flush=True)
        t0 = time.monotonic()
        while args.duration is None or time.monotonic() - t0 < args.duration:
            time.sleep(0.5)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
