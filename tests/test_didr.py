"""DIDR as a plug-in: the config keys, the diffused reward proxy's mechanics (what it differentiates and what
it must not), the reward-corrected target, and its wiring into the training step (tests/test_didr_ground_truth.py
checks the numbers against the exact tilted mixture)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distar import diffusion, losses
from distar.config import ConfigError, load_config
from distar.diffused_reward import ddim_denoise, ddim_timesteps, diffused_reward_score
from distar.rewards.base import CallableRewardClient, LocalRewardClient, WeightedReward
from distar.schedules import sd_alphas_cumprod
from distar.train_loop import LoopHooks, build_state
from distar.train_step import generator_loss, train_step
from distar.worlds.gaussian2d import LinearReward

_DIFF = ["loss.reward_mode=diffused", "loss.beta=0.5", "reward.terms=[{name: region}]"]


# ----------------------------------------------------------------------------------------------- config
def test_existing_configs_keep_their_meaning_and_diffused_mode_loads_by_override():
    for name in ("gaussian2d", "digits", "sd15", "sdxl_dmd2"):
        loss = load_config(name).loss
        assert (loss.reward_mode, loss.drp_steps, loss.beta, loss.drp_checkpoint) == ("x0", 1, None, False), name
    cfg = load_config("digits", ["loss.reward_mode=diffused", "loss.divergence=kl", "loss.weighting=uniform",
                                 "loss.drp_steps=2",
                                 "loss.beta=0.25"])
    assert (cfg.loss.reward_mode, cfg.loss.drp_steps, cfg.loss.beta) == ("diffused", 2, 0.25)
    assert cfg.loss.uses_reward and not load_config("gaussian2d").loss.uses_reward
    # beta None reads alpha_rew as 1 / beta (the digits config's 0.3)
    assert load_config("digits", ["loss.reward_mode=diffused"]).loss.beta is None


@pytest.mark.parametrize("overrides, expected", [
    (["loss.drp_steps=0"], r"loss.drp_steps: .*greater than or equal to 1"),
    ([*_DIFF, "loss.beta=0"], r"loss.beta: .*greater than 0"),
    (["loss.beta=0.5"], r"loss.drp_steps, loss.beta and loss.drp_checkpoint belong to loss.reward_mode='diffused'"),
    (["loss.drp_steps=2"], r"belong to loss.reward_mode='diffused'"),
    ([*_DIFF, "loss.divergence=none"], r"needs loss.divergence 'kl' \(DIDR\) or 'score', not 'none'"),
    (["loss.reward_mode=diffused", "reward.terms=[{name: region}]"], r"loss.beta: loss.reward_mode='diffused' needs"),
    (["loss.reward_mode=diffused", "loss.beta=1"], r"reward_mode='diffused' needs at least one entry in reward.terms"),
    ([*_DIFF, "loss.alpha_rew=1", "loss.alpha_control={target: 1}"], r"loss.beta is fixed but loss.alpha_control"),
    (["loss.reward_mode=x1"], r"loss.reward_mode: .*'x0' or 'diffused'"),
])
def test_bad_didr_settings_name_the_field(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("gaussian2d", overrides)


# ----------------------------------------------------------------------------------------------- the proxy
class _TinyEps(nn.Module):
    """A trainable stand-in for the reference UNet: its parameters must never receive a gradient."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x, tau):
        return self.net(torch.cat([x, tau[:, None].to(x.dtype) / 1000], dim=-1))


def _setup():
    torch.manual_seed(0)
    eps_net = _TinyEps().double()
    ac = sd_alphas_cumprod().double()
    x_t = torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor([5, 20, 150, 400, 700, 999])
    decode = lambda x: torch.sin(x) + 0.5 * x                               # a differentiable stand-in for Dec
    reward = lambda img: (img[:, 0] * img[:, 1] - img[:, 1] ** 2)           # a nonlinear r
    return eps_net, ac, x_t, t, decode, reward


def _reward_grad(reward):
    def grad(img):
        i = img.detach().requires_grad_(True)
        return torch.autograd.grad(reward(i).sum(), i)[0]
    return grad


def test_ddim_timesteps_and_one_step_is_tweedie():
    assert [v.tolist() for v in ddim_timesteps(torch.tensor([999, 20, 1]), 4)] == \
        [[999, 20, 1], [749, 15, 0], [499, 10, 0], [249, 5, 0]]
    eps_net, ac, x_t, t, _, _ = _setup()
    a, s = diffusion.alpha_sigma(ac, t)
    with torch.no_grad():
        assert torch.equal(ddim_denoise(eps_net, x_t, t, ac, 1), diffusion.x0_from_eps(x_t, eps_net(x_t, t), a, s))


@pytest.mark.parametrize("steps", [1, 3])
def test_proxy_is_the_gradient_of_the_denoised_reward_over_beta_and_touches_no_parameter(steps):
    eps_net, ac, x_t, t, decode, reward = _setup()
    beta = torch.tensor([0.5, 1, 2, 0.5, 1, 2], dtype=torch.float64)
    s_r = diffused_reward_score(x_t, t, eps_fn=eps_net, decode=decode, reward_grad=_reward_grad(reward),
                                alphas_cumprod=ac, steps=steps, beta=beta)
    assert all(p.grad is None for p in eps_net.parameters())
    assert not s_r.requires_grad
    x = x_t.clone().requires_grad_(True)
    want = torch.autograd.grad(reward(decode(ddim_denoise(eps_net, x, t, ac, steps))).sum(), x)[0] / beta[:, None]
    torch.testing.assert_close(s_r, want)
    # finite differences of r(Dec(D_K(x))) / beta along a direction, independent of autograd
    v, h = torch.randn_like(x_t), 1e-6
    f = lambda y: reward(decode(ddim_denoise(eps_net, y, t, ac, steps))) / beta
    with torch.no_grad():
        fd = (f(x_t + h * v) - f(x_t - h * v)) / (2 * h)
    torch.testing.assert_close((s_r * v).sum(1), fd, rtol=1e-5, atol=1e-7)


def test_checkpointing_through_the_steps_changes_nothing_but_memory():
    eps_net, ac, x_t, t, decode, reward = _setup()
    kw = dict(eps_fn=eps_net, decode=decode, reward_grad=_reward_grad(reward), alphas_cumprod=ac, steps=3, beta=0.7)
    torch.testing.assert_close(diffused_reward_score(x_t, t, checkpoint=True, **kw),
                               diffused_reward_score(x_t, t, **kw), rtol=0, atol=0)
    assert all(p.grad is None for p in eps_net.parameters())


def test_reward_corrected_target_keeps_the_reference_graph_and_detaches_the_correction():
    x = torch.randn(4, 3, requires_grad=True)
    e_ref = 2 * x
    s_r = (x ** 2).detach().requires_grad_(True)
    sigma = torch.tensor([0.1, 0.5, 0.9, 1.0])
    tgt = losses.reward_corrected_eps(e_ref, sigma, s_r)
    torch.testing.assert_close(tgt, e_ref - sigma[:, None] * s_r)
    tgt.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0)) and s_r.grad is None
    with pytest.raises(ValueError, match="same shape"):
        losses.reward_corrected_eps(e_ref, sigma, s_r[:, :2])


# ----------------------------------------------------------------------------------------------- the step
def _state(*overrides):
    cfg = load_config("gaussian2d", ["loss.divergence=kl", *overrides])
    torch.manual_seed(0)
    return cfg, build_state(cfg, torch.device("cpu"), LoopHooks())


def _gen_grads(cfg, st, reward, prompts=("class 1",) * 16):
    fake = st.fake_score.requires_grad_(False)
    st.generator.zero_grad(set_to_none=True)
    loss, metrics = generator_loss(st.bundle, st.generator, fake, st.bundle.encode_prompts(list(prompts)),
                                   list(prompts), cfg.loss, reward, torch.Generator().manual_seed(3))
    loss.backward()
    fake.requires_grad_(True)
    return loss.detach(), [p.grad.clone() for p in st.generator.parameters()], metrics


@pytest.mark.parametrize("divergence", ["kl", "score"])
def test_zero_reward_gradient_gives_exactly_the_plain_divergence(divergence, one_thread):
    """The x0 term is off in diffused mode and a flat reward corrects nothing: the same loss and gradient."""
    zero = CallableRewardClient(lambda img, p: (img.sum(1) * 0, torch.zeros_like(img)))
    cfg_d, st = _state(*_DIFF, f"loss.divergence={divergence}")
    loss_d, grads_d, m = _gen_grads(cfg_d, st, zero)
    cfg_0, st = _state(f"loss.divergence={divergence}")
    loss_0, grads_0, _ = _gen_grads(cfg_0, st, None)
    torch.testing.assert_close(loss_d, loss_0)
    for a, b in zip(grads_d, grads_0):
        torch.testing.assert_close(a, b)
    assert "reward/total" not in m and float(m["reward/beta"]) == 0.5 and float(m["reward/drp_score_norm"]) == 0


def test_diffused_step_runs_with_metrics_and_beta_from_alpha_rew(one_thread):
    client = LocalRewardClient(WeightedReward([("linear", 1.0, LinearReward((1.0, 0.5)))]))
    cfg, st = _state("loss.reward_mode=diffused", "loss.drp_steps=2", "loss.alpha_rew=4",
                     "reward.terms=[{name: region}]")
    loss_d, grads_d, m = _gen_grads(cfg, st, client)
    assert float(m["reward/beta"]) == 0.25 and float(m["reward/drp_score_norm"]) > 0
    for key in ("reward/drp_total", "reward/drp_linear", "gen/target_gap", "gen/score_gap"):
        assert torch.isfinite(m[key]), key
    m2 = train_step(st, ["class 0", "class 2"] * 8, cfg.loss, fake_steps=1, grad_clip=10.0, reward=client,
                    rng=torch.Generator().manual_seed(0))
    assert st.step == 1 and torch.isfinite(m2["gen/loss"])
    with pytest.raises(ValueError, match="reward_mode='diffused' but no reward client"):
        _gen_grads(cfg, st, None)
    with pytest.raises(ValueError, match="reads beta as 1 / alpha_rew, but this step's alpha_rew is 0"):
        fake = st.fake_score
        generator_loss(st.bundle, st.generator, fake, st.bundle.encode_prompts(["class 0"]), ["class 0"], cfg.loss,
                       client, torch.Generator().manual_seed(0), alpha_rew=0.0)
