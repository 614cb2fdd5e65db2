"""Analytic Gaussian generator vs Gaussian-mixture reference: every score in closed form (float64)."""
from __future__ import annotations

import math

import torch

from distar import diffusion

D = 2
REF_MEANS = torch.tensor([[-1.5, 0.5], [1.0, -0.5]], dtype=torch.float64)  # [M, D], equal weights
REF_STD = 0.5
ALPHAS_CUMPROD = diffusion.scaled_linear_alphas_cumprod().double()


def alpha_sigma(t: int) -> tuple[float, float]:
    abar = float(ALPHAS_CUMPROD[t])
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def gen_eps(x_t, m, s, alpha, sigma):
    """eps of p_theta,t = N(alpha m, diag(alpha^2 s^2 + sigma^2)) at x_t: sigma (x_t - alpha m) / var."""
    var = alpha ** 2 * s ** 2 + sigma ** 2
    return sigma * (x_t - alpha * m) / var


def gen_logpdf(x_t, m, s, alpha, sigma):
    var = alpha ** 2 * s ** 2 + sigma ** 2
    return (-0.5 * (x_t - alpha * m) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)


def ref_logpdf(x_t, alpha, sigma):
    var = alpha ** 2 * REF_STD ** 2 + sigma ** 2
    diff = x_t[:, None, :] - alpha * REF_MEANS[None]
    comp = (-0.5 * diff.pow(2).sum(-1) / var - 0.5 * D * math.log(2 * math.pi * var))
    return torch.logsumexp(comp, dim=1) - math.log(REF_MEANS.shape[0])


def ref_eps(x_t, alpha, sigma):
    """-sigma * grad log p_ref,t, by autograd of the log-density (independent of distar's GMM code)."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True) if not x_t.requires_grad else x_t
        g = torch.autograd.grad(ref_logpdf(x, alpha, sigma).sum(), x, create_graph=x_t.requires_grad)[0]
    return -sigma * g


def draws(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)
