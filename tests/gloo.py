"""N CPU processes in one gloo process group with a 1-D device mesh, for the multi-process FSDP tests.

    run_group(worker, 2, tmp_path, arg1, ...)    # worker(rank, mesh, arg1, ...) in each of 2 processes

The processes are forked: they inherit this process's imports (spawning re-imports torch, diffusers and
transformers in each, most of such a test's time on two cores), and `worker` may be any callable. Each sets
one torch thread; the group is destroyed when the worker returns or raises (an exception fails the test).
Forking is safe for these workers because they use the CPU only and touch neither CUDA nor Ray: a parent that
has initialised CUDA cannot fork, and a child must not use the parent's Ray/gRPC connections.
"""
from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch


def run_group(worker: Callable[..., Any], world: int, tmp: Path, *args: Any, timeout_s: float = 90) -> None:
    import torch.multiprocessing as mp

    init_file = tempfile.mktemp(prefix="distar-gloo-init-", dir=tmp)
    mp.start_processes(_member, args=(worker, world, init_file, timeout_s, args), nprocs=world, join=True,
                       start_method="fork")


def _member(rank: int, worker, world: int, init_file: str, timeout_s: float, args: tuple) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        worker(rank, init_device_mesh("cpu", (world,)), *args)
    finally:
        dist.destroy_process_group()
