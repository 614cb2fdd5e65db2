"""The remote-reward adapter: a `RewardClient` whose reward models are Ray Serve deployments.

`submit()` sends the batch to every reward model's deployment at once and returns; the training step
computes its divergence meanwhile and calls `result()`, which combines the parts into
total = sum_i w_i r_i and grad = sum_i w_i d r_i / d image (the same as `WeightedReward.score` in process).

A deployment that is slow or restarting gets `timeout_s` per try and `retries` more tries (with a short
backoff); after that `RewardServiceError` says which reward, where, and what happened, so training stops
with a clear message instead of hanging.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .rewards.base import RewardOutput

log = logging.getLogger(__name__)


class RewardServiceError(RuntimeError):
    """A reward deployment did not answer after all retries (or is gone)."""


APP_PREFIX = "distar-reward-"
DEPLOYMENT = "RewardModel"


def reward_app_name(term_name: str) -> str:
    """The Serve application of one reward term (services.reward_service deploys it under this name)."""
    return f"{APP_PREFIX}{term_name}"


@dataclass
class _Request:
    name: str
    images: torch.Tensor
    prompts: list[str]
    with_grad: bool
    response: object = None
    tries: int = 0


class RemoteRewardClient:
    """Scores through Serve deployment handles; one (name, weight) per reward model."""

    def __init__(self, handles: dict, weights: dict[str, float], timeout_s: float = 60.0, retries: int = 2,
                 backoff_s: float = 0.5):
        if set(handles) != set(weights):
            raise ValueError(f"reward handles {sorted(handles)} and weights {sorted(weights)} name different rewards")
        self.handles, self.weights = dict(handles), dict(weights)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.retried = 0  # requests sent again in this client's life (logged as reward/service_retries)

    @classmethod
    def from_config(cls, reward_cfg) -> "RemoteRewardClient":
        """Handles to the running deployments of `reward_cfg.terms` (see services.reward_service.deploy_rewards)."""
        from ray import serve

        handles, weights = {}, {}
        running = serve.status().applications
        for t in reward_cfg.terms:
            if t.name in handles:
                raise ValueError(f"reward.terms names {t.name!r} twice; give each reward model one term")
            if reward_app_name(t.name) not in running:
                raise RewardServiceError(f"reward {t.name!r}: no Serve application {reward_app_name(t.name)!r} on "
                                         f"this cluster (running: {sorted(running)}); deploy deploy/rewards.yaml "
                                         f"or let the training driver start it (reward.backend=serve)")
            try:
                handles[t.name] = serve.get_deployment_handle(DEPLOYMENT, app_name=reward_app_name(t.name))
            except Exception as err:  # noqa: BLE001 - Serve raises several types for "not there"
                raise RewardServiceError(f"reward {t.name!r}: no Serve application {reward_app_name(t.name)!r} on "
                                         f"this cluster ({type(err).__name__}: {err})") from None
            weights[t.name] = t.weight
        return cls(handles, weights, reward_cfg.timeout_s, reward_cfg.retries)

    def _send(self, req: _Request) -> None:
        req.tries += 1
        req.response = self.handles[req.name].score.remote(req.images, req.prompts, req.with_grad)

    def submit(self, images: torch.Tensor, prompts: Sequence[str], with_grad: bool = True) -> "_Pending":
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward: {images.shape[0]} images but {len(prompts)} prompts")
        payload = images.detach().to("cpu", torch.float32).contiguous()
        reqs = [_Request(n, payload, list(prompts), with_grad) for n in self.handles]
        for r in reqs:
            self._send(r)
        return _Pending(self, reqs, images.device, images.dtype)

    def _wait(self, req: _Request) -> RewardOutput:
        errors: list[str] = []
        while True:
            try:
                return req.response.result(timeout_s=self.timeout_s)
            except Exception as err:  # noqa: BLE001 - timeouts, replica deaths, unavailable deployments
                errors.append(f"try {req.tries}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
                try:
                    req.response.cancel()
                except Exception:  # noqa: BLE001
                    pass
                if req.tries > self.retries:
                    raise RewardServiceError(
                        f"reward {req.name!r} (Serve app {reward_app_name(req.name)!r}) gave no answer after "
                        f"{req.tries} tries of {self.timeout_s:g} s: " + "; ".join(errors)) from None
                self.retried += 1
                log.warning("reward %r: %s; retrying (%d request(s) retried so far)", req.name, errors[-1],
                            self.retried)
                time.sleep(self.backoff_s * req.tries)
                self._send(req)


class _Pending:
    def __init__(self, client: RemoteRewardClient, reqs: list[_Request], device: torch.device, dtype: torch.dtype):
        self.client, self.reqs, self.device, self.dtype = client, reqs, device, dtype

    @property
    def service_retries(self) -> int:
        """Requests the client has sent again so far (replica deaths, timeouts)."""
        return self.client.retried

    def result(self) -> RewardOutput:
        outs = {r.name: self.client._wait(r) for r in self.reqs}
        w = self.client.weights
        total = sum(w[n] * o.total for n, o in outs.items())
        grads = [w[n] * o.grad for n, o in outs.items() if o.grad is not None]
        grad = None
        if grads:
            grad = sum(grads[1:], grads[0]).to(self.device, self.dtype)
        parts = {n: p for o in outs.values() for n, p in o.parts.items()}
        return RewardOutput(total=total, grad=grad, parts=parts)
