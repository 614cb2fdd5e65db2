"""Shared test setup. Tests marked `ray` use one session-scoped local Ray cluster (`ray_cluster`), so the fast
math tests never start Ray:  pytest -m "not ray"  runs them alone in seconds."""
from __future__ import annotations

import os
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")                 # loopback-only test clusters
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")  # fail, not hang, without resources
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_cluster():
    """A private 2-CPU local cluster (address='local' never joins another engineer's cluster)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        yield ray
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def serve_module(ray_cluster):
    """Shut Serve down after a module that started it (training starts it with the HTTP proxy disabled;
    later modules, e.g. the HTTP serving tests, must be free to start it with their own options)."""
    yield
    from ray import serve

    serve.shutdown()


@pytest.fixture()
def one_thread():
    """One intra-op thread: on shared, loaded CPUs two spinning threads make the tiny nets ~20x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
