"""Train the reference ("teacher") diffusion of the digits world: UNet + CLIP text encoder, jointly.

Epsilon prediction with SD's scaled_linear schedule (diffusers' DDPMScheduler adds the noise), prompt
dropout to the empty prompt for classifier-free guidance, pixels in [-1, 1]. Returns EMA weights.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from distar.progress import progress
from distar.worlds.digits import data, models, text


def train_teacher(steps: int = 1500, batch_size: int = 64, lr: float = 1e-3, p_uncond: float = 0.1,
                  ema_decay: float = 0.999, seed: int = 0, log=print) -> tuple[dict, dict, dict]:
    """Returns (unet EMA state, text encoder EMA state, info)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    x, y = data.load_split("teacher")
    x = x * 2.0 - 1.0
    unet, te = models.build_unet(), models.build_text_encoder()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    warm = 100
    lr_at = lambda s: lr * min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    ema_u, ema_t = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    t0, run = time.time(), 0.0
    for step in progress(range(steps), desc="teacher", unit="step"):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=rng)
        x0, labels = x[idx], y[idx]
        prompts = data.random_prompts(labels, rng)
        drop = torch.rand(batch_size, generator=rng) < p_uncond
        prompts = [text.NULL_PROMPT if d else p for p, d in zip(prompts, drop.tolist())]
        ids = text.tokenize(prompts)
        t = torch.randint(0, 1000, (batch_size,), generator=rng)
        eps = torch.randn(x0.shape, generator=rng)
        x_t = sched.add_noise(x0, eps, t)
        pred = unet(x_t, t, encoder_hidden_states=te(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, eps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_u), (te, ema_t)):
                for p, q in zip(src.parameters(), dst.parameters()):
                    q.mul_(d).add_(p.detach(), alpha=1 - d)
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"teacher step {step}/{steps} loss {run:.4f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s")
    info = dict(steps=steps, batch_size=batch_size, lr=lr, p_uncond=p_uncond, ema_decay=ema_decay, seed=seed,
                final_loss=round(run, 5), train_seconds=round(time.time() - t0, 1))
    return ema_u.state_dict(), ema_t.state_dict(), info
