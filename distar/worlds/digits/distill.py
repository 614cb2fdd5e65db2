"""Data-free distillation of the one-step generator from the teacher: DI* with alpha_rew = 0 (SIM), run
through distar.train_step exactly as post-training is, in the role DMD2-SDXL-1step plays for SDXL.

The generator and the fake score both start as copies of the teacher UNet; the generator is used at the
fixed timestep tau (see bundle.py). The fake score first warms up on the generator's initial samples.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ...config import LossConfig
from ...ema import EMA
from ...train_step import TrainState, build_optimizer, fake_update, train_step
from . import text
from .bundle import DigitsBundle

DISTILL_DEFAULTS = dict(
    steps=400, batch_size=32, fake_steps=2, fake_warmup_steps=100, generator_lr=5e-5, fake_lr=1e-4,
    betas=(0.0, 0.999), grad_clip=10.0, ema_decay=0.99, conditioning_timestep=499, guidance_scale=2.0,
    loss=dict(divergence="score", distance="pseudo_huber", c=1.0, weighting="uniform", alpha_rew=0.0,
              t_min=20, t_max=980), seed=0, eval_every=100,
)


def distill_onestep(weights_dir: str | Path, log=print, on_eval=None, **overrides) -> tuple[dict, dict]:
    """Returns (EMA generator state dict, info with the config and the judge metrics along the way).

    `on_eval(step, ema_state_dict, history)`, if given, is called at every evaluation (snapshots)."""
    cfg = {**DISTILL_DEFAULTS, **overrides}
    torch.manual_seed(cfg["seed"])
    rng = torch.Generator().manual_seed(cfg["seed"])
    bundle = DigitsBundle(Path(weights_dir), None, cfg["guidance_scale"], cfg["conditioning_timestep"],
                          torch.device("cpu"))
    loss_cfg = LossConfig(**cfg["loss"])
    state = TrainState(
        bundle=bundle, generator=bundle.generator, fake_score=bundle.fake_score,
        generator_opt=build_optimizer(bundle.generator, cfg["generator_lr"], cfg["betas"], 0.0),
        fake_opt=build_optimizer(bundle.fake_score, cfg["fake_lr"], cfg["betas"], 0.0),
        ema=EMA(bundle.generator, cfg["ema_decay"]))
    prompts = text.all_prompts()

    def batch() -> list[str]:
        return [prompts[i] for i in torch.randint(len(prompts), (cfg["batch_size"],), generator=rng).tolist()]

    def evaluate(step: int) -> dict:
        net = state.ema.averaged(bundle.generator).eval()
        m = bundle.evaluate(net, torch.Generator().manual_seed(1234))
        log(f"onestep eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))
        return {"step": step, **{k: round(v, 5) for k, v in m.items()}}

    t0 = time.time()
    history = [evaluate(0)]
    for _ in range(cfg["fake_warmup_steps"]):
        p = batch()
        fake_update(state, bundle.encode_prompts(p), len(p), loss_cfg, cfg["grad_clip"], rng)
    for step in range(1, cfg["steps"] + 1):
        m = train_step(state, batch(), loss_cfg, fake_steps=cfg["fake_steps"], grad_clip=cfg["grad_clip"],
                       reward=None, rng=rng)
        if step % 25 == 0:
            log(f"onestep step {step}/{cfg['steps']} " + " ".join(f"{k} {v.item():.4f}" for k, v in m.items())
                + f" {time.time() - t0:.0f}s")
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            history.append(evaluate(step))
            if on_eval is not None:
                on_eval(step, state.ema.averaged(bundle.generator).state_dict(), history)
    info = {"config": cfg, "history": history, "train_seconds": round(time.time() - t0, 1)}
    return state.ema.averaged(bundle.generator).state_dict(), info
