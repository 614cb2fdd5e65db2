"""Reward models as Ray Serve deployments: (scores, d score / d image) equal in-process autograd, concurrent
requests batched without mixing, and a clear error (not a hang) when a deployment is gone."""
from __future__ import annotations

import time

import pytest
import torch

from distar.config import RewardConfig, RewardTerm
from distar.rewards import LocalRewardClient, build_weighted_reward

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120), pytest.mark.usefixtures("serve_module")]

TERMS = (RewardTerm(name="digits_alignment", weight=1.0), RewardTerm(name="digits_boldness", weight=10.0))


@pytest.fixture(scope="module")
def deployed(ray_cluster):
    from services.reward_service import deploy_rewards
    from distar.config import load_config

    cfg = load_config("digits_ray")
    started = deploy_rewards(cfg.reward)
    yield cfg.reward
    from ray import serve

    for name in started:
        serve.delete(name)


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 16, 16, generator=g)
    prompts = [f"a handwritten digit {int(k)}" for k in torch.randint(10, (n,), generator=g)]
    return images, prompts


def test_deployment_gradients_equal_in_process_autograd(deployed):
    from distar.remote_reward import RemoteRewardClient

    remote = RemoteRewardClient.from_config(deployed)
    local = LocalRewardClient(build_weighted_reward(RewardConfig(terms=TERMS)))
    images, prompts = _batch(12, 0)
    got, want = remote.submit(images, prompts).result(), local.submit(images, prompts).result()
    assert got.grad.shape == images.shape and got.grad.abs().sum() > 0
    torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)
    for k in want.parts:
        torch.testing.assert_close(got.parts[k], want.parts[k], rtol=1e-5, atol=1e-6)
    evaluation = remote.submit(images, prompts, with_grad=False).result()         # evaluation batches: no gradient
    assert evaluation.grad is None
    torch.testing.assert_close(evaluation.total, want.total, rtol=1e-5, atol=1e-6)


def test_concurrent_requests_are_batched_exactly(deployed):
    from distar.remote_reward import RemoteRewardClient

    remote = RemoteRewardClient.from_config(deployed)
    local = LocalRewardClient(build_weighted_reward(RewardConfig(terms=TERMS)))
    batches = [_batch(n, s) for n, s in ((5, 1), (7, 2), (3, 3))]
    pending = [remote.submit(im, pr) for im, pr in batches]                     # all in flight at once
    for (im, pr), p in zip(batches, pending):
        got, want = p.result(), local.submit(im, pr).result()      # float32 sums differ with the batch size
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-5)


def test_gone_deployment_is_a_clear_error_not_a_hang(ray_cluster):
    from ray import serve

    from distar.remote_reward import RemoteRewardClient, RewardServiceError
    from services.reward_service import app_name, reward_app

    cfg = RewardConfig(terms=(RewardTerm(name="region"),), replica_cpus=0.25)
    serve.run(reward_app(cfg.terms[0], cfg), name=app_name("region"), route_prefix=None)
    client = RemoteRewardClient.from_config(cfg.model_copy(update={"timeout_s": 2.0, "retries": 1}))
    assert client.submit(torch.zeros(2, 2), ["class 0", "class 1"]).result().total.shape == (2,)
    serve.delete(app_name("region"))
    t0 = time.perf_counter()
    with pytest.raises(RewardServiceError, match="region.*2 tries"):
        client.submit(torch.zeros(2, 2), ["class 0", "class 1"]).result()
    assert time.perf_counter() - t0 < 30
    with pytest.raises(RewardServiceError, match="no Serve application"):
        RemoteRewardClient.from_config(cfg)
