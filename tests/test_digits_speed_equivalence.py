"""The digits world's fast paths compute what the plain paths compute: the prompt cache returns the very
rows a fresh encoding returns (for any batch, order or repetition), follows the text encoder's weights, and
leaves eps_ref and a whole training step unchanged bit for bit; the CFG reference pass (cond and uncond in
one batch) equals two separate passes up to float rounding. Also: jobs/bench_digits_step runs."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from distar import diffusion
from distar.config import DigitsModel
from distar.worlds import build_bundle
from distar.worlds.digits import text


@pytest.fixture(scope="module")
def bundle():
    return build_bundle(DigitsModel(), "cpu")


def _batches(rng: torch.Generator) -> list[list[str]]:
    prompts = text.all_prompts()
    draws = [[prompts[i] for i in torch.randint(len(prompts), (n,), generator=rng).tolist()] for n in (16, 7, 1)]
    return draws + [prompts, prompts[::-1], [text.NULL_PROMPT, prompts[3], prompts[3]], ["an unseen prompt 4"]]


def _encode(bundle, prompts, cached: bool):
    bundle.cache_prompts = cached
    try:
        return bundle.encode_prompts(prompts)
    finally:
        bundle.cache_prompts = True


def test_cached_rows_are_the_fresh_rows(bundle, one_thread):
    rng = torch.Generator().manual_seed(0)
    for prompts in _batches(rng) + _batches(rng):  # the second round is served from the warm cache
        cached, fresh = _encode(bundle, prompts, True), _encode(bundle, prompts, False)
        assert torch.equal(cached.hidden, fresh.hidden), prompts
        assert torch.equal(cached.null, fresh.null) and cached.null.shape == cached.hidden.shape
        assert cached.prompts == fresh.prompts == list(prompts)
    # the comparison can fail: distinct prompts have distinct rows, so a cache that mixed rows up would differ
    a, b = text.all_prompts()[:2]
    h = _encode(bundle, [a, b], True).hidden
    assert not torch.equal(h[0], h[1])
    assert not torch.equal(_encode(bundle, [b, a], True).hidden, h)
    assert torch.equal(_encode(bundle, [b, a], True).hidden, h.flip(0))


def test_cache_is_not_aliased_and_follows_the_weights(bundle, one_thread):
    prompts = text.all_prompts()[:4]
    cond = _encode(bundle, prompts, True)
    before = cond.hidden.clone()
    cond.hidden.add_(1.0)  # a caller writing into its batch cannot reach the cache
    assert torch.equal(_encode(bundle, prompts, True).hidden, _encode(bundle, prompts, False).hidden)
    p = next(bundle.text_encoder.parameters())
    saved = p.detach().clone()
    try:
        with torch.no_grad():
            p.mul_(1.5)  # new weights: the cache must not serve the old rows
        assert torch.equal(_encode(bundle, prompts, True).hidden, _encode(bundle, prompts, False).hidden)
        assert not torch.equal(_encode(bundle, prompts, True).hidden, before)
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert torch.equal(_encode(bundle, prompts, True).hidden, before)


def test_eps_ref_unchanged(bundle, one_thread):
    prompts = text.all_prompts()[::9]
    n, g = len(prompts), torch.Generator().manual_seed(1)
    x_t, t = torch.randn((n, 1, 16, 16), generator=g), torch.randint(20, 980, (n,), generator=g)
    cached, fresh = _encode(bundle, prompts, True), _encode(bundle, prompts, False)
    x = x_t.clone().requires_grad_(True)
    e = bundle.eps_ref(x, t, cached)
    e.square().sum().backward()  # the reference pass keeps its graph to x_t (the generator update needs it)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(e.detach(), bundle.eps_ref(x_t, t, fresh))
    with torch.no_grad():  # one batch of 2n = two passes of n, up to float rounding
        e_u = bundle.reference(x_t, t, encoder_hidden_states=fresh.null).sample
        e_c = bundle.reference(x_t, t, encoder_hidden_states=fresh.hidden).sample
    want = diffusion.classifier_free_guidance(e_u, e_c, bundle.guidance_scale)
    torch.testing.assert_close(e.detach(), want, rtol=1e-5, atol=1e-5)


def _two_steps(cached: bool) -> tuple[dict, list[torch.Tensor]]:
    from distar.config import load_config
    from distar.rewards import LocalRewardClient, build_weighted_reward
    from distar.train_loop import LoopHooks, build_state
    from distar.train_step import train_step

    cfg = load_config("digits", ["train.batch_size=4"])
    state = build_state(cfg, torch.device("cpu"), LoopHooks())
    state.bundle.cache_prompts = cached
    reward, rng = LocalRewardClient(build_weighted_reward(cfg.reward, "cpu")), torch.Generator().manual_seed(3)
    prompts = text.all_prompts()
    for batch in ([prompts[5], prompts[40], prompts[5], prompts[77]], [prompts[40], prompts[1], prompts[2], prompts[5]]):
        metrics = train_step(state, batch, cfg.loss, fake_steps=cfg.train.fake_steps, grad_clip=cfg.train.grad_clip,
                             reward=reward, rng=rng)
    nets = (state.bundle.generator, state.bundle.fake_score)
    return metrics, [p.detach().clone() for net in nets for p in net.parameters()]


def test_training_steps_unchanged(one_thread):
    (m_fast, p_fast), (m_slow, p_slow) = _two_steps(True), _two_steps(False)
    assert m_fast.keys() == m_slow.keys()
    for k in m_fast:
        assert torch.equal(m_fast[k], m_slow[k]), k
    assert all(torch.equal(a, b) for a, b in zip(p_fast, p_slow))


def test_bench_runs(one_thread, capsys):
    from jobs.bench_digits_step import main

    out = main(["--steps", "1", "--warmup", "0", "--batch", "2", "--compare", "--before-threads", "1"])
    assert out["before_s_per_step"] > 0 and out["after_s_per_step"] > 0
    text_out = capsys.readouterr().out
    assert "steps/s" in text_out and "ref_eps" in text_out and "speed-up" in text_out
