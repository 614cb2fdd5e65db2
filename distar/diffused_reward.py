"""The diffused reward proxy of DIDR (pure torch): a reward-corrected target score for the divergence losses.

DIDR (docs/algorithm.md, "DIDR") regularises the generator towards the reward-tilted reference
p*_0(x) ∝ p_ref(x) exp(r(x)/beta), whose diffused score is s*_t = s_ref,t + s_r,t with the diffused reward score

    s_r,t(x_t) = grad_{x_t} log E_{p_ref(x_0 | x_t)}[ exp(r(x_0) / beta) ].

The posterior expectation has no closed form; the proxy replaces it by a short deterministic denoising:

    s_r,t(x_t) ≈ (1/beta) grad_{x_t} r(Dec(D_K(x_t)))

with D_K = K DDIM steps of the reference (CFG inside) from t down to a clean estimate. The reward's image
gradient g = d r / d image comes from wherever the reward models live (a `RewardClient`, as for the x0
reward term); the vector-Jacobian product g^T d Dec(D_K(x_t)) / d x_t runs here, by `torch.autograd.grad` with
respect to x_t only, so no network's parameters receive a gradient. The result is detached: it is a target,
and the divergence losses differentiate only through the networks' inputs, never through it.

In epsilon units the target is e_target = e_ref - sigma_t * s_r (`losses.reward_corrected_eps`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from . import diffusion

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]          # (x_tau [B, ...], tau [B]) -> eps [B, ...]


def ddim_timesteps(t: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The K timesteps D_K visits, per sample: tau_i = floor(t * (K - i) / K), i = 0..K-1 (tau_0 = t)."""
    if steps < 1:
        raise ValueError(f"ddim_timesteps: steps must be >= 1, got {steps}")
    t = t.long()
    return [torch.div(t * (steps - i), steps, rounding_mode="floor") for i in range(steps)]


def ddim_denoise(eps_fn: EpsFn, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *,
                 checkpoint: bool = False) -> torch.Tensor:
    """D_K(x_t): K deterministic DDIM steps (eta = 0) from t to a clean estimate x̂_0, differentiable in x_t.

    Step i predicts x̂_0 = (x - sigma eps) / alpha at tau_i and moves to x = alpha' x̂_0 + sigma' eps at
    tau_{i+1}; the last step returns its x̂_0 (K = 1 is Tweedie's estimate from the reference at t).
    x_t: [B, ...]; t: [B] integer timesteps. checkpoint=True recomputes each step in the backward pass instead
    of holding its activations (memory of one network pass instead of K).
    """
    taus = ddim_timesteps(t, steps)
    x = x_t
    x0 = x_t
    for i, tau in enumerate(taus):
        nxt = taus[i + 1] if i + 1 < len(taus) else None

        def step(x_in: torch.Tensor, tau=tau, nxt=nxt) -> tuple[torch.Tensor, torch.Tensor]:
            alpha, sigma = diffusion.alpha_sigma(alphas_cumprod, tau)
            eps = eps_fn(x_in, tau)
            x0_hat = diffusion.x0_from_eps(x_in, eps, alpha, sigma)
            if nxt is None:
                return x0_hat, x0_hat
            a2, s2 = diffusion.alpha_sigma(alphas_cumprod, nxt)
            return diffusion.add_noise(x0_hat, eps, a2, s2), x0_hat

        x, x0 = _checkpoint(step, x, use_reentrant=False) if checkpoint and x.requires_grad else step(x)
    return x0


def diffused_reward_score(x_t: torch.Tensor, t: torch.Tensor, *, eps_fn: EpsFn,
                          decode: Callable[[torch.Tensor], torch.Tensor],
                          reward_grad: Callable[[torch.Tensor], torch.Tensor],
                          alphas_cumprod: torch.Tensor, steps: int, beta: float | torch.Tensor,
                          checkpoint: bool = False) -> torch.Tensor:
    """The proxy s_r ≈ (1/beta) grad_{x_t} r(Dec(D_K(x_t))), detached, shape of x_t.

    Args:
        x_t: [B, ...] noisy samples (any graph they carry is cut here: the proxy is a target).
        t: [B] integer timesteps.
        eps_fn: the reference epsilon with CFG, (x, tau) -> eps; its parameters must be frozen or at least
            are never differentiated (the VJP is taken with respect to x_t only).
        decode: latent -> image, differentiable (identity in the pixel worlds).
        reward_grad: images [B, C, H, W] (detached) -> d r / d images, same shape (e.g. a reward client's
            `submit(...).result().grad`); r is the weighted reward the x0 term would use.
        beta: temperature of the tilt p_ref exp(r / beta), > 0; a float or a per-sample [B] tensor.
        checkpoint: gradient checkpointing through the K steps (`ddim_denoise`).
    """
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        image = decode(ddim_denoise(eps_fn, x, t, alphas_cumprod, steps, checkpoint=checkpoint))
        g = reward_grad(image.detach())
        if g.shape != image.shape:
            raise ValueError(f"diffused_reward_score: reward gradient {tuple(g.shape)} does not match the "
                             f"decoded images {tuple(image.shape)}")
        (vjp,) = torch.autograd.grad(image, x, grad_outputs=g.to(device=image.device, dtype=image.dtype))
    beta = torch.as_tensor(beta, dtype=vjp.dtype, device=vjp.device)
    if beta.dim() == 1:
        beta = beta.reshape(-1, *([1] * (vjp.dim() - 1)))
    return (vjp / beta).detach()
