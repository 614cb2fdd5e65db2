"""Schedule and conversion checks, with regression numbers for SD's schedule (catches silent drift)."""
import torch

from distar import diffusion
from distar.schedules import sd_alphas_cumprod


def test_sd_schedule_from_diffusers_matches_closed_form_and_known_values():
    ac = sd_alphas_cumprod()
    assert ac.shape == (1000,)
    torch.testing.assert_close(ac, diffusion.scaled_linear_alphas_cumprod(), rtol=1e-5, atol=1e-7)
    # regression values of SD/SDXL's scaled_linear schedule
    assert abs(float(ac[0]) - 0.99915) < 1e-5
    assert abs(float(ac[399]) - 0.42606) < 1e-4
    assert abs(float(ac[999]) - 0.00466) < 1e-5


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    a, s = diffusion.alpha_sigma(sd_alphas_cumprod(), t)
    x_t = diffusion.add_noise(x0, eps, a, s)
    torch.testing.assert_close(diffusion.x0_from_eps(x_t, eps, a, s), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, x0, a, s), eps, rtol=1e-4, atol=1e-4)
    score = diffusion.score_from_eps(eps, s)
    torch.testing.assert_close(diffusion.eps_from_score(score, s), eps)
    v = a.view(-1, 1, 1, 1) * eps - s.view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(diffusion.eps_from_v(x_t, v, a, s), eps, rtol=1e-4, atol=1e-4)


def test_cfg_limits():
    u, c = torch.randn(2, 5), torch.randn(2, 5)
    torch.testing.assert_close(diffusion.classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(diffusion.classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(diffusion.classifier_free_guidance(u, c, 3.0), u + 3 * (c - u))


def test_timestep_sampling_is_seeded_and_inclusive():
    a = diffusion.sample_timesteps(5000, 20, 980, torch.Generator().manual_seed(1))
    b = diffusion.sample_timesteps(5000, 20, 980, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() == 20 and a.max() == 980
