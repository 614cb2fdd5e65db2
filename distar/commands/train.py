"""`distar train --config NAME|PATH [key=value ...]`: DI* post-training, in-process or on Ray Train.

In-process, SIGINT or SIGTERM stops the run after the current step: it writes that step's checkpoint, prints
one line saying where, and exits 130 (SIGINT) or 143 (SIGTERM); the same command resumes from there.
On Ray the driver's signal reaches the workers through a file in train.out_dir (`ray_train.STOP_REQUEST`).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="post-train a one-step generator with DI*",
                       description="Run DI* training. --config is a YAML file or a built-in config name "
                                   "(gaussian2d, digits, ...); KEY=VALUE overrides use dotted keys.")
    p.add_argument("--config", required=True, help="YAML file or built-in config name")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.alpha_rew=10 train.steps=200")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from ..config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from ..stopping import StopSignals, TrainingStopped, stopped_line

    stop = StopSignals("saving a checkpoint after this step, then stopping")
    if cfg.ray.num_workers > 0 or cfg.reward.backend == "serve" or cfg.mlflow.enabled:
        from services.reward_service import deploy_rewards

        from ..memory_plan import require_fit

        require_fit(cfg)  # GPU runs: refuse, with the memory table, a run that cannot fit (ray.plan_check)

        from ..ray_train import run_on_ray  # Ray only at the edge

        summary = run_on_ray(cfg, deploy_rewards=deploy_rewards, stop=stop)  # installs `stop` after ray.init
        if stop():
            print(stopped_line("distar train", stop.name, summary.get("step"), summary.get("checkpoint")),
                  file=sys.stderr)
            return stop.exit_code
    else:
        from ..train_loop import LoopHooks, run_training

        with stop:
            try:
                result = run_training(cfg, hooks=LoopHooks(should_stop=stop))
            except TrainingStopped as done:
                print(stopped_line("distar train", stop.name, done.step, done.checkpoint), file=sys.stderr)
                return stop.exit_code
        last = result.history[-1] if result.history else {}
        summary = {"final_dir": str(result.final_dir), "seconds": round(result.seconds, 1), **last}
    print(json.dumps(summary, indent=2, default=str))
    return 0
