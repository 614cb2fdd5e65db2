"""Noise schedules taken from diffusers' schedulers (never re-derived by hand)."""
from __future__ import annotations

import torch


def sd_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """`alphas_cumprod` [T] of SD1.5/SDXL (scaled_linear, beta 0.00085..0.012), float32."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    return sched.alphas_cumprod.clone().float()


def alphas_cumprod_from_scheduler(scheduler) -> torch.Tensor:
    """`alphas_cumprod` of any diffusers scheduler instance that has one."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod (expected a VP/DDPM-family scheduler)")
    return torch.as_tensor(ac).clone().float()
