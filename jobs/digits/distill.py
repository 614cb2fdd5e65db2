"""Data-free distillation of the one-step generator from the teacher: DI* with alpha_rew = 0 (SIM), run as
`load_config("digits", DISTILL) + run_training`, the same loop users run, in the role DMD2-SDXL-1step plays
for SDXL.

The generator and the fake score both start as copies of the teacher UNet (`model.generator=teacher`); the
generator is used at the fixed timestep tau (see distar/worlds/digits/bundle.py). The fake score first
warms up on the generator's initial samples. Besides the EMA generator, the fake score at the end ships
too: post-training (`train.init_from`) then starts with a fake score matched to the generator.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from distar.checkpoint import latest_checkpoint, load_generator_state, load_train_state
from distar.config import load_config
from distar.train_loop import LoopHooks, run_training

DISTILL = ["name=digits-distill", "model.generator=teacher", "model.conditioning_timestep=499",
           "model.guidance_scale=2.0", "loss.divergence=score", "loss.alpha_rew=0", "reward.terms=[]",
           "train.steps=400", "train.batch_size=32", "train.fake_steps=2", "train.fake_warmup_steps=100",
           "train.generator_optim.lr=5e-5", "train.fake_optim.lr=1e-4", "train.ema_decay=0.99",
           "train.log_every=100", "train.seed=0", "train.device=cpu"]


def distill_onestep(weights_dir: str | Path, runs: str | Path, overrides: list[str] | None = None
                    ) -> tuple[dict, dict, dict]:
    """(EMA generator state dict, fake-score state dict, info: config, judge metrics along the way, seconds).

    Resumable: an interrupted distillation continues from the newest checkpoint under `runs`."""
    cfg = load_config("digits", DISTILL + [f"model.weights_dir={weights_dir}", f"train.out_dir={runs}",
                                           "train.checkpoint_every=100", *(overrides or [])])
    t0 = time.time()
    result = run_training(cfg, hooks=LoopHooks())
    final = load_train_state(latest_checkpoint(Path(runs)))
    info = {"config": {"overrides": DISTILL + list(overrides or []),
                       "conditioning_timestep": cfg.model.conditioning_timestep}, "history": result.history,
            "train_seconds": round(time.time() - t0, 1)}
    return load_generator_state(result.final_dir), {k: v.to(torch.float32) for k, v in final["fake_score"].items()}, info


FIT_FAKE = ["name=digits-fake-fit", "loss.alpha_rew=0", "reward.terms=[]", "train.steps=0", "train.batch_size=32",
            "train.fake_optim.lr=1e-4", "train.seed=1", "train.device=cpu"]


def fit_fake_score(weights_dir: str | Path, runs: str | Path, steps: int = 800) -> tuple[dict, dict]:
    """A fake score fitted by denoising score matching to the one-step generator already in `weights_dir`
    (the loop's fake warm-up, `steps` updates from the teacher, no generator update): for a weights directory
    whose generator came from an older build that did not keep its distillation's fake score."""
    cfg = load_config("digits", FIT_FAKE + [f"model.weights_dir={weights_dir}", f"train.out_dir={runs}",
                                            f"train.fake_warmup_steps={steps}"])
    t0 = time.time()
    run_training(cfg, hooks=LoopHooks())
    fake = load_train_state(latest_checkpoint(Path(runs)))["fake_score"]
    info = {"config": FIT_FAKE + [f"train.fake_warmup_steps={steps}"], "train_seconds": round(time.time() - t0, 1)}
    return {k: v.to(torch.float32) for k, v in fake.items()}, info
