"""One full DI* step (fake + generator, reward through the VAE decoder) on tiny SD1.5 and SDXL, on CPU."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd
build, pipeline_dirs = tiny_sd.build, tiny_sd.pipeline_dirs  # pipeline_dirs: a fixture

from distar.config import LossConfig
from distar.ema import EMA
from distar.rewards.base import LocalRewardClient, WeightedReward
from distar.registry import REWARDS, resolve
from distar.train_step import TrainState, build_optimizer, generator_loss, train_step

PROMPTS = ["a photo of a cat", "a red house on a hill"]


@pytest.fixture(scope="module")
def reward(tmp_path_factory) -> WeightedReward:
    root = tmp_path_factory.mktemp("rewards")
    aes = resolve(REWARDS, "aesthetic", "reward")(str(tiny_sd.save_aesthetic_dir(root / "aes")), "cpu")
    clip = resolve(REWARDS, "clip_score", "reward")(str(tiny_sd.save_open_clip_dir(root / "clip", seed=3)), "cpu")
    return WeightedReward([("aesthetic", 1.0, aes), ("clip_score", 0.05, clip)])


def _snapshot(mods):
    return [p.detach().clone() for m in mods for p in m.parameters()]


def _state(b):
    return TrainState(bundle=b, generator=b.generator, fake_score=b.fake_score,
                      generator_opt=build_optimizer(b.generator, 1e-3, (0.9, 0.999), 0.01),
                      fake_opt=build_optimizer(b.fake_score, 1e-3, (0.9, 0.999), 0.01),
                      ema=EMA(b.generator, 0.9))


@pytest.mark.parametrize("world", ["sd15", "sdxl"])
def test_full_di_star_step_trains_only_generator_and_fake(pipeline_dirs, reward, world):
    b = build(world, pipeline_dirs[world], guidance_scale=3.0)
    state = _state(b)
    frozen = list(b.frozen_modules()) + [reward]
    before_frozen, before_gen, before_fake = _snapshot(frozen), _snapshot([b.generator]), _snapshot([b.fake_score])
    loss_cfg = LossConfig(alpha_rew=10.0, c=1.0)
    metrics = train_step(state, PROMPTS, loss_cfg, fake_steps=1, grad_clip=10.0, reward=LocalRewardClient(reward),
                         rng=torch.Generator().manual_seed(0))
    assert state.step == 1
    for k in ("fake/loss", "gen/div_loss", "reward/total", "reward/aesthetic", "reward/clip_score", "gen/grad_norm"):
        assert torch.isfinite(metrics[k]).all(), k
    assert metrics["reward/grad_norm"] > 0 and metrics["gen/grad_norm"] > 0 and metrics["fake/grad_norm"] > 0
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before_frozen, _snapshot(frozen)))
    assert any(not torch.equal(a, p) for a, p in zip(before_gen, _snapshot([b.generator])))
    assert any(not torch.equal(a, p) for a, p in zip(before_fake, _snapshot([b.fake_score])))


@pytest.mark.parametrize("world", ["sd15", "sdxl"])
def test_reward_gradient_reaches_generator_through_vae_decoder(pipeline_dirs, reward, world):
    """The surrogate -alpha <sg(dr/dimg), Dec(g(z))> has autograd's gradient of -alpha mean r(Dec(g(z))) in theta."""
    b = build(world, pipeline_dirs[world])
    cond = b.encode_prompts(PROMPTS)
    loss_cfg = LossConfig(divergence="none", alpha_rew=2.0)
    loss, _ = generator_loss(b, b.generator, b.fake_score, cond, PROMPTS, loss_cfg, LocalRewardClient(reward),
                             torch.Generator().manual_seed(5))
    loss.backward()
    g_surrogate = {n: p.grad.clone() for n, p in b.generator.named_parameters()}
    b.generator.zero_grad(set_to_none=True)
    z = b.sample_noise(len(PROMPTS), torch.Generator().manual_seed(5))
    direct = -2.0 * sum(w * m(b.decode(b.generate(b.generator, z, cond)), PROMPTS)
                        for w, m in zip(reward.weights, reward.models)).mean()  # the step averages the batch
    direct.backward()
    names = [n for n, _ in b.generator.named_parameters()]
    g1 = torch.cat([g_surrogate[n].flatten() for n in names])
    g2 = torch.cat([p.grad.flatten() for _, p in b.generator.named_parameters()])
    assert g2.norm() > 0
    assert (g1 - g2).norm() <= 1e-4 * g2.norm(), ((g1 - g2).norm() / g2.norm()).item()  # float32 round-off only
    assert all(p.grad is None for m in b.frozen_modules() for p in m.parameters())
