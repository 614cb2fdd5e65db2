"""The matched-fidelity frontier of the 2-D world: DI* (two calibrations) vs DI++ (KL), reward at equal
energy distance to the reference, over training seeds. Writes docs/gaussian2d_results.md (+ .json).

    python -m jobs.frontier_gaussian2d --out runs/frontier2d --docs docs --seeds 0 1 2 --workers 2

SIM distillation of the reference from a random start (alpha_rew = 0, 1500 steps, seed --start-seed), then every
(method, alpha_rew, training seed) post-trains that one checkpoint (generator and fake score) for 1000 steps on
the `region` reward (sigmoid(4 x), the right-hand mode); the seeds vary the post-training, as in the digits
world where every seed starts from the shipped generator. (Distilling per seed is fragile: seeds 1 and 2 of
this SIM distillation keep only the left modes, energy distance ~1.8; `--distil-all` reports that.) Each (method, seed) sweep, ordered by alpha_rew and starting at its
alpha_rew = 0 control, is a curve in (energy distance, mean reward); the reward is read off it at fixed energy
distances by linear interpolation. Intervals: percentile bootstrap over seeds; a method is ahead only where
the paired interval excludes 0 with >= 3 seeds. Finished runs are reused (results.json).
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from jobs.digits.frontier import curve_at, slug
from jobs.digits.frontier_report import MIN_SEEDS, bootstrap

METHODS: dict[str, tuple[list[str], tuple[float, ...]]] = {
    "DI* (c=0.1 per sample, uniform)": (["loss.divergence=score", "loss.c=0.1", "loss.weighting=uniform"],
                                        (0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 3.0)),
    "DI* (c=0.1 per dim, score weighting)": (["loss.divergence=score", "loss.c=0.1", "loss.c_scale=per_dim",
                                             "loss.weighting=score"], (0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 3.0)),
    "DI++ (KL)": (["loss.divergence=kl", "loss.weighting=uniform"], (0.0, 0.1, 0.3, 1.0, 2.0, 3.0)),
}
BASE = "DI++ (KL)"


def _train(overrides: list[str]) -> dict:
    import torch

    from distar.config import load_config
    from distar.train_loop import LoopHooks, run_training

    torch.set_num_threads(1)
    res = run_training(load_config("gaussian2d", overrides), hooks=LoopHooks(progress=False))
    return {k.removeprefix("eval/"): v for k, v in res.history[-1].items() if k.startswith("eval/")}


def _distil(out: Path, seed: int, steps: int) -> Path:
    from distar.checkpoint import latest_checkpoint

    d = out / f"distil_s{seed}"
    if latest_checkpoint(d) is None:
        _train(["loss.divergence=score", "loss.alpha_rew=0", f"train.steps={steps}", f"train.seed={seed}",
                f"train.out_dir={d}", f"train.log_every={steps}", f"train.checkpoint_every={steps}"])
    return latest_checkpoint(d)


def _post(job: tuple[str, float, int, str, str, int]) -> tuple[str, float, int, dict]:
    method, alpha, seed, start, out, steps = job
    row = _train([*METHODS[method][0], f"loss.alpha_rew={alpha}", "reward.terms=[{name: region}]",
                  f"train.init_from={start}", "train.fake_warmup_steps=0", f"train.steps={steps}",
                  f"train.seed={seed}", f"train.out_dir={out}", f"train.log_every={steps}",
                  f"train.checkpoint_every={steps}"])
    return method, alpha, seed, row


def start_quality(start: Path) -> dict:
    """The distilled start's last evaluation (energy distance, reward, mode coverage)."""
    rows = [json.loads(line) for line in (start.parent.parent / "metrics.jsonl").read_text().splitlines() if line]
    return {k.removeprefix("eval/"): v for k, v in [r for r in rows if "eval/energy_distance" in r][-1].items()
            if k.startswith("eval/")}


def run_all(out: Path, seeds: list[int], workers: int, distil_steps: int, post_steps: int, start_seed: int,
            distil_all: bool) -> tuple[dict, dict]:
    cache = out / f"results_start{start_seed}.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    with ProcessPoolExecutor(workers) as pool:
        distil_seeds = sorted({start_seed, *(seeds if distil_all else [])})
        starts = dict(zip(distil_seeds, pool.map(_distil, [out] * len(distil_seeds), distil_seeds,
                                                 [distil_steps] * len(distil_seeds))))
        quality = {s: start_quality(p) for s, p in starts.items()}
        jobs = [(m, a, s, str(starts[start_seed]), str(out / f"start{start_seed}" / f"{slug(m)}_a{a:g}_s{s}"), post_steps)
                for s in seeds for m, (_, alphas) in METHODS.items() for a in alphas
                if f"{m}|{a:g}|{s}" not in results]
        for method, alpha, seed, row in pool.map(_post, jobs):
            results[f"{method}|{alpha:g}|{seed}"] = row
            cache.write_text(json.dumps(results, indent=1))
            print(f"[frontier2d] {method} a={alpha:g} seed {seed}: energy {row['energy_distance']:.4f} "
                  f"reward {row['mean_reward']:.4f}", flush=True)
    return results, quality


def frontier(results: dict, seeds: list[int], levels: list[float]) -> dict:
    out: dict = {}
    for method, (_, alphas) in METHODS.items():
        for seed in seeds:
            pts = [(results[k]["energy_distance"], results[k]["mean_reward"])
                   for a in alphas if (k := f"{method}|{a:g}|{seed}") in results]
            for level in levels:
                if (y := curve_at(pts, level)) is not None:
                    out.setdefault(method, {}).setdefault(level, {})[seed] = y
    return out


def report(results: dict, seeds: list[int], levels: list[float], command: str, quality: dict,
           start_seed: int) -> str:
    head = ["energy distance", *METHODS, *(f"{m.split(' (')[0]} {m[m.index('('):]} - DI++" for m in METHODS if m != BASE)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    front, calls = frontier(results, seeds, levels), []
    for level in levels:
        cells = [f"{level:.3f}"]
        for m in METHODS:
            v = list(front.get(m, {}).get(level, {}).values())
            cells.append("%.4f [%.4f, %.4f] (n=%d)" % (*bootstrap(v), len(v)) if len(v) >= 2 else f"- (n={len(v)})")
        base = front.get(BASE, {}).get(level, {})
        for m in (m for m in METHODS if m != BASE):
            mine = front.get(m, {}).get(level, {})
            common = sorted(set(mine) & set(base))
            if len(common) < MIN_SEEDS:
                cells.append(f"no call ({len(common)} paired seeds)")
                continue
            d, lo, hi = bootstrap([mine[s] - base[s] for s in common])
            who = "DI* ahead" if lo > 0 else "DI++ ahead" if hi < 0 else "no difference beyond seed spread"
            calls.append(who)
            cells.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]: {who}")
        lines.append("| " + " | ".join(cells) + " |")
    finals = ["| method | alpha_rew | energy distance (mean over seeds) | mean reward | right-mode mass | mode coverage |",
              "| --- | --- | --- | --- | --- | --- |"]
    for m, (_, alphas) in METHODS.items():
        for a in alphas:
            rs = [results[k] for s in seeds if (k := f"{m}|{a:g}|{s}") in results]
            if rs:
                finals.append(f"| {m} | {a:g} | " + " | ".join(
                    f"{sum(r[c] for r in rs) / len(rs):.4f}"
                    for c in ("energy_distance", "mean_reward", "right_mode_mass", "mode_coverage")) + " |")
    verdict = {c: calls.count(c) for c in dict.fromkeys(calls)}
    return "\n".join([
        "# The 2-D world: DI* vs DI++ at matched fidelity", "",
        f"**Calls over (DI* variant, level) pairs with >= {MIN_SEEDS} paired seeds:** "
        + (", ".join(f"{k}: {v}" for k, v in verdict.items()) or "none") + ".", "",
        "Mean `region` reward (sigmoid(4x), trained on) read off each method's alpha_rew sweep at a fixed energy "
        "distance to the reference, mean over seeds [95% percentile-bootstrap interval over seeds].", "",
        *lines, "", "## Every final point (mean over seeds)", "", *finals, "",
        f"## The distilled start (SIM, alpha_rew = 0; every post-training run starts from seed {start_seed}'s)", "",
        "| distillation seed | energy distance | mean reward | mode coverage |", "| --- | --- | --- | --- |",
        *(f"| {s} | {q['energy_distance']:.4f} | {q['mean_reward']:.4f} | {q['mode_coverage']:.2f} |"
          for s, q in sorted(quality.items())), "",
        "## How to reproduce", "", f"    {command}", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/frontier2d")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--distil-steps", type=int, default=1500)
    ap.add_argument("--post-steps", type=int, default=1000)
    ap.add_argument("--levels", type=float, nargs="+", default=None, help="energy distances (default: spread)")
    ap.add_argument("--start-seed", type=int, default=0, help="seed of the one distilled start")
    ap.add_argument("--distil-all", action="store_true", help="also distil (and report) a start per seed")
    args = ap.parse_args(argv)
    out, docs = Path(args.out), Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    results, quality = run_all(out, args.seeds, args.workers, args.distil_steps, args.post_steps, args.start_seed,
                               args.distil_all)
    controls = [r["energy_distance"] for k, r in results.items() if k.split("|")[1] == "0"]
    top = min(max(r["energy_distance"] for k, r in results.items() if k.startswith(m + "|")) for m in METHODS)
    lo = max(controls)  # every level is above every control and below every method's largest distance
    levels = args.levels or [round(lo + (top - lo) * f, 4) for f in (0.05, 0.15, 0.3, 0.5)]
    cmd = (f"python -m jobs.frontier_gaussian2d --out {args.out} --docs {args.docs} --seeds "
           f"{' '.join(map(str, args.seeds))} --workers {args.workers} --start-seed {args.start_seed}"
           + (" --distil-all" if args.distil_all else ""))
    text = report(results, args.seeds, levels, cmd, quality, args.start_seed)
    (docs / "gaussian2d_results.md").write_text(text)
    (docs / "gaussian2d_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
