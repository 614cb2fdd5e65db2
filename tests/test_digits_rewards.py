"""Proxy rewards of the digits world: differentiable, prompt-aware, size-agnostic, and fitted to gold."""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from distar.config import RewardConfig, RewardTerm
from distar.rewards import build_reward_model, build_weighted_reward
from distar.worlds.digits import data, text

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def real():
    x, y = data.load_split("heldout")
    return x[:64], y[:64]


@pytest.mark.parametrize("name", ["digits_alignment", "digits_boldness"])
def test_reward_gradient_matches_finite_differences(name, real):
    """Directional derivative by autograd == central finite difference, in float64 through the reward model."""
    model = copy.deepcopy(build_reward_model(name)).double()
    x = real[0][:4].double().clamp(0.05, 0.95)       # keep away from the clamp kinks of to_16 / decode
    prompts = ["a handwritten digit " + text.NUMBER_WORDS[k] for k in real[1][:4].tolist()]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(model(xg, prompts).sum(), xg)[0]
    h = 1e-5
    fd = (model(x + h * v, prompts) - model(x - h * v, prompts)) / (2 * h)
    ad = (grad * v).flatten(1).sum(1)
    assert torch.allclose(ad, fd, rtol=1e-5, atol=1e-7), (ad, fd)
    assert grad.abs().sum() > 0


def test_weighted_reward_grad_is_autograd_of_the_weighted_sum(real):
    cfg = RewardConfig(terms=(RewardTerm(name="digits_alignment", weight=0.5),
                              RewardTerm(name="digits_boldness", weight=3.0)))
    wr = build_weighted_reward(cfg)
    x, y = real[0][:8], real[1][:8]
    prompts = [text.prompts_for_class(k)[1] for k in y.tolist()]
    out = wr.score(x, prompts)
    xg = x.clone().requires_grad_(True)
    a, b = wr.models
    total = 0.5 * a(xg, prompts) + 3.0 * b(xg, prompts)
    (ref,) = torch.autograd.grad(total.sum(), xg)
    assert torch.allclose(out.grad, ref, atol=1e-6)
    assert torch.allclose(out.total, total.detach(), atol=1e-6)


def test_alignment_reads_the_digit_from_the_prompt(real):
    r = build_reward_model("digits_alignment")
    x, y = real
    right = r(x, [f"the number {k} written by hand" for k in y.tolist()])
    wrong = r(x, [f"a handwritten digit {text.NUMBER_WORDS[(k + 1) % 10]}" for k in y.tolist()])
    assert (right > wrong).float().mean() > 0.95
    assert right.mean() > -0.2 and (right <= 0).all()  # log-probabilities
    assert r(x[:2], ["", "a cat"]).abs().max() == 0     # no digit named: no alignment signal


def test_rewards_accept_any_size_and_rgb(real):
    r = build_reward_model("digits_boldness")
    x = real[0][:8]
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    s16, s32, rgb = r(x, [""] * 8), r(big, [""] * 8), r(x.expand(-1, 3, -1, -1), [""] * 8)
    assert torch.allclose(s16, rgb, atol=1e-6)
    assert (s16 - s32).abs().max() < 0.05


def test_boldness_proxy_tracks_gold_on_unseen_real_digits():
    x, _ = data.load_split("heldout")
    r = build_reward_model("digits_boldness")
    with torch.no_grad():
        pred = r(x, [""] * len(x))
    gold = data.gold_boldness(x)
    corr = torch.corrcoef(torch.stack([pred, gold]))[0, 1]
    assert corr > 0.9, corr
