"""The five gradient identities of docs/algorithm.md, on a Gaussian generator x0 = m + s z against a
Gaussian-mixture reference, with the analytic generator score in place of the fake network.

Each autograd gradient is compared with a finite-difference gradient of the quantity it claims to
differentiate, on common random numbers, chunk by chunk, so the check is "equal within Monte-Carlo error"
(|mean difference| < 4 standard errors) and also small relative to the gradient itself.
"""
from __future__ import annotations

import pytest
import torch

from distar import losses
from tests.gaussian_fixtures import alpha_sigma, draws, gen_eps, gen_logpdf, ref_eps, ref_logpdf

M0 = torch.tensor([0.3, 0.2], dtype=torch.float64)
S0 = torch.tensor([0.8, 1.3], dtype=torch.float64)
N, CHUNKS, H = 60_000, 20, 1e-4
C = 0.5


def _params():
    return M0.clone().requires_grad_(True), S0.clone().requires_grad_(True)


def _x_t(m, s, z, eps, t):
    a, sg = alpha_sigma(t)
    return a * (m + s * z) + sg * eps


def _fd(fn, theta0: torch.Tensor) -> torch.Tensor:
    """Central finite differences of a scalar fn(theta) over the 4 entries of theta=[m, s]."""
    g = torch.zeros_like(theta0)
    for i in range(theta0.numel()):
        e = torch.zeros_like(theta0)
        e[i] = H
        g[i] = (fn(theta0 + e) - fn(theta0 - e)) / (2 * H)
    return g


def _chunked(autograd_fn, fd_fn, seed=0):
    """Per-chunk (autograd, fd) gradients [CHUNKS, 4] on common random numbers."""
    z_all, eps_all = draws(N, seed)
    ag, fd = [], []
    theta0 = torch.cat([M0, S0])
    for z, eps in zip(z_all.chunk(CHUNKS), eps_all.chunk(CHUNKS)):
        ag.append(autograd_fn(z, eps))
        fd.append(_fd(lambda th: fd_fn(th[:2], th[2:], z, eps), theta0))
    return torch.stack(ag), torch.stack(fd)


def _assert_match(ag, fd, what):
    diff = ag - fd
    mean, se = diff.mean(0), diff.std(0) / CHUNKS ** 0.5
    scale = fd.mean(0).abs().max()
    assert scale > 1e-3, f"{what}: degenerate test, gradient is ~0"
    assert torch.all(mean.abs() <= 4.5 * se + 1e-6), f"{what}: autograd {ag.mean(0)} vs FD {fd.mean(0)} (se {se})"
    assert torch.all(mean.abs() <= 0.05 * scale), f"{what}: autograd {ag.mean(0)} vs FD {fd.mean(0)}"


# ------------------------------------------------------------------------------------ divergence pieces
def _div_autograd(t, *, full, distance="pseudo_huber", detach_u=False):
    def fn(z, eps):
        m, s = _params()
        a, sg = alpha_sigma(t)
        x_t = _x_t(m, s, z, eps, t)
        e_f = gen_eps(x_t, M0, S0, a, sg)          # frozen generator score, input attached
        e_r = ref_eps(x_t, a, sg)
        if detach_u:
            y = e_f - e_r
            u = (y / torch.sqrt(y.pow(2).sum(1, keepdim=True) + C * C)).detach()
            loss = -(u * (e_f - eps)).sum(1)
        else:
            loss = losses.score_divergence_loss(e_f, e_r, eps, c=C, distance=distance, full=full)
        return torch.cat(torch.autograd.grad(loss.mean(), [m, s]))
    return fn


def _distance(y, distance):
    return losses.pseudo_huber(y, C) if distance == "pseudo_huber" else y.pow(2).sum(1)


def _div_fixed_sampling(t, distance="pseudo_huber"):
    """D with the sampling distribution held at theta0: only the score network's parameters move."""
    def fn(m, s, z, eps):
        a, sg = alpha_sigma(t)
        x_t = _x_t(M0, S0, z, eps, t)
        return _distance(gen_eps(x_t, m, s, a, sg) - ref_eps(x_t, a, sg), distance).mean()
    return fn


def _div_full(t):
    """The full D_score(theta) at time t: samples and score both move with theta (reparameterised)."""
    def fn(m, s, z, eps):
        a, sg = alpha_sigma(t)
        x_t = _x_t(m, s, z, eps, t)
        return losses.pseudo_huber(gen_eps(x_t, m, s, a, sg) - ref_eps(x_t, a, sg), C).mean()
    return fn


@pytest.mark.parametrize("t", [150, 500, 850])
def test_1_score_divergence_surrogate_matches_fixed_sampling_gradient(t):
    ag, fd = _chunked(_div_autograd(t, full=False), _div_fixed_sampling(t))
    _assert_match(ag, fd, f"L_div at t={t}")


def test_1b_l2_distance_surrogate_matches_fixed_sampling_gradient():
    ag, fd = _chunked(_div_autograd(500, full=False, distance="l2"), _div_fixed_sampling(500, "l2"))
    _assert_match(ag, fd, "L_div (l2)")


@pytest.mark.parametrize("t", [150, 500, 850])
def test_2_full_surrogate_matches_full_divergence_gradient(t):
    ag, fd = _chunked(_div_autograd(t, full=True), _div_full(t))
    _assert_match(ag, fd, f"L_div_full at t={t}")


def test_2b_dropping_the_full_term_breaks_the_full_gradient():
    ag, fd = _chunked(_div_autograd(500, full=False), _div_full(500))
    diff = ag - fd
    z = diff.mean(0).abs() / (diff.std(0) / CHUNKS ** 0.5)
    assert z.max() > 10, f"the d(e_f - e_r) term should matter: z-scores {z}"


def test_3_detaching_u_breaks_the_scale_gradient():
    """u must stay attached: detached, the gradient w.r.t. the scales s is wrong (means are unaffected-ish)."""
    ag, fd = _chunked(_div_autograd(500, full=False, detach_u=True), _div_fixed_sampling(500))
    diff = ag - fd
    z = diff.mean(0).abs() / (diff.std(0) / CHUNKS ** 0.5)
    rel = diff.mean(0).abs() / fd.mean(0).abs().max()
    assert z[2:].max() > 10 and rel[2:].max() > 0.1, f"detached u should break d/ds: z {z}, rel {rel}"


# ------------------------------------------------------------------------------------ reward and KL
def test_4_reward_surrogate_gradient_equals_autograd_through_reward():
    z, _ = draws(512, 3)
    A = torch.tensor([[1.0, 0.4], [-0.3, 0.7]], dtype=torch.float64)

    def decode(x0):
        return torch.tanh(x0 @ A)

    def reward(img):
        return torch.sin(3 * img[:, 0]) + img[:, 1] ** 2 - 0.5 * img.prod(1)

    m, s = _params()
    direct = torch.cat(torch.autograd.grad(-reward(decode(m + s * z)).mean(), [m, s]))

    m, s = _params()
    img = decode(m + s * z)
    leaf = img.detach().requires_grad_(True)
    grad_r = torch.autograd.grad(reward(leaf).sum(), leaf)[0]          # computed "elsewhere", detached
    surrogate = torch.cat(torch.autograd.grad(losses.reward_surrogate_loss(img, grad_r).mean(), [m, s]))
    torch.testing.assert_close(surrogate, direct, rtol=1e-12, atol=1e-12)
    assert direct.abs().max() > 1e-2


@pytest.mark.parametrize("t", [200, 700])
def test_5_kl_surrogate_matches_integral_kl_gradient(t):
    def autograd_fn(z, eps):
        m, s = _params()
        a, sg = alpha_sigma(t)
        x_t = _x_t(m, s, z, eps, t)
        loss = losses.kl_divergence_loss(gen_eps(x_t, M0, S0, a, sg), ref_eps(x_t, a, sg), x_t, sg)
        return torch.cat(torch.autograd.grad(loss.mean(), [m, s]))

    def kl(m, s, z, eps):
        a, sg = alpha_sigma(t)
        x_t = _x_t(m, s, z, eps, t)
        return (gen_logpdf(x_t, m, s, a, sg) - ref_logpdf(x_t, a, sg)).mean()

    ag, fd = _chunked(autograd_fn, kl, seed=5)
    _assert_match(ag, fd, f"KL at t={t}")
