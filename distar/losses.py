"""The DI* losses (pure torch), exactly as ../shared/ALGORITHM.md defines them.

Every function returns one value per sample, shape [B]; norms and inner products run over all non-batch
dims. Time weighting lambda(t) and alpha_rew are applied by the caller (distar.train_step), not here.
These names and signatures are a public contract: extend them, never rename them.

Which parts are detached is the whole point:
- score_divergence_loss detaches NOTHING. The networks' parameters are frozen by the caller, but x_t keeps
  its graph to the generator, and `u` must stay attached: detaching it changes the gradient with respect
  to the generator's scale parameters (tests/test_gradient_identities.py shows it).
- kl_divergence_loss and reward_surrogate_loss stop-gradient their direction (sg(.)) and differentiate only
  through the sample they are paired with.
"""
from __future__ import annotations

import torch


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(dim=1)


def _per_sample_sqnorm(a: torch.Tensor) -> torch.Tensor:
    return a.pow(2).flatten(1).sum(dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def pseudo_huber(y: torch.Tensor, c: float) -> torch.Tensor:
    """d(y) = sqrt(||y||^2 + c^2) - c per sample [B]."""
    return torch.sqrt(_per_sample_sqnorm(y) + c * c) - c


def score_divergence_loss(eps_fake: torch.Tensor, eps_ref: torch.Tensor, eps: torch.Tensor, *, c: float,
                          distance: str = "pseudo_huber", full: bool = False) -> torch.Tensor:
    """The SIM / DI* generator surrogate, per sample [B].

    L_div = -<u, eps_fake - eps>,  u = d'(eps_fake - eps_ref)
      pseudo_huber: d(y) = sqrt(||y||^2 + c^2) - c,  u = y / sqrt(||y||^2 + c^2)
      l2:           d(y) = ||y||^2,                  u = 2 y                      (c unused)
    full=True adds d(eps_fake - eps_ref) (L_div_full: the sampling distribution is not stop-gradiented).

    Args:
        eps_fake: [B, ...] fake-score epsilon at x_t (fake params frozen, x_t attached to the generator).
        eps_ref:  [B, ...] reference epsilon with CFG at x_t (params frozen, x_t attached).
        eps:      [B, ...] the noise that made x_t = alpha_t x0 + sigma_t eps.
        c:        pseudo-Huber constant (> 0), in epsilon units over a whole sample.
    """
    if eps_fake.shape != eps_ref.shape or eps_fake.shape != eps.shape:
        raise ValueError(f"score_divergence_loss: eps_fake {tuple(eps_fake.shape)}, eps_ref {tuple(eps_ref.shape)} "
                         f"and eps {tuple(eps.shape)} must have the same shape")
    y = eps_fake - eps_ref
    if distance == "pseudo_huber":
        if not c > 0:
            raise ValueError(f"score_divergence_loss: c must be > 0 for pseudo_huber, got {c}")
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
    sigma: [B] tensor or a float.
    """
    direction = (eps_fake - eps_ref).detach()
    sigma = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(x_t.shape[0])
    return -_per_sample_dot(direction, x_t) / sigma


def reward_surrogate_loss(image: torch.Tensor, reward_grad: torch.Tensor) -> torch.Tensor:
    """-<sg(d r / d image), image> per sample [B]: the gradient of -r(image), with r computed elsewhere."""
    if image.shape != reward_grad.shape:
        raise ValueError(f"reward_surrogate_loss: image {tuple(image.shape)} and reward_grad "
                         f"{tuple(reward_grad.shape)} must have the same shape")
    return -_per_sample_dot(reward_grad.detach().to(image.dtype), image)


def fake_score_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Denoising score matching for the fake score, per sample [B]: mean over non-batch dims of (eps_pred - eps)^2.

    ALGORITHM.md writes ||eps_pred - eps||^2; the mean differs by the constant 1/D, which keeps the loss and
    its gradient norms comparable across resolutions (gradient clipping thresholds stay meaningful).
    """
    return (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(dim=1)
