"""VP forward process, epsilon/x0/score conversions and classifier-free guidance (pure torch).

Notation follows docs/algorithm.md: `x_t = alpha_t * x0 + sigma_t * eps`, `alpha_t = sqrt(abar_t)`,
`sigma_t = sqrt(1 - abar_t)`, score `s(x_t) = -eps_hat / sigma_t`. Timesteps are integer indices into
`alphas_cumprod` (shape [T]), as in SD/SDXL; per-sample coefficients broadcast over all non-batch dims.
"""
from __future__ import annotations

import math

import torch


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with `like`'s number of dims."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t for integer timesteps t [B] (returned as [B], alphas_cumprod's dtype)."""
    abar = alphas_cumprod.to(t.device)[t.long()]
    return abar.sqrt(), (1.0 - abar).sqrt()


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t eps. x0, eps: [B, ...]; alpha, sigma: [B]."""
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sigma_t eps) / alpha_t (also the DMD2 one-step generator's output rule)."""
    return (x_t - _bcast(sigma, x_t) * eps) / _bcast(alpha, x_t)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x_t - _bcast(alpha, x_t) * x0) / _bcast(sigma, x_t)


def score_from_eps(eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """s(x_t) = -eps / sigma_t."""
    return -eps / _bcast(sigma, eps)


def eps_from_score(score: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -score * _bcast(sigma, score)


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v-prediction (v = alpha eps - sigma x0) to epsilon: eps = sigma x_t + alpha v."""
    return _bcast(sigma, x_t) * x_t + _bcast(alpha, x_t) * v


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    """eps_cfg = eps(x, null) + w (eps(x, c) - eps(x, null)); w = 1 is the conditional model."""
    return eps_uncond + w * (eps_cond - eps_uncond)


def time_weight(kind: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda(t) per sample [B] for the generator loss, in epsilon units.

    uniform:  1                         (the pseudo-Huber on eps differences = score divergence with w(t)=sigma_t)
    sigma:    sigma_t                   (down-weights low noise, where eps errors are amplified in x0)
    snr_clip: min(1, sigma_t / alpha_t) (uniform at high noise, sigma-like at low noise)
    score:    1 / sigma_t               (score units: paired with the per-sample c_t = c * sigma_t from
                                        `losses.effective_c(..., weighting='score')`, lambda(t) * L_div(eps, c_t)
                                        is exactly the surrogate -<u_s, s_fake - s_eps> written with scores
                                        s = -eps / sigma_t and a constant c; tests/test_calibration.py. Up-weights
                                        low noise: 1/sigma_t is ~7.3 at t=20 and ~1 at t=999 on SD's schedule)
    """
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "sigma":
        return sigma
    if kind == "snr_clip":
        return torch.clamp(sigma / alpha, max=1.0)
    if kind == "score":
        return 1.0 / sigma
    raise ValueError(f"time weighting {kind!r}: expected one of 'uniform', 'sigma', 'snr_clip', 'score'")


def sample_timesteps(n: int, t_min: int, t_max: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U{t_min..t_max} (inclusive), int64 [n]."""
    return torch.randint(t_min, t_max + 1, (n,), generator=generator, device="cpu").to(device)


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """SD/SDXL's schedule in closed form, used only to cross-check `distar.schedules` in tests."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()
