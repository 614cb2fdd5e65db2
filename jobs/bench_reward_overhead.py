"""Benchmark (not a test): seconds per DI* training step on the digits world with the rewards scored by Ray
Serve deployments versus the same rewards called in process, in one run, same batch, interleaved rounds.

    python -m jobs.bench_reward_overhead --config digits_ray --steps 6 --rounds 3 --threads 1

--threads 1 is what a Train worker at 0.5 CPU gets (Ray sets OMP_NUM_THREADS=1). Prints per-mode median
step time, the ratio (target <= 1.15), and where the remote time goes: submit (serialise + enqueue), the
wait in result() after the divergence was computed, and a bare round trip with nothing to overlap.
"""
from __future__ import annotations

import argparse
import statistics
import time


class _Timed:
    """Wraps a RewardClient; records time spent in submit() and blocked in result()."""

    def __init__(self, inner):
        self.inner, self.submit_s, self.wait_s = inner, [], []

    def submit(self, images, prompts, with_grad=True):
        t = time.perf_counter()
        pending = self.inner.submit(images, prompts, with_grad)
        self.submit_s.append(time.perf_counter() - t)
        outer = self

        class _P:
            def result(self):
                t0 = time.perf_counter()
                out = pending.result()
                outer.wait_s.append(time.perf_counter() - t0)
                return out

        return _P()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="digits_ray")
    ap.add_argument("--steps", type=int, default=6, help="steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch

    from distar.config import load_config
    from distar.ray_train import connect
    from distar.remote_reward import RemoteRewardClient
    from distar.rewards import LocalRewardClient, build_weighted_reward
    from distar.train_loop import LoopHooks, build_state
    from distar.train_step import train_step
    from services.reward_service import deploy_rewards

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides + ["reward.backend=serve"])
    started = connect()
    deployed = deploy_rewards(cfg.reward)
    try:
        state = build_state(cfg, torch.device("cpu"), LoopHooks())
        prompts = [state.bundle.training_prompts()[i % 10] for i in range(cfg.train.batch_size)]
        clients = {"in-process": _Timed(LocalRewardClient(build_weighted_reward(cfg.reward))),
                   "serve": _Timed(RemoteRewardClient.from_config(cfg.reward))}
        times: dict[str, list[float]] = {k: [] for k in clients}

        def step(name: str, seed: int) -> float:
            t = time.perf_counter()
            train_step(state, prompts, cfg.loss, fake_steps=cfg.train.fake_steps, grad_clip=cfg.train.grad_clip,
                       reward=clients[name], rng=torch.Generator().manual_seed(seed))
            return time.perf_counter() - t

        for name in clients:  # warm-up (first calls, allocator, Serve routing)
            step(name, 0), step(name, 1)
            clients[name].submit_s.clear(), clients[name].wait_s.clear()
        for r in range(args.rounds):
            for name in (("in-process", "serve") if r % 2 == 0 else ("serve", "in-process")):
                times[name] += [step(name, 100 * r + i) for i in range(args.steps)]

        images = torch.rand(cfg.train.batch_size, 1, 16, 16)
        rtt = {}
        for name, c in clients.items():
            ts = []
            for _ in range(10):
                t = time.perf_counter()
                c.inner.submit(images, prompts).result()
                ts.append(time.perf_counter() - t)
            rtt[name] = statistics.median(ts)
    finally:
        from ray import serve

        for app in deployed:
            serve.delete(app)
        if started:
            import ray

            ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"digits world, batch {cfg.train.batch_size}, fake_steps {cfg.train.fake_steps}, torch threads "
          f"{args.threads}, {len(times['serve'])} steps per mode over {args.rounds} interleaved rounds")
    print("| mode | median s/step | mean s/step | submit ms | blocked in result() ms | bare reward call ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k in clients:
        c = clients[k]
        print(f"| {k} | {med[k]:.3f} | {statistics.mean(times[k]):.3f} | {1e3 * statistics.median(c.submit_s):.1f} "
              f"| {1e3 * statistics.median(c.wait_s):.1f} | {1e3 * rtt[k]:.1f} |")
    print(f"overhead ratio serve / in-process (median s/step): {med['serve'] / med['in-process']:.3f}  (target <= 1.15)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
