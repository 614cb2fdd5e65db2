"""Calibration the user can reason about: c_scale, the score-unit weighting (an exact identity), and the
score-gap metrics logged next to c (noise buckets whose interval averages stay exact with empty buckets)."""
import math

import pytest
import torch

from distar import diffusion, losses
from distar.config import ConfigError, load_config
from distar.train_step import GAP_T_EDGES, _masked_quantile, finalize_interval_metrics, gap_metrics


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- c_scale
def test_effective_c_per_sample_is_c_itself_and_per_dim_scales_with_sqrt_d():
    assert losses.effective_c(0.3) == 0.3 and isinstance(losses.effective_c(0.3, "per_sample", 4096), float)
    assert losses.effective_c(0.3, "per_dim", 16 * 16) == pytest.approx(0.3 * 16)
    assert losses.effective_c(0.3, "per_dim", (4, 128, 128)) == pytest.approx(0.3 * math.sqrt(4 * 128 * 128))
    with pytest.raises(ValueError, match="c_scale"):
        losses.effective_c(0.3, "per_pixel", 4)
    with pytest.raises(ValueError, match="needs sigma"):
        losses.effective_c(0.3, weighting="score")


def test_per_dim_c_means_the_same_regime_at_any_resolution():
    """A gap of per-element RMS r sits at ||y|| / c_eff ~ r / c, and the pseudo-Huber direction u = d'(y) has
    the same norm ||y|| / sqrt(||y||^2 + c_eff^2), at 16x16x1 and at 128x128x4 alike; with per_sample the
    per_sample c tuned to the same regime at 16x16 is in the unit-direction regime at 128x128x4."""
    r = 0.2
    ratio, u_norm = {}, {}
    for scale, c in (("per_sample", 0.4 * 16), ("per_dim", 0.4)):  # both: gap / c = 1/2 at 16x16x1
        for shape in ((1, 16, 16), (4, 128, 128)):
            y = r * _rand(2, *shape, seed=1)
            c_eff = losses.effective_c(c, scale, shape)
            gap = y.flatten(1).norm(dim=1)
            ratio[scale, shape] = float((gap / c_eff).mean())
            u_norm[scale, shape] = float((gap / torch.sqrt(gap ** 2 + c_eff ** 2)).mean())
    assert ratio["per_dim", (1, 16, 16)] == pytest.approx(r / 0.4, rel=0.1)
    assert ratio["per_dim", (4, 128, 128)] == pytest.approx(r / 0.4, rel=0.01)
    assert u_norm["per_dim", (1, 16, 16)] == pytest.approx(u_norm["per_dim", (4, 128, 128)], rel=0.05)
    assert u_norm["per_dim", (4, 128, 128)] == pytest.approx(0.5 / math.sqrt(1.25), rel=0.01)   # ratio 1/2
    assert ratio["per_sample", (4, 128, 128)] > 10 * ratio["per_sample", (1, 16, 16)]         # sqrt(256) = 16
    assert u_norm["per_sample", (1, 16, 16)] == pytest.approx(u_norm["per_dim", (1, 16, 16)], rel=1e-12)
    assert u_norm["per_sample", (4, 128, 128)] > 0.99      # ratio ~8: u is nearly a unit vector


def test_score_divergence_accepts_a_per_sample_c_and_keeps_the_float_path():
    ef, er, eps = _rand(3, 2, 4, seed=2), _rand(3, 2, 4, seed=3), _rand(3, 2, 4, seed=4)
    cs = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    for full in (False, True):
        per = losses.score_divergence_loss(ef, er, eps, c=cs, full=full)
        one_by_one = torch.cat([losses.score_divergence_loss(ef[i:i + 1], er[i:i + 1], eps[i:i + 1], c=float(cs[i]),
                                                             full=full) for i in range(3)])
        torch.testing.assert_close(per, one_by_one, rtol=1e-12, atol=1e-12)
        # a 0-d tensor and a constant [B] tensor agree with the float
        same = losses.score_divergence_loss(ef, er, eps, c=0.7, full=full)
        torch.testing.assert_close(losses.score_divergence_loss(ef, er, eps, c=torch.tensor(0.7), full=full), same)
        torch.testing.assert_close(losses.score_divergence_loss(ef, er, eps, c=torch.full((3,), 0.7), full=full), same)
    torch.testing.assert_close(losses.pseudo_huber(ef, cs), torch.stack([losses.pseudo_huber(ef[i:i + 1], float(cs[i]))[0]
                                                                         for i in range(3)]))
    with pytest.raises(ValueError, match=r"per-sample tensor \[B=3\]"):
        losses.score_divergence_loss(ef, er, eps, c=torch.ones(2))
    with pytest.raises(ValueError, match="c must be > 0"):
        losses.score_divergence_loss(ef, er, eps, c=0.0)


# ----------------------------------------------------------------------------------------------- score weighting
T = torch.tensor([20, 150, 400, 700, 980])
C = 0.8


def _generator_problem(seed=0):
    """x0 [B, 2, 3] attached to a leaf; frozen nonlinear 'networks' for e_fake and e_ref; sigma from SD's schedule."""
    alpha, sigma = diffusion.alpha_sigma(diffusion.scaled_linear_alphas_cumprod().double(), T)
    x0 = _rand(len(T), 2, 3, seed=seed).requires_grad_(True)
    eps = _rand(len(T), 2, 3, seed=seed + 1)
    w, b = _rand(2, 3, seed=seed + 2), _rand(2, 3, seed=seed + 3)
    x_t = diffusion.add_noise(x0, eps, alpha, sigma)
    e_fake = torch.tanh(w * x_t + b)                                          # any smooth function of x_t
    s2 = sigma[:, None, None] ** 2
    e_ref = sigma[:, None, None] * (x_t - 0.3 * alpha[:, None, None]) / (0.5 * alpha[:, None, None] ** 2 + s2)
    return x0, x_t, eps, e_fake, e_ref, alpha, sigma


def _score_units_surrogate(x_t, x0, e_fake, e_ref, alpha, sigma, c, full):
    """The pseudo-Huber surrogate written directly in score units, with a constant c:
    s = -eps_hat / sigma_t, s_eps = grad_{x_t} log q(x_t | x0) (by autograd), y_s = s_f - s_r,
    u_s = y_s / sqrt(|y_s|^2 + c^2), L_s = -<u_s, s_f - s_eps> (+ sqrt(|y_s|^2 + c^2) - c when full)."""
    sb = sigma[:, None, None]
    s_f, s_r = -e_fake / sb, -e_ref / sb
    xt = x_t.detach().requires_grad_(True)
    log_q = (-(xt - alpha[:, None, None] * x0.detach()) ** 2 / (2 * sb ** 2)).sum()
    s_eps = torch.autograd.grad(log_q, xt)[0]            # = -eps / sigma_t, the conditional score
    y_s = s_f - s_r
    root = torch.sqrt(y_s.pow(2).flatten(1).sum(1) + c * c)
    u_s = y_s / root[:, None, None]
    loss = -(u_s * (s_f - s_eps)).flatten(1).sum(1)
    return loss + (root - c) if full else loss


def _eps_units_with_score_weighting(e_fake, e_ref, eps, alpha, sigma, c, full, *, c_wiring="score",
                                    lam_kind="score"):
    c_t = losses.effective_c(c, "per_sample", e_fake[0].numel(), sigma=sigma, weighting=c_wiring)
    lam = diffusion.time_weight(lam_kind, alpha, sigma)
    return lam * losses.score_divergence_loss(e_fake, e_ref, eps, c=c_t, full=full)


@pytest.mark.parametrize("full", [False, True])
def test_score_weighting_is_the_score_unit_pseudo_huber_value_and_gradient(full):
    x0, x_t, eps, e_fake, e_ref, alpha, sigma = _generator_problem()
    ours = _eps_units_with_score_weighting(e_fake, e_ref, eps, alpha, sigma, C, full)
    theirs = _score_units_surrogate(x_t, x0, e_fake, e_ref, alpha, sigma, C, full)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.sum(), x0, retain_graph=True)[0]
    g_theirs = torch.autograd.grad(theirs.sum(), x0, retain_graph=True)[0]
    assert g_ours.abs().max() > 1e-2
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)

    # wired wrong, it is not the identity: the same c at every t, or the wrong lambda(t)
    for wrong in (dict(c_wiring="uniform"), dict(lam_kind="uniform"), dict(lam_kind="sigma")):
        bad = _eps_units_with_score_weighting(e_fake, e_ref, eps, alpha, sigma, C, full, **wrong)
        assert (bad - theirs).abs().max() > 1e-2 * theirs.abs().max(), wrong
        g_bad = torch.autograd.grad(bad.sum(), x0, retain_graph=True)[0]
        assert (g_bad - g_theirs).abs().max() > 1e-2 * g_theirs.abs().max(), wrong


def test_score_weighting_with_per_dim_c_is_the_score_unit_loss_with_c_sqrt_d():
    x0, x_t, eps, e_fake, e_ref, alpha, sigma = _generator_problem(seed=5)
    d = e_fake[0].numel()
    c_t = losses.effective_c(C, "per_dim", e_fake.shape[1:], sigma=sigma, weighting="score")
    torch.testing.assert_close(c_t, C * math.sqrt(d) * sigma)
    ours = diffusion.time_weight("score", alpha, sigma) * losses.score_divergence_loss(e_fake, e_ref, eps, c=c_t)
    theirs = _score_units_surrogate(x_t, x0, e_fake, e_ref, alpha, sigma, C * math.sqrt(d), False)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_config_c_scale_and_score_weighting():
    cfg = load_config("gaussian2d", ["loss.c_scale=per_dim", "loss.weighting=score"])
    assert cfg.loss.c_scale == "per_dim" and cfg.loss.weighting == "score"
    with pytest.raises(ConfigError, match="loss.c_scale"):
        load_config("gaussian2d", ["loss.c_scale=per_pixel"])
    for bad in (["loss.divergence=kl"], ["loss.distance=l2"]):
        with pytest.raises(ConfigError, match="loss.weighting='score' .* needs loss.divergence='score'"):
            load_config("gaussian2d", ["loss.weighting=score", *bad])


# ----------------------------------------------------------------------------------------------- gap metrics
def test_masked_quantile_matches_torch_quantile_and_is_zero_for_an_empty_row():
    v = torch.rand(50, generator=torch.Generator().manual_seed(0))
    mask = torch.stack([torch.arange(50) < 17, torch.arange(50) % 3 == 0, torch.zeros(50, dtype=torch.bool),
                        torch.arange(50) == 4])
    for q in (0.5, 0.9, 0.0, 1.0):
        got = _masked_quantile(v, mask, q)
        for k in (0, 1, 3):
            torch.testing.assert_close(got[k], torch.quantile(v[mask[k]], q))
        assert got[2] == 0


def _buckets():
    return [f"gap/t{lo}-{hi}" for lo, hi in zip(GAP_T_EDGES[:-1], GAP_T_EDGES[1:])]


def test_gap_metrics_have_fixed_nan_free_keys_and_finalize_to_exact_interval_values():
    """Three steps on two 'ranks', some buckets empty in some steps and one empty throughout; averaged the way
    the loop (sum / steps) and the DDP reduction (mean over ranks) average them, then finalised."""
    g = torch.Generator().manual_seed(1)
    steps = []
    for ts in ([10, 20, 300, 310, 320, 999], [260, 270, 280, 330, 990, 995], [100, 200, 240, 251, 499, 300]):
        t = torch.tensor(ts)
        gap = torch.rand(len(ts), generator=g) * 3
        steps.append((t, gap))
    keys = None
    logged = []
    for t, gap in steps:
        m = gap_metrics(gap, t, 0.5)
        assert keys is None or set(m) == keys         # same keys every step, whatever buckets are empty
        keys = set(m)
        assert all(torch.isfinite(v) for v in m.values())
        logged.append(m)
    rank_means = [{k: sum(m[k] for m in half) / len(half) for k in keys} for half in (logged[:2], logged[2:])]
    interval = {k: float(sum(r[k] for r in rank_means) / 2) for k in keys}  # unequal steps per 'rank' on purpose
    # what it must equal: sum over steps of n * quantile / sum of n, each weighted like the averaging above
    weights = [0.25, 0.25, 0.5]
    final = finalize_interval_metrics(interval)
    for name, (lo, hi) in zip(_buckets(), zip(GAP_T_EDGES[:-1], GAP_T_EDGES[1:])):
        for q_name, q in (("p50", 0.5), ("p90", 0.9)):
            num = den = 0.0
            for w, (t, gap) in zip(weights, steps):
                sel = gap[(t >= lo) & (t < hi)]
                if len(sel):
                    num += w * len(sel) * float(torch.quantile(sel, q))
                    den += w * len(sel)
            if den == 0:
                assert f"{name}_{q_name}" not in final
            else:
                assert final[f"{name}_{q_name}"] == pytest.approx(num / den, rel=1e-6)
        assert not any(k.endswith("_wsum") for k in final)
    # sanity: the data has buckets empty in some steps (t0-250 in step 2, t750-1000 in step 3) and one empty
    # throughout (t500-750), which is omitted rather than reported as 0 or NaN
    assert {"gap/t0-250_p50", "gap/t250-500_p90", "gap/t750-1000_p50"} <= set(final)
    assert "gap/t500-750_p50" not in final and final["gap/t500-750_n"] == 0


def test_gap_metrics_regime_keys():
    gap = torch.tensor([0.01, 0.02, 5.0, 10.0])
    t = torch.tensor([100, 300, 600, 900])
    m = gap_metrics(gap, t, 0.1)
    assert float(m["gen/c_eff"]) == pytest.approx(0.1)
    assert float(m["gen/gap_over_c"]) == pytest.approx((0.1 + 0.2 + 50 + 100) / 4)
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0])
    m = gap_metrics(gap, t, 0.1 * sigma)                   # score weighting: per-sample c_t
    assert float(m["gen/c_eff"]) == pytest.approx(0.1 * 7.5 / 4)
    assert float(m["gen/gap_over_c"]) == pytest.approx(float((gap / (0.1 * sigma)).mean()))
    assert float(m["gap/t750-1000_n"]) == 1 and float(m["gap/t0-250_p50_wsum"]) == pytest.approx(0.01)


@pytest.mark.parametrize("overrides", [[], ["loss.c_scale=per_dim", "loss.weighting=score"]])
def test_generator_loss_logs_the_gap_next_to_c(overrides):
    from distar.train_loop import LoopHooks, build_state
    from distar.train_step import generator_loss

    cfg = load_config("gaussian2d", overrides)
    torch.manual_seed(0)
    st = build_state(cfg, torch.device("cpu"), LoopHooks())
    prompts = ["class 0", "class 3"] * 32
    _, m = generator_loss(st.bundle, st.generator, st.fake_score.requires_grad_(False),
                          st.bundle.encode_prompts(prompts), prompts, cfg.loss, None, torch.Generator().manual_seed(0))
    assert sum(float(m[f"{b}_n"]) for b in _buckets()) == len(prompts)
    assert all(torch.isfinite(v) for v in m.values())
    c_eff = float(m["gen/c_eff"])
    if overrides:   # c * sqrt(D=2) * sigma_t, sigma_t in (0.13, 1)
        assert 0.1 * math.sqrt(2) * 0.13 < c_eff < 0.1 * math.sqrt(2)
    else:
        assert c_eff == pytest.approx(0.1)
    final = finalize_interval_metrics({k: float(v) for k, v in m.items()})
    for b in _buckets():
        if final[f"{b}_n"] > 0:
            assert 0 < final[f"{b}_p50"] <= final[f"{b}_p90"]
