"""`distar plan --config NAME|PATH --gpus N --gpu-mem-gb M [key=value ...]`: will this run fit on those GPUs?

Prints the per-rank memory table (distar.memory_plan: the world's networks built on the meta device, no
weights read) and exits 0 when the peak fits, 3 when it does not (with the switches that would make it fit)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory plan of a training config (no GPU, no weights needed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file or built-in config name")
    p.add_argument("--gpus", type=int, default=None, help="ranks (one GPU each); default: ray.num_workers")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one GPU in GiB, e.g. 80")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default=None, help="default: ray.strategy")
    p.add_argument("--lora-rank", type=int, default=None, help="default: model.lora_rank (0 = full fine-tuning)")
    p.add_argument("--batch", type=int, default=None, help="images per rank; default: train.batch_size")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for distar train")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..memory_plan import EXIT_DOES_NOT_FIT, format_plan, memory_plan, suggest

    extra = []
    for flag, key, value in (("--gpus", "ray.num_workers", args.gpus), ("--strategy", "ray.strategy", args.strategy),
                             ("--lora-rank", "model.lora_rank", args.lora_rank),
                             ("--batch", "train.batch_size", args.batch)):
        if value is not None:
            if isinstance(value, int) and value < (0 if flag == "--lora-rank" else 1):
                raise ConfigError(f"{flag}: expected {'a rank >= 0' if flag == '--lora-rank' else 'an integer >= 1'}, "
                                  f"got {value}")
            extra.append(f"{key}={value}")
    if not args.gpu_mem_gb > 0:
        raise ConfigError(f"--gpu-mem-gb: expected a positive number of GiB, got {args.gpu_mem_gb:g}")
    cfg = load_config(args.config, [*args.overrides, *extra])
    plan = memory_plan(cfg, args.gpu_mem_gb)
    if not plan.fits:
        plan.suggestions = suggest(cfg, args.gpu_mem_gb)
    print(format_plan(plan))
    return 0 if plan.fits else EXIT_DOES_NOT_FIT
