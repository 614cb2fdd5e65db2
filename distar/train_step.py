"""One DI* training step, written once for every world and for the Ray workers.

A step is `fake_steps` fake-score updates followed by one generator update and an EMA update. The step
never knows whether it runs under Ray: it receives the (possibly DDP-wrapped) trained networks, their
optimizers, a reward client and a CPU `torch.Generator` for all randomness.

Generator loss (per sample, then averaged):
    lambda(t) * L_div            with L_div from `losses.score_divergence_loss` (divergence='score') or
                                 `losses.kl_divergence_loss` (divergence='kl'), or nothing ('none');
  + alpha_rew * L_rew            with L_rew = `losses.reward_surrogate_loss(Dec(x0), grad_r)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from . import diffusion, losses
from .bundle import ModelBundle, unwrap
from .config import LossConfig
from .ema import EMA
from .rewards.base import RewardClient


@dataclass
class TrainState:
    bundle: ModelBundle
    generator: nn.Module             # what the generator pass calls (bundle.generator or its DDP wrapper)
    fake_score: nn.Module
    generator_opt: torch.optim.Optimizer
    fake_opt: torch.optim.Optimizer
    ema: EMA
    step: int = 0                    # generator updates done
    fake_warmup_done: bool = False   # the fake score has adapted to this generator (warm-up or init_from)


def _noise_like(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=rng, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def _clip(net: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in net.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def fake_update(state: TrainState, cond: Any, n: int, loss_cfg: LossConfig, grad_clip: float,
                rng: torch.Generator) -> dict[str, torch.Tensor]:
    """One denoising-score-matching update of the fake score on detached generator samples."""
    b = state.bundle
    with torch.no_grad():
        x0 = b.generate(unwrap(state.generator), b.sample_noise(n, rng), cond)
    t = diffusion.sample_timesteps(n, loss_cfg.fake_t_min, loss_cfg.fake_t_max, rng, x0.device)
    alpha, sigma = diffusion.alpha_sigma(b.alphas_cumprod, t)
    eps = _noise_like(x0, rng)
    x_t = diffusion.add_noise(x0, eps, alpha, sigma)
    loss = losses.fake_score_loss(b.eps_fake(state.fake_score, x_t, t, cond), eps).mean()
    state.fake_opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = _clip(state.fake_score, grad_clip)
    state.fake_opt.step()
    return {"fake/loss": loss.detach(), "fake/grad_norm": gnorm.detach()}


def generator_loss(bundle: ModelBundle, generator: nn.Module, fake: nn.Module, cond: Any,
                   prompts: Sequence[str], loss_cfg: LossConfig, reward: RewardClient | None,
                   rng: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator objective (scalar) and its metrics. `fake` is used frozen; gradients reach only `generator`."""
    n = len(prompts)
    x0 = bundle.generate(generator, bundle.sample_noise(n, rng), cond)
    metrics: dict[str, torch.Tensor] = {}
    total = x0.new_zeros(())

    pending = None
    image = None
    if loss_cfg.alpha_rew > 0:
        if reward is None:
            raise ValueError("loss.alpha_rew > 0 but no reward client was given to the training step")
        image = bundle.decode(x0)
        pending = reward.submit(image.detach(), prompts, with_grad=True)  # overlaps with the divergence below

    if loss_cfg.divergence != "none":
        t = diffusion.sample_timesteps(n, loss_cfg.t_min, loss_cfg.t_max, rng, x0.device)
        alpha, sigma = diffusion.alpha_sigma(bundle.alphas_cumprod, t)
        eps = _noise_like(x0, rng)
        x_t = diffusion.add_noise(x0, eps, alpha, sigma)
        e_f = bundle.eps_fake(fake, x_t, t, cond)
        e_r = bundle.eps_ref(x_t, t, cond)
        lam = diffusion.time_weight(loss_cfg.weighting, alpha, sigma).to(x0.dtype)
        if loss_cfg.divergence == "score":
            per = losses.score_divergence_loss(e_f, e_r, eps, c=loss_cfg.c, distance=loss_cfg.distance,
                                               full=loss_cfg.full)
        else:
            per = losses.kl_divergence_loss(e_f, e_r, x_t, sigma.to(x_t.dtype))
        div = (lam * per).mean()
        total = total + div
        with torch.no_grad():
            metrics["gen/div_loss"] = div.detach()
            metrics["gen/score_gap"] = (e_f - e_r).float().pow(2).flatten(1).sum(1).sqrt().mean()

    if pending is not None:
        out = pending.result()
        rew = loss_cfg.alpha_rew * losses.reward_surrogate_loss(image, out.grad.to(image.device)).mean()
        total = total + rew
        metrics["reward/total"] = out.total.float().mean()
        for k, v in out.parts.items():
            metrics[f"reward/{k}"] = v.float().mean()
        metrics["reward/grad_norm"] = out.grad.float().flatten(1).norm(dim=1).mean()
    metrics["gen/loss"] = total.detach()
    return total, metrics


def generator_update(state: TrainState, cond: Any, prompts: Sequence[str], loss_cfg: LossConfig,
                     grad_clip: float, reward: RewardClient | None, rng: torch.Generator) -> dict[str, torch.Tensor]:
    fake = unwrap(state.fake_score)
    was = [p.requires_grad for p in fake.parameters()]
    fake.requires_grad_(False)
    try:
        loss, metrics = generator_loss(state.bundle, state.generator, fake, cond, prompts, loss_cfg, reward, rng)
        state.generator_opt.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        for p, w in zip(fake.parameters(), was):
            p.requires_grad_(w)
    metrics["gen/grad_norm"] = _clip(state.generator, grad_clip).detach()
    state.generator_opt.step()
    state.ema.update(unwrap(state.generator))
    state.step += 1
    return metrics


def train_step(state: TrainState, prompts: Sequence[str], loss_cfg: LossConfig, *, fake_steps: int,
               grad_clip: float, reward: RewardClient | None, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """`fake_steps` fake-score updates, then one generator update. Prompts are this worker's batch."""
    cond = state.bundle.encode_prompts(list(prompts))
    metrics: dict[str, torch.Tensor] = {}
    for _ in range(fake_steps):
        metrics.update(fake_update(state, cond, len(prompts), loss_cfg, grad_clip, rng))
    metrics.update(generator_update(state, cond, prompts, loss_cfg, grad_clip, reward, rng))
    return metrics


def build_optimizer(net: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(net).__name__} has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
