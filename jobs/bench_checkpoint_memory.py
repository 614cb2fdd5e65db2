"""Host memory of one FSDP checkpoint save: the old full-state gather on rank 0 vs the sharded DCP writer.

    python -m jobs.bench_checkpoint_memory --hidden 2048 --world 2

Two gloo processes on the CPU shard the 2-D world's generator and fake score (MLPs scaled up with
`model.hidden`, so the trained state is hundreds of MB) with FSDP2, take one training step (Adam state
exists), then save a step checkpoint one way. A thread samples each rank's RSS every 5 ms during the save;
the peak above the RSS just before it is printed per rank, for both paths (each in fresh processes), and
their ratio. Never asserted anywhere: a measurement, on whatever else the machine is doing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from datetime import timedelta
from pathlib import Path

from jobs.host_memory import peaks_during


def _worker(rank: int, world: int, init_file: str, out: str, hidden: int, path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from distar import checkpoint as ckpt
    from distar.config import load_config
    from distar.fsdp import fsdp_hooks
    from distar.train_loop import LoopHooks, build_state
    from distar.train_step import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        hooks = fsdp_hooks(init_device_mesh("cpu", (world,)), rank)
        cfg = load_config("gaussian2d", [f"model.hidden={hidden}"])
        state = build_state(cfg, torch.device("cpu"), LoopHooks(rank=rank, world_size=world, **hooks))
        train_step(state, ["class 0"] * 16, cfg.loss, fake_steps=1, grad_clip=10.0, reward=None,
                   rng=torch.Generator().manual_seed(rank))
        io, run = hooks["state_io"], Path(out) / path
        rng = {"loop": [], "torch": []}

        def old() -> None:  # as before: gather everything, rank 0 writes train_state.pt
            gen, train = io.gather(state)
            if rank == 0:
                ckpt.save_step_checkpoint(run, state.step, generator_state=gen, config_yaml="", meta={},
                                          train_state={**train, "rng": rng})
            dist.barrier()

        def new() -> None:
            io.save_step(state, run, rng, "", {})

        dist.barrier()
        mib = peaks_during(old if path == "old" else new)["rss"]
        params = sum(p.numel() for p in state.generator.parameters()) * 2  # generator + fake score (global)
        (Path(out) / f"{path}_{rank}.json").write_text(json.dumps({"peak_mib": mib, "params": params}))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048, help="the 2-D world's MLP width (state size ~ hidden^2)")
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="distar-bench-ckpt-") as out:
        for path in ("old", "new"):
            init = tempfile.mktemp(prefix="init-", dir=out)
            mp.spawn(_worker, args=(args.world, init, out, args.hidden, path), nprocs=args.world, join=True)
            rows[path] = [json.loads((Path(out) / f"{path}_{r}.json").read_text()) for r in range(args.world)]
        on_disk = {path: sum(f.stat().st_size for f in (Path(out) / path).rglob("*") if f.is_file()) / 2**20
                   for path in rows}
    summary = {"trained_params": rows["old"][0]["params"], "world": args.world,
               "old_gather_rank_peaks_mib": [round(r["peak_mib"], 1) for r in rows["old"]],
               "new_sharded_rank_peaks_mib": [round(r["peak_mib"], 1) for r in rows["new"]],
               "checkpoint_mib": {k: round(v, 1) for k, v in on_disk.items()}}
    summary["rank0_ratio_old_over_new"] = round(rows["old"][0]["peak_mib"] / max(rows["new"][0]["peak_mib"], 1e-3), 2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
