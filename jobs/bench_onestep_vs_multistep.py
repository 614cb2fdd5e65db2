"""Seconds per image: the one-step generator vs its 50-step reference, same machine, same run.

    python -m jobs.bench_onestep_vs_multistep [--batch 16] [--repeats 5] [--seconds 60] [--threads 1]

Both models draw the same prompts in batches of --batch, alternating so that load from other processes
hits both alike; the best and the median of --repeats timed batches (after one warm-up each) are
reported, with the one-step cost as a percentage of the reference's (the DI* paper reports 1.88% for
SDXL-DI* vs its 50-step teacher).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-onestep")
    ap.add_argument("--reference", default="digits-teacher")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=60.0, help="stop timing after this long (upper bound)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from distar.loading import load_model, seeded_rng

    torch.set_num_threads(args.threads)
    onestep, reference = load_model(args.model, args.device), load_model(args.reference, args.device)
    prompts = [f"a handwritten digit {i % 10}" for i in range(args.batch)]
    runs = {"onestep": lambda s: onestep.sample(prompts, seeded_rng(s)),
            "reference": lambda s: reference.sample(prompts, seeded_rng(s), steps=args.steps)}

    def timed(name: str, seed: int) -> float:
        t = time.perf_counter()
        runs[name](seed)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / args.batch

    for name in runs:
        timed(name, 0)  # warm-up
    per_image: dict[str, list[float]] = {name: [] for name in runs}
    t0 = time.perf_counter()
    for r in range(args.repeats):
        for name in runs:
            per_image[name].append(timed(name, r + 1))
        if time.perf_counter() - t0 > args.seconds:
            break
    result = {"device": args.device, "threads": args.threads, "batch": args.batch, "steps": args.steps,
              "repeats": len(per_image["onestep"]), "torch": torch.__version__}
    for name, xs in per_image.items():
        result[name] = {"model": getattr(onestep if name == "onestep" else reference, "name"),
                        "best_s_per_image": min(xs), "median_s_per_image": statistics.median(xs)}
    result["onestep_pct_of_reference_best"] = round(100 * result["onestep"]["best_s_per_image"]
                                                    / result["reference"]["best_s_per_image"], 2)
    result["onestep_pct_of_reference_median"] = round(100 * result["onestep"]["median_s_per_image"]
                                                      / result["reference"]["median_s_per_image"], 2)
    print(json.dumps(result, indent=1))
    print(f"one-step {1000 * result['onestep']['median_s_per_image']:.2f} ms/image vs {args.steps}-step reference "
          f"{1000 * result['reference']['median_s_per_image']:.1f} ms/image: one-step costs "
          f"{result['onestep_pct_of_reference_median']}% (median; best {result['onestep_pct_of_reference_best']}%) "
          f"- paper: 1.88%")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
