"""DI* (score), DI++ (kl) and reward-only on the 2-D world at the same alpha_rew, side by side.

    python -m jobs.compare_gaussian2d --alpha 0.3 [--steps 1500] [--post-steps 1000] [--out runs/compare2d]

As in the paper, post-training starts from a distilled one-step generator: the first row distils the
reference from a random start (SIM, alpha_rew = 0); every other row starts from that checkpoint (generator
and fake score) and post-trains with the reward. Prints a markdown table: mean reward, energy distance to
the reference, right-mode mass, mode coverage, wall seconds.
"""
from __future__ import annotations

import argparse
import shutil
import time

from pathlib import Path

import torch

from distar.checkpoint import latest_checkpoint

from distar.config import load_config
from distar.train_loop import LoopHooks, run_training


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--post-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/compare2d")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    variants = [("SIM distillation (alpha_rew=0)", ["loss.divergence=score", "loss.alpha_rew=0"]),
                (f"DI* score, alpha_rew={args.alpha}", ["loss.divergence=score", f"loss.alpha_rew={args.alpha}"]),
                (f"DI++ kl, alpha_rew={args.alpha}", ["loss.divergence=kl", f"loss.alpha_rew={args.alpha}"]),
                (f"reward only, alpha_rew={args.alpha}", ["loss.divergence=none", f"loss.alpha_rew={args.alpha}"])]
    rows = []
    for i, (label, ov) in enumerate(variants):
        shutil.rmtree(Path(args.out) / str(i), ignore_errors=True)  # a comparison always starts fresh
        steps = args.steps if i == 0 else args.post_steps
        start = [] if i == 0 else [f"train.init_from={latest_checkpoint(Path(args.out) / '0')}",
                                   "train.fake_warmup_steps=0"]
        cfg = load_config("gaussian2d", ov + start + ["reward.terms=[{name: region}]", f"train.steps={steps}",
                                                      f"train.seed={args.seed}", f"train.out_dir={args.out}/{i}",
                                                      f"train.log_every={steps}"])
        t0 = time.perf_counter()
        res = run_training(cfg, hooks=LoopHooks(progress=False))
        m = res.history[-1]
        rows.append((label, m["eval/mean_reward"], m["eval/energy_distance"], m["eval/right_mode_mass"],
                     m["eval/mode_coverage"], time.perf_counter() - t0))
    print("| method | mean reward | energy distance | right-mode mass | mode coverage | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.2f} | {r[5]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
