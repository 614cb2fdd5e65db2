"""The shared training step on the 2-D world: where gradients go, what each update touches, reward plumbing."""

import pytest
import torch

from distar.config import load_config
from distar.ema import EMA
from distar.rewards.base import CallableRewardClient, LocalRewardClient, WeightedReward
from distar.train_loop import LoopHooks, build_state
from distar.train_step import fake_update, generator_loss, train_step
from distar.worlds.gaussian2d import RegionReward


def _state(*overrides):
    cfg = load_config("gaussian2d", ["loss.alpha_rew=0.5", "reward.terms=[{name: region}]", *overrides])
    torch.manual_seed(0)
    return cfg, build_state(cfg, torch.device("cpu"), LoopHooks())


def _params(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _changed(before, net):
    return {k for k, v in net.named_parameters() if not torch.equal(before[k], v.detach())}


def test_fake_update_touches_only_the_fake_score():
    cfg, st = _state()
    g0, f0 = _params(st.generator), _params(st.fake_score)
    cond = st.bundle.encode_prompts(["class 1"] * 32)
    fake_update(st, cond, 32, cfg.loss, 10.0, torch.Generator().manual_seed(0))
    assert not _changed(g0, st.generator)
    assert _changed(f0, st.fake_score) == set(f0)


def test_generator_update_touches_only_the_generator_and_updates_ema():
    cfg, st = _state()
    g0, f0 = _params(st.generator), _params(st.fake_score)
    ema0 = {k: v.clone() for k, v in st.ema.shadow.items()}
    reward = LocalRewardClient(WeightedReward([("region", 1.0, RegionReward())]))
    m = train_step(st, ["class 0", "class 3"] * 16, cfg.loss, fake_steps=2, grad_clip=10.0, reward=reward,
                   rng=torch.Generator().manual_seed(0))
    assert _changed(g0, st.generator) == set(g0)
    assert st.step == 1
    assert any(not torch.equal(ema0[k], st.ema.shadow[k]) for k in ema0)
    assert all(p.requires_grad for p in st.fake_score.parameters())  # restored after the frozen pass
    for key in ("fake/loss", "gen/div_loss", "reward/total", "reward/region", "gen/grad_norm"):
        assert torch.isfinite(m[key]), key


def test_generator_loss_sends_no_gradient_to_the_fake_score():
    cfg, st = _state()
    fake = st.fake_score.requires_grad_(False)
    loss, _ = generator_loss(st.bundle, st.generator, fake, st.bundle.encode_prompts(["class 2"] * 8),
                             ["class 2"] * 8, cfg.loss, None if cfg.loss.alpha_rew == 0 else
                             LocalRewardClient(WeightedReward([("region", 1.0, RegionReward())])),
                             torch.Generator().manual_seed(1))
    loss.backward()
    assert all(p.grad is None for p in fake.parameters())
    assert all(p.grad is not None for p in st.generator.parameters())


@pytest.mark.parametrize("divergence", ["score", "kl", "none"])
def test_remote_style_reward_callable_gives_the_same_gradient_as_local_autograd(divergence):
    cfg, st = _state(f"loss.divergence={divergence}")
    prompts = ["class 1"] * 16
    cond = st.bundle.encode_prompts(prompts)
    local = LocalRewardClient(WeightedReward([("region", 1.0, RegionReward())]))

    def remote(images, prompts):  # what a service returns: values and d r / d image, detached
        x = images.detach().requires_grad_(True)
        r = RegionReward()(x, prompts)
        return r.detach(), torch.autograd.grad(r.sum(), x)[0]

    grads = []
    for client in (local, CallableRewardClient(remote)):
        st.generator.zero_grad()
        loss, _ = generator_loss(st.bundle, st.generator, st.fake_score.requires_grad_(False), cond, prompts,
                                 cfg.loss, client, torch.Generator().manual_seed(3))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in st.generator.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_reward_weight_requires_a_client():
    cfg, st = _state()
    with pytest.raises(ValueError, match="no reward client"):
        generator_loss(st.bundle, st.generator, st.fake_score, st.bundle.encode_prompts(["class 0"]), ["class 0"],
                       cfg.loss, None, torch.Generator().manual_seed(0))


def test_ema_tracks_trainable_parameters_only():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    net[0].requires_grad_(False)
    ema = EMA(net, 0.5)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    with torch.no_grad():
        net[1].weight.add_(2.0)
    before = ema.shadow["1.weight"].clone()
    ema.update(net)
    torch.testing.assert_close(ema.shadow["1.weight"], before + 1.0)
    copy_net = ema.averaged(net)
    torch.testing.assert_close(copy_net[1].weight, before + 1.0)
