"""Time the digits world's full DI* training step (distar.train_step.train_step with configs/digits.yaml's loss,
K_fake and both proxy rewards in this process) on the CPU: steps/s, images/s and where a step's time goes.

    HF_HUB_OFFLINE=1 .venv/bin/python -m jobs.bench_digits_step --steps 12 [--threads 1] [--batch 16] [--compare]
--compare interleaves, step by step in one process, before (prompts encoded every step, --before-threads =
torch's default) with after (the bundle's prompt cache, --threads, AdamW(fused=True) with --fused-adam).
Phases (median ms/step): encode, fake_update (all K_fake DSM updates), then the generator update's gen_forward,
fake_eps, ref_eps (CFG: cond and uncond in one batch), reward, backward, optimizer; other = clipping, EMA,
metrics. Timers wrap the bundle's methods, fake_update, Tensor.backward and the generator optimizer's step.
On 2 shared cores (2026-12, load ~3.5): 1 thread 0.72 steps/s, torch's default 2 threads 0.12 steps/s.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

PHASES = ("encode", "fake_update", "gen_forward", "fake_eps", "ref_eps", "reward", "backward", "optimizer")


@contextlib.contextmanager
def _patched(obj, name: str, wrap):
    had = name in vars(obj)
    old = getattr(obj, name)
    setattr(obj, name, wrap(old))
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def phase_timers(state, reward, gen_opts, times: dict[str, float]):
    """Add the seconds of each phase of the steps run inside to `times` (a nested call counts in its caller)."""
    from distar import train_step as ts

    depth = [0]

    def timed(phase):
        def wrap(fn):
            def inner(*args, **kwargs):
                if depth[0]:
                    return fn(*args, **kwargs)
                depth[0], t0 = 1, time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0
                    depth[0] = 0
            return inner
        return wrap

    b = state.bundle
    patches = [(b, "encode_prompts", "encode"), (ts, "fake_update", "fake_update"), (b, "generate", "gen_forward"),
               (b, "eps_fake", "fake_eps"), (b, "eps_ref", "ref_eps"), (reward, "submit", "reward"),
               (torch.Tensor, "backward", "backward")] + [(o, "step", "optimizer") for o in gen_opts]
    with contextlib.ExitStack() as stack:
        for obj, name, phase in patches:
            stack.enter_context(_patched(obj, name, timed(phase)))
        yield


def build(batch: int, fused_adam: bool):
    """The state, reward client, prompt sampler and a step function, exactly as the training loop builds them."""
    from distar.config import load_config
    from distar.rewards import LocalRewardClient, build_weighted_reward
    from distar.train_loop import LoopHooks, build_state
    from distar.train_step import train_step

    cfg = load_config("digits", [f"train.batch_size={batch}"])
    state = build_state(cfg, torch.device("cpu"), LoopHooks())
    opts = {False: (state.generator_opt, state.fake_opt)}
    if fused_adam:  # the config's AdamW with the fused kernel (train_step.build_optimizer has no such option)
        opts[True] = tuple(torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=o.lr, betas=o.betas,
                                             weight_decay=o.weight_decay, eps=o.eps, fused=True)
                           for net, o in ((state.bundle.generator, cfg.train.generator_optim),
                                          (state.bundle.fake_score, cfg.train.fake_optim)))
    reward = LocalRewardClient(build_weighted_reward(cfg.reward, "cpu"))
    prompts, rng = state.bundle.training_prompts(), torch.Generator().manual_seed(0)

    def step(fused: bool = False) -> None:
        state.generator_opt, state.fake_opt = opts[fused]
        batch_prompts = [prompts[i] for i in torch.randint(len(prompts), (batch,), generator=rng).tolist()]
        train_step(state, batch_prompts, cfg.loss, fake_steps=cfg.train.fake_steps, grad_clip=cfg.train.grad_clip,
                   reward=reward, rng=rng)

    return state, reward, [o[0] for o in opts.values()], step


def run(variants: dict[str, dict], steps: int, warmup: int, batch: int, fused_adam: bool) -> dict[str, dict]:
    """Each variant {threads, cache, fused} runs `steps` timed steps, interleaved with the others."""
    state, reward, gen_opts, step = build(batch, fused_adam)
    results = {name: {"step": [], **{p: [] for p in PHASES}} for name in variants}
    times: dict[str, float] = {}
    with phase_timers(state, reward, gen_opts, times):
        for i in range(warmup + steps):
            for name, v in variants.items():
                torch.set_num_threads(v["threads"])
                torch.ones(512, 512).sum(0)  # (re)size the thread pool outside the timers
                state.bundle.cache_prompts = v["cache"]
                times.clear()
                t0 = time.perf_counter()
                step(v["fused"])
                if i >= warmup:
                    results[name]["step"].append(time.perf_counter() - t0)
                    for p in PHASES:
                        results[name][p].append(times.get(p, 0.0))
    return results


def report(name: str, r: dict, batch: int) -> float:
    step = statistics.median(r["step"])
    print(f"[{name}] {1 / step:.3f} steps/s, {batch / step:.1f} images/s (median {step * 1e3:.0f} ms/step over "
          f"{len(r['step'])} steps; min {min(r['step']) * 1e3:.0f}, max {max(r['step']) * 1e3:.0f})")
    parts = {p: statistics.median(r[p]) for p in PHASES}
    parts["other"] = max(step - sum(parts.values()), 0.0)
    print("  " + "  ".join(f"{p} {s * 1e3:.1f}ms ({100 * s / step:.0f}%)" for p, s in parts.items()))
    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description="Time the digits world's full DI* training step (module doc).")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (per variant)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the (after) run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--compare", action="store_true", help="also time the before variant, interleaved")
    ap.add_argument("--before-threads", type=int, default=torch.get_num_threads(),
                    help="threads of the before variant (default: torch's default, %(default)s here)")
    ap.add_argument("--no-cache", action="store_true", help="re-encode prompts every step")
    ap.add_argument("--fused-adam", action="store_true", help="AdamW(fused=True) in the (after) run")
    args = ap.parse_args(argv)
    variants = {"after": {"threads": args.threads, "cache": not args.no_cache, "fused": args.fused_adam}}
    if args.compare:
        variants = {"before": {"threads": args.before_threads, "cache": False, "fused": False}, **variants}
    for name, v in variants.items():
        print(f"{name}: {v}")
    results = run(variants, args.steps, args.warmup, args.batch, args.fused_adam)
    out = {name: report(name, r, args.batch) for name, r in results.items()}
    if args.compare:
        print(f"after/before speed-up: {out['before'] / out['after']:.3f}x")
    return {f"{name}_s_per_step": s for name, s in out.items()}


if __name__ == "__main__":
    main()
