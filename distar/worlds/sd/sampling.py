"""Multi-step reference sampling for SD1.5 / SDXL bundles: N scheduler steps over eps_ref with CFG.

    images = sample_reference(bundle, prompts, bundle.sample_noise(n, rng), steps=50, guidance=7.5)

The reference UNet's output goes through `bundle.unet_eps` (v-prediction converted to epsilon there), so the
scheduler always runs with prediction_type='epsilon'. DDIM (eta = 0) and Euler are deterministic given the
initial noise; noise is an argument, so equal noise gives equal images.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ... import diffusion

SCHEDULERS = ("ddim", "euler")


def _scheduler(bundle, kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[kind]
    cfg = {k: v for k, v in bundle.parts.scheduler_config.items() if not k.startswith("_")}
    cfg.update(prediction_type="epsilon")
    if kind == "ddim":
        cfg.update(clip_sample=False, set_alpha_to_one=False)
    return cls.from_config(cfg)


def eps_cfg(bundle, x_t: torch.Tensor, t: torch.Tensor, cond, guidance: float) -> torch.Tensor:
    """eps(x, null) + w (eps(x, c) - eps(x, null)) of the reference UNet, with w given (not the bundle's)."""
    if guidance == 1.0:
        return bundle.unet_eps(bundle.reference, x_t, t, cond.text, cond.pooled, cond.time_ids)
    text = torch.cat([cond.null_text, cond.text])
    pooled = None if cond.pooled is None else torch.cat([cond.null_pooled, cond.pooled])
    time_ids = None if cond.time_ids is None else torch.cat([cond.time_ids, cond.time_ids])
    e_null, e_cond = bundle.unet_eps(bundle.reference, torch.cat([x_t, x_t]), torch.cat([t, t]), text, pooled,
                                 time_ids).chunk(2)
    return diffusion.classifier_free_guidance(e_null, e_cond, guidance)


@torch.no_grad()
def sample_reference(bundle, prompts: Sequence[str], noise: torch.Tensor, steps: int = 50,
                     guidance: float | None = None, scheduler: str = "ddim") -> torch.Tensor:
    """Images [n, 3, H, W] in [0, 1] from the reference at `steps` steps; noise [n, *latent_shape] ~ N(0, I)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r}: expected one of {SCHEDULERS}")
    w = bundle.guidance_scale if guidance is None else float(guidance)
    sched = _scheduler(bundle, scheduler)
    sched.set_timesteps(int(steps), device=bundle.device)
    cond = bundle.encode_prompts(list(prompts))
    x = noise.to(bundle.device, torch.float32) * sched.init_noise_sigma
    for t in sched.timesteps:
        tt = t.to(bundle.device).expand(x.shape[0])
        eps = eps_cfg(bundle, sched.scale_model_input(x, t), tt.round().long(), cond, w)
        x = sched.step(eps, t, x).prev_sample
    return bundle.decode(x)
