"""DIDR against the exact answer: in the 2-D world a linear reward r(x) = w·x tilts the GMM reference into
another GMM (`gaussian2d.tilt_linear`), so p*_t and its score are closed-form.

(a) the diffused reward proxy s_r (`diffused_reward.diffused_reward_score`, K DDIM steps) against the exact
    s*_t - s_ref,t, per t and per K;
(b) a generator trained with loss.reward_mode='diffused' (KL, i.e. DIDR) lands on the exact p*_0;
(c) the same tilt asked of reward_mode='x0' + integral KL at alpha_rew = 1/beta, measured.

The generator of (b)/(c) starts exactly at the reference: x0 = Phi(z + delta_theta(z)), Phi the reference's own
deterministic sampler (exact GMM scores, `SAMPLER_STEPS` DDIM steps from t=999), delta an MLP whose output starts
at zero. A tilt of this reference (mode weights and a shift in y) is then a warp of the noise, so the family
contains p*_0 and reverse-KL training does not start by dropping a mode. The fake score is the world's own
network, learned online by `train_step`, as in real runs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distar import diffusion
from distar.config import load_config
from distar.diffused_reward import ddim_denoise, diffused_reward_score
from distar.ema import EMA
from distar.rewards.base import LocalRewardClient, WeightedReward
from distar.train_step import TrainState, build_optimizer, fake_update, train_step
from distar.worlds.gaussian2d import (Gaussian2DBundle, LinearReward, energy_distance, gmm_eps, sample_gmm,
                                      tilt_linear, tilted_diffused_reward_score)

W = (0.125, 1.0)     # w/beta = (0.25, 2): class 0's right mode goes from 50% to 73%, both modes move up 0.125 in y
BETA = 0.5
KS = (1, 2, 4, 8)
TS = (20, 100, 250, 500, 750, 980)
SAMPLER_STEPS = 10
EMA_DECAY = 0.98


def _bundle(dtype=torch.float64) -> Gaussian2DBundle:
    b = Gaussian2DBundle(load_config("gaussian2d").model, torch.device("cpu"))   # guidance 1: the exact mixture
    b.alphas_cumprod, b.means, b.all_means = (v.to(dtype) for v in (b.alphas_cumprod, b.means, b.all_means))
    return b


def _tilted(b):
    return tilt_linear(b.means[0], b.std, torch.tensor(W, dtype=b.means.dtype), BETA)


# ----------------------------------------------------------------------------------------------- (a) the proxy
def proxy_errors(n: int = 2000, seed: int = 0) -> dict[tuple[int, int], float]:
    """Relative RMS error ||s_r(proxy) - s_r(exact)|| / ||s_r(exact)|| over x_t ~ p*_t, class 0, per (t, K)."""
    b = _bundle()
    g = torch.Generator().manual_seed(seed)
    cls = torch.zeros(n, dtype=torch.long)
    w = torch.tensor(W, dtype=torch.float64)
    x0 = sample_gmm(*_tilted(b), b.std, n, g)
    out = {}
    for t in TS:
        tt = torch.full((n,), t)
        a, s = diffusion.alpha_sigma(b.alphas_cumprod, tt)
        x_t = diffusion.add_noise(x0, torch.randn(n, 2, generator=g, dtype=torch.float64), a, s)
        exact = tilted_diffused_reward_score(x_t, a, s, b.means[cls], b.std, w, BETA)
        for k in KS:
            proxy = diffused_reward_score(x_t, tt, eps_fn=lambda x, tau: b.eps_ref(x, tau, cls), decode=lambda x: x,
                                          reward_grad=lambda img: w.expand_as(img).clone(),
                                          alphas_cumprod=b.alphas_cumprod, steps=k, beta=BETA)
            out[t, k] = float((proxy - exact).pow(2).sum(1).mean().sqrt() / exact.pow(2).sum(1).mean().sqrt())
    return out


@pytest.fixture(scope="module")
def errors():
    torch.set_num_threads(1)
    return proxy_errors()


def test_proxy_is_exact_where_the_posterior_is_one_gaussian_mode(errors):
    # small t: x_0 | x_t is one Gaussian mode, whose log-MGF of a linear reward is linear in its mean, so
    # K = 1 (Tweedie) is exact; a wrong sign gives 2, a missing 1/beta gives 1 - beta, skipping the denoiser's
    # Jacobian (grad at x̂_0 taken as grad at x_t) gives ~0.25 at t = 20 and ~0.8 at t = 100
    assert errors[20, 1] < 1e-3 and errors[100, 1] < 1e-3, errors


def test_more_steps_move_the_proxy_towards_the_flow_map_not_the_posterior(errors):
    # With K > 1 the proxy differentiates r through the deterministic (probability-flow) map, whose Jacobian
    # s / sqrt(alpha^2 s^2 + sigma^2) is not the posterior mean's alpha s^2 / (alpha^2 s^2 + sigma^2): the error
    # grows with K at every t here, and stays small only where sigma_t << alpha_t * mode_std.
    for t in (20, 100):
        errs = [errors[t, k] for k in KS]
        assert errs == sorted(errs), (t, errs)
    b = _bundle()
    a, s = diffusion.alpha_sigma(b.alphas_cumprod, torch.tensor([20]))
    limit = float(torch.sqrt(a ** 2 * b.std ** 2 + s ** 2) / (a * b.std) - 1)   # K -> infinity, one mode
    assert 0.05 < errors[20, 8] < limit * 1.05, (errors[20, 8], limit)
    for k in KS:                                                                # and every K improves as t -> 0
        assert errors[20, k] < errors[100, k] < errors[500, k], errors
    assert errors[20, 2] < 0.1


# ----------------------------------------------------------------------------------------------- (b), (c)
class WarpedReference(nn.Module):
    """x0 = Phi(z + delta(z, class)): Phi the reference's deterministic sampler, delta an MLP starting at 0."""

    def __init__(self, bundle: Gaussian2DBundle, hidden: int = 32):
        super().__init__()
        self.bundle = bundle
        self.delta = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.delta[-1].weight)
        nn.init.zeros_(self.delta[-1].bias)

    def forward(self, z: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        x_t = z + self.delta(z)
        t = torch.full((len(z),), 999, dtype=torch.long)
        b = self.bundle
        means = b.means[cls]                       # the class's own mixture (guidance 1), without the null branch

        def eps(x, tau):
            alpha, sigma = diffusion.alpha_sigma(b.alphas_cumprod, tau)
            return gmm_eps(x, alpha.to(x.dtype), sigma.to(x.dtype), means, b.std)
        return ddim_denoise(eps, x_t, t, b.alphas_cumprod, SAMPLER_STEPS)


def train_2d(mode: str, steps: int = 300, seed: int = 0, batch: int = 128, warmup: int = 200):
    """Train on class 0 with the linear reward; returns the bundle and the trained generator."""
    over = ["loss.divergence=kl", "reward.terms=[{name: region}]", "train.fake_steps=2"]
    over += [f"loss.reward_mode=diffused", f"loss.beta={BETA}"] if mode == "diffused" else [f"loss.alpha_rew={1 / BETA}"]
    cfg = load_config("gaussian2d", over)
    torch.manual_seed(seed)
    b = _bundle(torch.float32)
    b.generator = WarpedReference(b)
    st = TrainState(bundle=b, generator=b.generator, fake_score=b.fake_score,
                    generator_opt=build_optimizer(b.generator, 3e-3, (0.0, 0.999), 0.0),
                    fake_opt=build_optimizer(b.fake_score, 1e-3, (0.0, 0.999), 0.0), ema=EMA(b.generator, EMA_DECAY))
    client = LocalRewardClient(WeightedReward([("linear", 1.0, LinearReward(W))]))
    rng = torch.Generator().manual_seed(seed + 1)
    prompts = ["class 0"] * batch
    cond = b.encode_prompts(prompts)
    for _ in range(warmup):
        fake_update(st, cond, batch, cfg.loss, 10.0, rng)
    for _ in range(steps):
        train_step(st, prompts, cfg.loss, fake_steps=cfg.train.fake_steps, grad_clip=10.0, reward=client, rng=rng)
    st.ema.copy_to(b.generator)                   # evaluate the averaged generator, as runs export it
    return b


def distances(b, n: int = 4000, seed: int = 7) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    m, lw = (v.float() for v in _tilted(b))
    with torch.no_grad():
        x = b.generator(b.sample_noise(n, g), torch.zeros(n, dtype=torch.long)).float()
    star, star2 = sample_gmm(m, lw, b.std, n, g), sample_gmm(m, lw, b.std, n, g)
    ref = b.reference_samples(torch.zeros(n, dtype=torch.long), g).float()
    return {"ed_gen": float(energy_distance(x, star)), "floor": float(energy_distance(star2, star)),
            "ed_ref": float(energy_distance(ref, star)), "right": float((x[:, 0] > 0).float().mean()),
            "right_star": float(torch.softmax(lw, -1)[1]), "mean_y": float(x[:, 1].mean()),
            "mean_y_star": float(m[0, 1])}


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return {mode: distances(train_2d(mode)) for mode in ("diffused", "x0")}


def test_didr_lands_on_the_tilted_distribution(trained):
    d = trained["diffused"]
    # the reference is 0.125 below p*_0 in y and has 50% instead of 73% right-mode mass (ED 0.43); a wrong
    # sign moves y and the mass the other way, a missing 1/beta halves the y shift (to -2.94)
    assert abs(d["mean_y"] - d["mean_y_star"]) < 0.025, d
    assert 0.55 < d["right"] < 0.8, d
    # ED: the two-sample floor at n = 4000 is ~5e-4; what remains (0.04-0.18 over seeds 0-2, and 0.03-0.06 with
    # the exact s_r in place of the proxy) is the mode weights' slow, noisy convergence under reverse KL with a
    # learned fake score (right-mode mass 0.58-0.67 for 0.73), not the proxy: y is right to 0.01
    assert d["ed_gen"] < 0.5 * d["ed_ref"], d


def test_x0_reward_with_integral_kl_misses_the_tilt_that_didr_hits(trained):
    # The same tilt asked of reward_mode x0 (alpha_rew = 1/beta) with the integral KL over t in [20, 980]: the
    # KL at high noise barely resists a shift, so the linear reward drags the generator far past p*_0
    d, x = trained["diffused"], trained["x0"]
    assert x["ed_gen"] > x["ed_ref"] > 3 * d["ed_gen"], (d, x)
    assert x["mean_y"] - x["mean_y_star"] > 0.5, x
