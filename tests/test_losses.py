"""Unit properties of the public losses in distar.losses (shapes, limits, where gradients flow)."""
import pytest
import torch

from distar import losses


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_losses_return_one_value_per_sample_over_all_dims():
    ef, er, eps = _rand(3, 4, 5, 5, seed=1), _rand(3, 4, 5, 5, seed=2), _rand(3, 4, 5, 5, seed=3)
    for full in (False, True):
        for distance in ("pseudo_huber", "l2"):
            assert losses.score_divergence_loss(ef, er, eps, c=0.3, distance=distance, full=full).shape == (3,)
    assert losses.kl_divergence_loss(ef, er, eps, torch.ones(3)).shape == (3,)
    assert losses.reward_surrogate_loss(ef, er).shape == (3,)
    assert losses.fake_score_loss(ef, eps).shape == (3,)
    # per-sample means one sample's value does not depend on another's
    a = losses.score_divergence_loss(ef, er, eps, c=0.3)
    ef2 = ef.clone()
    ef2[1] += 1.0
    b = losses.score_divergence_loss(ef2, er, eps, c=0.3)
    assert torch.allclose(a[[0, 2]], b[[0, 2]]) and not torch.allclose(a[1], b[1])


def test_score_divergence_values_against_formula():
    ef, er, eps = _rand(2, 6, seed=4), _rand(2, 6, seed=5), _rand(2, 6, seed=6)
    c = 0.7
    y = ef - er
    root = torch.sqrt((y ** 2).sum(1) + c * c)
    expect = -((y / root[:, None]) * (ef - eps)).sum(1)
    torch.testing.assert_close(losses.score_divergence_loss(ef, er, eps, c=c), expect)
    torch.testing.assert_close(losses.score_divergence_loss(ef, er, eps, c=c, full=True), expect + root - c)
    l2 = -((2 * y) * (ef - eps)).sum(1)
    torch.testing.assert_close(losses.score_divergence_loss(ef, er, eps, c=c, distance="l2"), l2)
    torch.testing.assert_close(losses.score_divergence_loss(ef, er, eps, c=c, distance="l2", full=True),
                               l2 + (y ** 2).sum(1))


def test_pseudo_huber_limits():
    y = _rand(4, 10, seed=7) * 1e-4
    c = 1.0  # small |y|: ~ |y|^2 / 2c
    torch.testing.assert_close(losses.pseudo_huber(y, c), (y ** 2).sum(1) / (2 * c), rtol=1e-6, atol=0)
    y = _rand(4, 10, seed=8) * 1e4  # large |y|: ~ |y| - c
    torch.testing.assert_close(losses.pseudo_huber(y, 1.0), y.norm(dim=1) - 1.0, rtol=1e-6, atol=0)


def test_divergence_zero_gap_gives_zero_loss_and_gradient_flows_into_both_eps_inputs():
    ef = _rand(2, 3, seed=9).requires_grad_(True)
    er = ef.detach().clone().requires_grad_(True)
    eps = _rand(2, 3, seed=10)
    loss = losses.score_divergence_loss(ef, er, eps, c=0.5)
    assert torch.allclose(loss, torch.zeros(2, dtype=torch.float64))
    loss.sum().backward()
    # nothing detached: at zero gap u = 0 but du/d(eps_fake) = I / c, so the gradient is non-zero
    assert ef.grad.abs().sum() > 0 and er.grad.abs().sum() > 0


def test_kl_and_reward_surrogates_stop_gradient_of_their_direction():
    ef = _rand(2, 3, seed=11).requires_grad_(True)
    er = _rand(2, 3, seed=12).requires_grad_(True)
    x_t = _rand(2, 3, seed=13).requires_grad_(True)
    losses.kl_divergence_loss(ef, er, x_t, 0.5).sum().backward()
    assert ef.grad is None and er.grad is None
    torch.testing.assert_close(x_t.grad, -(ef - er).detach() / 0.5)
    g = _rand(2, 3, seed=14).requires_grad_(True)
    img = _rand(2, 3, seed=15).requires_grad_(True)
    losses.reward_surrogate_loss(img, g).sum().backward()
    assert g.grad is None
    torch.testing.assert_close(img.grad, -g.detach())


def test_fake_score_loss_is_zero_at_the_truth_and_mean_over_dims():
    eps = _rand(3, 8, seed=16)
    assert torch.all(losses.fake_score_loss(eps, eps) == 0)
    torch.testing.assert_close(losses.fake_score_loss(eps + 2.0, eps), torch.full((3,), 4.0, dtype=torch.float32))


def test_bad_arguments_name_what_is_wrong():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="same shape"):
        losses.score_divergence_loss(a, b, a, c=1.0)
    with pytest.raises(ValueError, match="distance 'l1'"):
        losses.score_divergence_loss(a, a, a, c=1.0, distance="l1")
    with pytest.raises(ValueError, match="c must be > 0"):
        losses.score_divergence_loss(a, a, a, c=0.0)
    with pytest.raises(ValueError, match="reward_grad"):
        losses.reward_surrogate_loss(a, b)
