"""A short DI* run on the digits world raises the proxy reward, through the real bundle and train_step."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from distar.config import DigitsModel, LossConfig
from distar.ema import EMA
from distar.rewards import LocalRewardClient, WeightedReward, build_reward_model
from distar.train_step import TrainState, build_optimizer, train_step
from distar.worlds import build_bundle
from distar.worlds.digits import text

torch.set_num_threads(2)


def _run(alpha_rew: float, steps: int = 5):
    torch.manual_seed(0)
    b = build_bundle(DigitsModel(), "cpu")
    state = TrainState(b, b.generator, b.fake_score, build_optimizer(b.generator, 2e-4, (0.0, 0.999), 0.0),
                       build_optimizer(b.fake_score, 1e-4, (0.0, 0.999), 0.0), EMA(b.generator, 0.0))
    reward = WeightedReward([("digits_boldness", 10.0, build_reward_model("digits_boldness"))])
    loss = LossConfig(divergence="score", alpha_rew=alpha_rew)
    prompts = text.eval_prompts()[:6]
    z = b.sample_noise(10, torch.Generator().manual_seed(123))
    eval_prompts = text.eval_prompts()

    def score() -> float:
        with torch.no_grad():
            img = b.decode(b.generate(b.generator, z, b.encode_prompts(eval_prompts)))
            return reward.score(img, eval_prompts, with_grad=False).total.mean().item()

    ref_before = [p.clone() for p in b.reference.parameters()]
    before = score()
    rng = torch.Generator().manual_seed(0)
    for _ in range(steps):
        m = train_step(state, prompts, loss, fake_steps=1, grad_clip=10.0, reward=LocalRewardClient(reward), rng=rng)
        assert torch.isfinite(m["gen/loss"])
    assert all(torch.equal(a, p) for a, p in zip(ref_before, b.reference.parameters()))  # reference frozen
    assert all(p.grad is None for p in b.reference.parameters())
    assert all(p.grad is None for p in b.text_encoder.parameters())
    return before, score()


def test_short_di_star_run_raises_the_reward():
    before, after = _run(alpha_rew=10.0)
    _, after_no_reward = _run(alpha_rew=0.0)
    assert after > before + 0.05, (before, after)                # 10 x boldness: +0.005 mean ink
    assert after > after_no_reward + 0.05, (after, after_no_reward)  # and it is the reward that does it
