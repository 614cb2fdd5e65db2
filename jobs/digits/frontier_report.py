"""docs/digits_results.md from the frontier runs (jobs/digits/frontier.py): tables, intervals, plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distar.config import HackingMonitorConfig
from distar.hacking_monitor import HackingMonitor
from distar.tables import markdown_table

def trajectory(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def bootstrap(values: list[float], n: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _methods(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in runs if r["method"] != "reward only"))


MIN_SEEDS = 3  # a winner is called only with at least this many paired seeds
MONITOR = HackingMonitorConfig(held_out="eval/frechet", mode="min", tolerance=0.25, patience=2, action="warn")


REPLAY_TOLERANCES = (MONITOR.tolerance, 1.0)  # the rule the reward-only run trained with, and a doubling
NOTES = ("<!-- notes: hand-written, kept when the page is regenerated -->", "<!-- /notes -->")


def monitor_replay(history: list[dict], tolerance: float = MONITOR.tolerance) -> int | None:
    """The step at which the monitor rule (MONITOR, at `tolerance`) fires on a run's logged metrics, or None."""
    m = HackingMonitor(MONITOR.model_copy(update={"tolerance": tolerance}))
    for h in history:
        if m.observe(int(h["step"]), h).triggered:
            return int(h["step"])
    return None


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def frontier_table(front: dict, levels: list[float], ref: dict, methods: list[str]) -> tuple[str, list[dict]]:
    rows = []
    for level in levels:
        row = {"Frechet level": f"{level:.1f} ({level / ref['frechet']:.2f}x ref)"}
        per = {}
        for method in methods:
            seeds = front.get(method, {}).get(level, {})
            if len(seeds) >= 2:
                mean, lo, hi = bootstrap(list(seeds.values()))
                row[method] = f"{mean:.4f} [{lo:.4f}, {hi:.4f}] (n={len(seeds)})"
                per[method] = seeds
            else:
                row[method] = f"- (n={len(seeds)})"
        base = per.get("DI++ (KL)")
        verdicts = []
        for method in methods:
            if method == "DI++ (KL)" or method not in per or base is None:
                continue
            common = sorted(set(per[method]) & set(base))
            if len(common) >= 2:
                diff, lo, hi = bootstrap([per[method][s] - base[s] for s in common])
                short = method.split(" (")[0]
                who = f"{short} ahead" if lo > 0 else ("DI++ ahead" if hi < 0 else "no difference beyond seed spread")
                if len(common) < MIN_SEEDS:  # a percentile bootstrap over 2 seeds is no interval: no call
                    who = f"no call (only {len(common)} paired seeds, {MIN_SEEDS} needed)"
                verdicts.append(f"{method.split(' (')[0]}{' ' + method[method.index('('):] if '(' in method else ''}"
                                f" - DI++: {diff:+.4f} [{lo:+.4f}, {hi:+.4f}]: {who}")
        row["difference (paired by seed)"] = "; ".join(verdicts) or "-"
        rows.append(row)
    return markdown_table(rows, list(rows[0])), rows


def plots(runs: list[dict], rows: dict, runs_dir: Path, docs: Path) -> tuple[Path, Path, dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    methods = _methods(runs)
    colors = dict(zip([*methods, "reward only"], ["C0", "C2", "C1", "C3"]))
    for r in runs:
        if r["name"] in rows and r["method"] in methods:
            row = rows[r["name"]]
            first = next(q for q in runs if q["method"] == r["method"])
            ax.scatter(row["frechet"], row["gold_boldness"], color=colors[r["method"]], s=14,
                       label=r["method"] if r is first else None)
    ref, init = rows["reference 50-step CFG"], rows["one-step init"]
    ax.plot(ref["frechet"], ref["gold_boldness"], "k*", ms=12, label="reference 50-step CFG")
    ax.plot(init["frechet"], init["gold_boldness"], "D", color="grey", label="one-step init")
    ax.axvline(1.5 * ref["frechet"], color="grey", ls=":", lw=1, label="1.5 x reference Frechet")
    ax.axhline(ref["gold_boldness"], color="k", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("Frechet distance to held-out digits (judge features; lower = closer)")
    ax.set_ylabel("gold boldness (never trained on)")
    ax.set_title("digits: final points of every run (1,000 samples each)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    frontier_png = docs / "digits_frontier.png"
    fig.savefig(frontier_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    stats = {}
    for method in methods:
        gaps, fds = [], []
        for r in runs:
            if r["method"] == method:
                for h in trajectory(runs_dir / r["name"]):
                    if "gen/score_gap" in h and "eval/frechet" in h:
                        gaps.append(h["gen/score_gap"]), fds.append(h["eval/frechet"])
        if len(gaps) > 2:
            ax.scatter(gaps, fds, s=8, color=colors[method], label=method)
            stats[method] = {"points": len(gaps), "spearman": spearman(gaps, fds)}
    ax.set_xlabel("score gap ||e_fake - e_ref|| (interval mean, epsilon units)")
    ax.set_ylabel("Frechet (200-sample evaluation)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    gap_png = docs / "digits_gap_vs_frechet.png"
    fig.savefig(gap_png, dpi=120)
    plt.close(fig)
    return frontier_png, gap_png, stats


def _verdict(table_rows: list[dict]) -> str:
    """One sentence per method compared with DI++: how many Frechet levels went which way."""
    per: dict[str, dict[str, int]] = {}
    for row in table_rows:
        for part in row["difference (paired by seed)"].split("; "):
            if " - DI++: " not in part:
                continue
            method, outcome = part.split(" - DI++: ")[0], part.rsplit(": ", 1)[1]
            key = ("ahead" if outcome == f"{method.split(' (')[0]} ahead" else "DI++ ahead" if outcome == "DI++ ahead"
                   else "same" if outcome.startswith("no difference") else "no call")
            per.setdefault(method, {"ahead": 0, "DI++ ahead": 0, "same": 0, "no call": 0})[key] += 1
    if not per:
        return "No Frechet level was reached by enough seeds of two methods to compare them."
    return " ".join(
        f"{m} vs DI++ at {sum(c.values())} Frechet levels: {m.split(' (')[0]} ahead at {c['ahead']}, DI++ ahead at "
        f"{c['DI++ ahead']}, no difference beyond the seed spread at {c['same']}, no call (fewer than "
        f"{MIN_SEEDS} paired seeds) at {c['no call']}." for m, c in per.items()) + \
        " (95% percentile-bootstrap intervals over seeds.)"


def _kept_notes(page: Path) -> list[str]:
    """The hand-written block between the NOTES markers of the existing page (empty markers if none)."""
    text = page.read_text() if page.is_file() else ""
    if NOTES[0] in text and NOTES[1] in text:
        return [NOTES[0] + text.split(NOTES[0], 1)[1].split(NOTES[1], 1)[0] + NOTES[1], ""]
    return [NOTES[0], NOTES[1], ""]


def write_doc(docs: Path, runs: list[dict], rows: dict, front: dict, levels: list[float], runs_dir: Path,
              command: str, steps: int) -> str:
    from distar.worlds.digits.judges import markdown_table as digits_table

    ref = rows["reference 50-step CFG"]
    table, table_rows = frontier_table(front, levels, ref, _methods(runs))
    frontier_png, gap_png, gap_stats = plots(runs, rows, runs_dir, docs)
    fired = {r["name"]: {f"fires at step (tolerance {tol:g})": monitor_replay(trajectory(runs_dir / r["name"]), tol)
                         for tol in REPLAY_TOLERANCES} for r in runs}
    monitor_cols = list(next(iter(fired.values())))
    final_rows = [rows["reference 50-step CFG"], rows["one-step init"]]
    for r in runs:
        if r["name"] in rows:
            hist = trajectory(runs_dir / r["name"])
            final_rows.append({**rows[r["name"]], "model": f"{r['method']} a={r['alpha']:g} seed {r['seed']}"
                               + (f" (stopped at step {hist[-1]['step']})" if hist and hist[-1]["step"] < steps else "")})
    lines = [
        "# The digits world: DI* vs DI++ at matched fidelity", "",
        "**Conclusion.** " + _verdict(table_rows), "", *_kept_notes(docs / "digits_results.md"),
        f"Every run post-trains the shipped one-step generator (with its matched fake score) for {steps} generator "
        "steps; gold boldness (mean ink, the simulated preference) is never trained on and never used to choose "
        "anything. Each cell below is gold boldness read off a method's alpha_rew sweep (final points, 1,000 "
        "samples each, starting at the alpha_rew = 0 control) at a fixed Frechet distance, mean over seeds "
        "[95% percentile-bootstrap interval over seeds].", "",
        f"Reference (50-step DDIM, CFG 2): gold {ref['gold_boldness']:.4f}, judge accuracy "
        f"{ref['judge_accuracy']:.3f}, Frechet {ref['frechet']:.2f}. One-step init: gold "
        f"{rows['one-step init']['gold_boldness']:.4f}, Frechet {rows['one-step init']['frechet']:.2f}.", "",
        "## Gold boldness at equal Frechet distance", "", table, "",
        f"![frontier]({frontier_png.name})", "",
        "## Score gap vs Frechet (does the fidelity signal every step computes track the judge?)", "",
        "Spearman rank correlation between a run's logged score gap (interval mean of ||e_fake - e_ref||) and "
        "its 200-sample Frechet at the same step, over all trajectory points of each method: "
        + "; ".join(f"{m}: rho = {s['spearman']:.2f} ({s['points']} points)" for m, s in gap_stats.items()) + ".",
        "", f"![gap vs Frechet]({gap_png.name})", "",
        "## The reward-hacking monitor", "",
        "Rule: held-out `eval/frechet` worse than its best by more than the tolerance (relative) while "
        f"`reward/total` is above its value at the best step, for {MONITOR.patience} evaluations in a row. "
        f"The reward-only run trained with `action: stop` at tolerance {MONITOR.tolerance:g}; every run's logged "
        "metrics replayed through the same rule at that tolerance and at 1 (a doubling of the Frechet distance):",
        "", markdown_table([{"run": n, **{c: "-" if v is None else v for c, v in s.items()}}
                            for n, s in fired.items()], ["run", *monitor_cols]), "",
        "## Every final generator (1,000 samples, seed 0)", "", digits_table(final_rows), "",
        "## How to reproduce", "", f"    {command}", "",
        "Runs are resumable (re-running the command reuses finished runs); `--report-only` rebuilds this page.",
    ]
    text = "\n".join(lines) + "\n"
    (docs / "digits_results.md").write_text(text)
    (docs / "digits_results.json").write_text(json.dumps({"rows": rows, "frontier": {
        m: {str(k): v for k, v in d.items()} for m, d in front.items()}, "monitor": fired,
        "gap_vs_frechet": gap_stats}, indent=1) + "\n")
    return text
