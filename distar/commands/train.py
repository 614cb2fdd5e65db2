"""`distar train --config NAME|PATH [key=value ...]`: DI* post-training, in-process or on Ray Train.

In-process, SIGINT or SIGTERM stops the run after the current step: it writes that step's checkpoint, prints
one line saying where, and exits 130 (SIGINT) or 143 (SIGTERM); the same command resumes from there.
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
    if cfg.ray.num_workers > 0 or cfg.reward.backend == "serve" or cfg.mlflow.enabled:
        from services.reward_service import deploy_rewards

        from ..memory_plan import require_fit

        require_fit(cfg)  # GPU runs: refuse, with the memory table, a run that cannot fit (ray.plan_check)

        from ..ray_train import run_on_ray  # Ray only at the edge

        summary = run_on_ray(cfg, deploy_rewards=deploy_rewards)
    else:
        from ..stopping import StopSignals, TrainingStopped
        from ..train_loop import LoopHooks, run_training

        with StopSignals("saving a checkpoint after this step, then stopping") as stop:
            try:
                result = run_training(cfg, hooks=LoopHooks(should_stop=stop))
            except TrainingStopped as done:
                where = f"checkpoint {done.checkpoint}" if done.checkpoint else "no checkpoint yet (the fake-score warm-up)"
                print(f"distar train: stopped by {stop.name} at step {done.step}; {where}; "
                      f"the same command {'resumes' if done.checkpoint else 'starts over'}", file=sys.stderr)
                return stop.exit_code
        last = result.history[-1] if result.history else {}
        summary = {"final_dir": str(result.final_dir), "seconds": round(result.seconds, 1), **last}
    print(json.dumps(summary, indent=2, default=str))
    return 0
