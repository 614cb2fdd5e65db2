"""Reproduce docs/digits_results.md: train every row of the digits table, evaluate, plot.

    python -m jobs.digits.results --runs runs/digits_table --docs docs

Each row is `distar train --config digits` with the overrides in ROWS (in-process run_training), followed
by one `distar eval`-style evaluation of all models with the same prompts and seeds. Finished runs
(a `final/` directory) are reused, so an interrupted reproduction resumes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ALPHAS = (0.1, 0.3, 1.0)
ROWS: list[tuple[str, str, float | None, list[str]]] = (
    [(f"DI* alpha_rew={a:g}", "DI*", a, ["loss.divergence=score", f"loss.alpha_rew={a}"]) for a in ALPHAS]
    + [(f"DI++ (KL) alpha_rew={a:g}", "DI++ (KL)", a, ["loss.divergence=kl", f"loss.alpha_rew={a}"]) for a in ALPHAS]
    + [(f"reward only alpha_rew={ALPHAS[-1]:g}", "reward only", ALPHAS[-1],
        ["loss.divergence=none", f"loss.alpha_rew={ALPHAS[-1]}"])]
)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


def train_rows(runs: Path, only: list[int] | None = None, log=print) -> dict[str, dict]:
    from distar.config import load_config
    from distar.train_loop import LoopHooks, run_training

    done = {}
    for i, (label, method, alpha, overrides) in enumerate(ROWS):
        out = runs / _slug(label)
        if only is not None and i not in only:
            continue
        if not (out / "final" / "generator.safetensors").is_file():
            cfg = load_config("digits", overrides + [f"train.out_dir={out}", f"name={_slug(label)}"])
            t0 = time.time()
            run_training(cfg, hooks=LoopHooks(progress=False))
            (out / "train_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
        secs = float((out / "train_seconds.txt").read_text()) if (out / "train_seconds.txt").is_file() else None
        done[label] = {"dir": str(out / "final"), "method": method, "alpha_rew": alpha, "train_seconds": secs,
                       "command": "distar train --config digits " + " ".join(overrides) + f" train.out_dir={out}"}
        log(f"{label}: {out / 'final'}")
    return done


def evaluate_all(trained: dict[str, dict], n_per_class: int, seed: int, log=print) -> list[dict]:
    from distar.worlds.digits.judges import Judges, evaluate_sampler, real_row
    from distar.loading import load_model

    judges = Judges.load()
    rows = [real_row(judges)]
    specs = [("reference 50-step CFG", "digits-teacher", {"method": "reference"}),
             ("one-step init (SIM)", "digits-onestep", {"method": "init", "alpha_rew": 0.0})]
    specs += [(label, info["dir"], info) for label, info in trained.items()]
    for label, spec, info in specs:
        model = load_model(spec)
        kw = {"steps": 50} if model.multistep else {}
        row = evaluate_sampler(label, lambda p, g: model.sample(p, g, **kw), judges, n_per_class, seed)
        row.update({k: v for k, v in info.items() if k != "dir"})
        rows.append(row)
        log(json.dumps(row))
    return rows


def save_grids(trained: dict[str, dict], docs: Path, per_class: int = 8) -> None:
    """docs/digits_grid_<model>.png: one row per digit 0..9, same noise for every model."""
    from distar.worlds.digits import text
    from distar.images import grid
    from distar.loading import load_model

    prompts = [p for p in text.eval_prompts() for _ in range(per_class)]
    best = [info["dir"] for label, info in trained.items() if info["method"] == "DI*"]
    for name, spec in [("teacher", "digits-teacher"), ("onestep", "digits-onestep")] + (
            [("di_star", best[-1])] if best else []):
        model = load_model(spec)
        images = model.sample(prompts, torch.Generator().manual_seed(0), **({"steps": 50} if model.multistep else {}))
        grid(images, cols=per_class).save(docs / f"digits_grid_{name}.png")


def retime(rows: list[dict], trained: dict[str, dict], n: int = 250, log=print) -> None:
    """Re-measure seconds per image of every model, warm, back to back, on `n` images (batch 250)."""
    from distar.worlds.digits import text
    from distar.loading import load_model

    specs = {"reference 50-step CFG": "digits-teacher", "one-step init (SIM)": "digits-onestep",
             **{label: info["dir"] for label, info in trained.items()}}
    prompts = [text.eval_prompts()[i % 10] for i in range(n)]
    for row in rows:
        if row["model"] not in specs:
            continue
        model = load_model(specs[row["model"]])
        kw = {"steps": 50} if model.multistep else {}
        model.sample(prompts[:20], torch.Generator().manual_seed(1), **kw)
        t0 = time.perf_counter()
        model.sample(prompts, torch.Generator().manual_seed(0), **kw)
        row["sec_per_image"] = (time.perf_counter() - t0) / n
        log(f"{row['model']}: {1000 * row['sec_per_image']:.2f} ms/image")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r.get("method"): r for r in rows}
    init = by.get("init")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, marker in (("DI*", "o-"), ("DI++ (KL)", "s-"), ("reward only", "x-")):
        pts = sorted((r for r in rows if r.get("method") == method), key=lambda r: r["alpha_rew"])
        if not pts:
            continue
        pts = ([init] if init else []) + pts
        ax.plot([r["frechet"] for r in pts], [r["gold_boldness"] for r in pts], marker, label=method)
        for r in pts[1:]:
            ax.annotate(f"{r['alpha_rew']:g}", (r["frechet"], r["gold_boldness"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 2))
    for r in rows:
        if r.get("method") == "reference":
            ax.plot([r["frechet"]], [r["gold_boldness"]], "k*", ms=12, label="reference 50-step CFG")
            ax.axvline(1.5 * r["frechet"], color="grey", ls=":", lw=1, label="1.5 x reference Frechet")
        if r.get("method") == "init":
            ax.plot([r["frechet"]], [r["gold_boldness"]], "D", color="grey", label="one-step init")
    ax.set_xscale("log")
    ax.set_xlabel("Frechet distance to held-out digits (judge features, log; lower = better)")
    ax.set_ylabel("gold boldness (mean ink, never trained on)")
    ax.set_title("digits world: reward vs fidelity (labels: alpha_rew)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from distar.worlds.digits.judges import markdown_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/digits_table")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--n-per-class", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retime", action="store_true",
                    help="only re-measure ms/image (warm, back to back) in an existing docs/digits_results.json")
    ap.add_argument("--rows", type=int, nargs="+", default=None,
                    help="train only these ROWS indices and stop (to spread runs over processes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, docs = Path(args.runs), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    if args.rows is not None:
        train_rows(runs, args.rows)
        return 0
    trained = train_rows(runs)
    if args.retime:
        rows = json.loads((docs / "digits_results.json").read_text())
        retime(rows, trained)
        (docs / "digits_results.json").write_text(json.dumps(rows, indent=1) + "\n")
        (docs / "digits_results_table.md").write_text(markdown_table(rows) + "\n")
        plot(rows, docs / "digits_reward_vs_fidelity.png")
        print(markdown_table(rows))
        return 0
    rows = evaluate_all(trained, args.n_per_class, args.seed)
    (docs / "digits_results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (docs / "digits_results_table.md").write_text(markdown_table(rows) + "\n")
    plot(rows, docs / "digits_reward_vs_fidelity.png")
    save_grids(trained, docs)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
