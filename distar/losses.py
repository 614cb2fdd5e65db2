"""The DI* losses (pure torch), exactly as docs/algorithm.md defines them.

Every function returns one value per sample, shape [B]; norms and inner products run over all non-batch
dims. Time weighting lambda(t) and alpha_rew are applied by the caller (distar.train_step), not here.
These names and signatures are a public contract: extend them, never rename them.

Which parts are detached is the whole point:
- score_divergence_loss detaches NOTHING. The networks' parameters are frozen by the caller, but x_t keeps
  its graph to the generator, and `u` must stay attached: detaching it changes the gradient with respect
  to the generator's scale parameters (tests/test_gradient_identities.py shows it).
- kl_divergence_loss and reward_surrogate_loss stop-gradient their direction (sg(.)) and differentiate only
  through the sample they are paired with.

The divergences measure the fake score against a *target* epsilon, passed as `eps_ref`: the reference's own
(DI*, DI++, SIM), or one a reward-correction plug-in has corrected, e_target = e_ref - sigma_t * s_r
(`reward_corrected_eps`; DIDR's diffused reward proxy s_r comes from `distar.diffused_reward`). The loss
functions do not know which they were given.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

C_SCALES = ("per_sample", "per_dim")


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(dim=1)


def _per_sample_sqnorm(a: torch.Tensor) -> torch.Tensor:
    return a.pow(2).flatten(1).sum(dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def _per_sample_c(c: float | torch.Tensor, y: torch.Tensor, who: str,
                  positive: bool = True) -> float | torch.Tensor:
    """A float stays a float (the original code path, bit for bit); a tensor becomes [B] in y's dtype/device.

    A tensor's positivity is not checked (that would be a host sync): build it with `effective_c` from a
    validated c > 0 and sigma_t > 0.
    """
    if not isinstance(c, torch.Tensor):
        if positive and not c > 0:
            raise ValueError(f"{who}: c must be > 0 for pseudo_huber, got {c}")
        return c
    if c.dim() == 0:
        c = c.expand(y.shape[0])
    if c.dim() != 1 or c.shape[0] != y.shape[0]:
        raise ValueError(f"{who}: c must be a float, a 0-d tensor or a per-sample tensor [B={y.shape[0]}], "
                         f"got shape {tuple(c.shape)}")
    return c.to(device=y.device, dtype=y.dtype)


def pseudo_huber(y: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """d(y) = sqrt(||y||^2 + c^2) - c per sample [B]; c a float or a per-sample tensor [B]."""
    c = _per_sample_c(c, y, "pseudo_huber", positive=False)
    return torch.sqrt(_per_sample_sqnorm(y) + c * c) - c


def effective_c(c: float, c_scale: str = "per_sample", dims: int | Sequence[int] = 1, *,
                sigma: torch.Tensor | None = None, weighting: str = "uniform") -> float | torch.Tensor:
    """The pseudo-Huber constant `score_divergence_loss` is given, in epsilon units over a whole sample.

    c_scale (how the user's `c` is read):
      per_sample: c as written: ||e_fake - e_ref|| over the whole sample is compared with c. The regime a
                  given c means depends on the sample size D (the gap of D i.i.d. errors grows like sqrt(D)).
      per_dim:    c * sqrt(D): c is a per-element RMS gap, so the same number means the same regime
                  (||y|| / sqrt(D) vs c) at 2, 16x16x1 and 128x128x4 elements.
    weighting:
      "score":    additionally times sigma_t, per sample -> a tensor [B]. With lambda(t) = 1/sigma_t
                  (`diffusion.time_weight('score', ...)`) the generator loss is then exactly the pseudo-Huber
                  surrogate written in score units (s = -eps/sigma_t) with the constant c at every t.
      otherwise:  a float (c is the same at every t).

    Args:
        c: the configured constant (> 0).
        dims: D, the number of elements per sample, or the per-sample shape (its product is D).
        sigma: [B] sigma_t of each sample; required for weighting='score', ignored otherwise.
    """
    if c_scale not in C_SCALES:
        raise ValueError(f"effective_c: c_scale {c_scale!r}: expected one of {C_SCALES}")
    d = dims if isinstance(dims, int) else math.prod(dims)
    if d < 1:
        raise ValueError(f"effective_c: dims must give at least one element per sample, got {dims!r}")
    if c_scale == "per_dim":
        c = c * math.sqrt(d)
    if weighting == "score":
        if sigma is None:
            raise ValueError("effective_c: weighting='score' needs sigma_t (c_t = c * sigma_t)")
        return c * sigma
    return c


def score_divergence_loss(eps_fake: torch.Tensor, eps_ref: torch.Tensor, eps: torch.Tensor, *,
                          c: float | torch.Tensor,
                          distance: str = "pseudo_huber", full: bool = False) -> torch.Tensor:
    """The SIM / DI* generator surrogate, per sample [B].

    L_div = -<u, eps_fake - eps>,  u = d'(eps_fake - eps_ref)
      pseudo_huber: d(y) = sqrt(||y||^2 + c^2) - c,  u = y / sqrt(||y||^2 + c^2)
      l2:           d(y) = ||y||^2,                  u = 2 y                      (c unused)
    full=True adds d(eps_fake - eps_ref) (L_div_full: the sampling distribution is not stop-gradiented).

    Args:
        eps_fake: [B, ...] fake-score epsilon at x_t (fake params frozen, x_t attached to the generator).
        eps_ref:  [B, ...] target epsilon at x_t: the reference's with CFG (params frozen, x_t attached), or a
                  reward-corrected one from `reward_corrected_eps` (DIDR's target).
        eps:      [B, ...] the noise that made x_t = alpha_t x0 + sigma_t eps.
        c:        pseudo-Huber constant (> 0), in epsilon units over a whole sample: a float (the same for
                  every sample) or a per-sample tensor [B] (e.g. c_t = c * sigma_t from `effective_c` for the
                  score-unit weighting). Unused by l2.
    """
    if eps_fake.shape != eps_ref.shape or eps_fake.shape != eps.shape:
        raise ValueError(f"score_divergence_loss: eps_fake {tuple(eps_fake.shape)}, eps_ref {tuple(eps_ref.shape)} "
                         f"and eps {tuple(eps.shape)} must have the same shape")
    y = eps_fake - eps_ref
    if distance == "pseudo_huber":
        c = _per_sample_c(c, y, "score_divergence_loss")
        root = torch.sqrt(_per_sample_sqnorm(y) + c * c)
        u = y / _bcast(root, y)
        d = root - c
    elif distance == "l2":
        u = 2.0 * y
        d = _per_sample_sqnorm(y)
    else:
        raise ValueError(f"score_divergence_loss: distance {distance!r}: expected 'pseudo_huber' or 'l2'")
    loss = -_per_sample_dot(u, eps_fake - eps)
    return loss + d if full else loss


def kl_divergence_loss(eps_fake: torch.Tensor, eps_ref: torch.Tensor, x_t: torch.Tensor,
                       sigma: torch.Tensor | float) -> torch.Tensor:
    """DI++ / Diff-Instruct KL surrogate, per sample [B]: -<sg(eps_fake - eps_ref), x_t> / sigma_t.

    Its gradient through x_t is E[(s_theta - s_ref)^T dx_t/dtheta], the gradient of KL(p_theta,t || p_ref,t).
    eps_ref is the target epsilon: the reference's, or `reward_corrected_eps(...)` for KL(p_theta,t || p*_t)
    towards the reward-tilted reference (DIDR). sigma: [B] tensor or a float.
    """
    direction = (eps_fake - eps_ref).detach()
    sigma = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(x_t.shape[0])
    return -_per_sample_dot(direction, x_t) / sigma


def reward_corrected_eps(eps_ref: torch.Tensor, sigma: torch.Tensor | float,
                         reward_score: torch.Tensor) -> torch.Tensor:
    """The target epsilon of a reward-tilted reference: e_target = e_ref - sigma_t * sg(s_r), shape of eps_ref.

    s* = s_ref + s_r in score units (s = -eps / sigma_t). eps_ref keeps its graph to x_t (the divergences
    differentiate through the networks' inputs); the correction s_r is a detached target.
    sigma: [B] tensor or a float.
    """
    if reward_score.shape != eps_ref.shape:
        raise ValueError(f"reward_corrected_eps: reward_score {tuple(reward_score.shape)} and eps_ref "
                         f"{tuple(eps_ref.shape)} must have the same shape")
    sigma = torch.as_tensor(sigma, dtype=eps_ref.dtype, device=eps_ref.device)
    if sigma.dim() == 1:
        sigma = _bcast(sigma, eps_ref)
    return eps_ref - sigma * reward_score.detach().to(eps_ref.dtype)


def reward_surrogate_loss(image: torch.Tensor, reward_grad: torch.Tensor) -> torch.Tensor:
    """-<sg(d r / d image), image> per sample [B]: the gradient of -r(image), with r computed elsewhere."""
    if image.shape != reward_grad.shape:
        raise ValueError(f"reward_surrogate_loss: image {tuple(image.shape)} and reward_grad "
                         f"{tuple(reward_grad.shape)} must have the same shape")
    return -_per_sample_dot(reward_grad.detach().to(image.dtype), image)


def fake_score_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Denoising score matching for the fake score, per sample [B]: mean over non-batch dims of (eps_pred - eps)^2.

    docs/algorithm.md writes ||eps_pred - eps||^2; the mean differs by the constant 1/D, which keeps the loss and
    its gradient norms comparable across resolutions (gradient clipping thresholds stay meaningful).
    """
    return (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(dim=1)
