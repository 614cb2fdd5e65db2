"""Results tables (markdown + JSON, shaped like the paper's), the per-category breakdown, image grids and the
reward-vs-divergence plot.

Divergence proxy (x of the plot, column "FD-pix to REF"): the Frechet distance between Gaussians fitted to
4x4 average-pooled RGB images (48 features) of a model and of the reference row (the first multi-step model
given, else the first model), over the same prompts and seeds. It is a cheap fidelity proxy that needs no
extra network: 0 for the reference itself, growing as a model's colour/layout statistics drift from the
reference's. It is not FID; with few images it is noisy and biased upwards.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from ..tables import markdown_table

_METHOD_ALPHA = re.compile(r"^(.+)@([-+0-9.eE]+)$")


def pooled_features(images: torch.Tensor, side: int = 4) -> torch.Tensor:
    """[n, C, H, W] -> [n, C * side * side] average-pooled pixels (greyscale repeated to 3 channels)."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return torch.nn.functional.adaptive_avg_pool2d(x, side).flatten(1)


def category_tables(per_category: dict[str, dict[str, dict[str, float]]], metrics: list[str],
                    counts: dict[str, int]) -> str:
    """One markdown table per metric: rows = categories (with prompt counts), columns = models."""
    labels = list(per_category)
    out = []
    for m in metrics:
        rows = [{"category": c, "prompts": counts[c], **{lab: per_category[lab][c][m] for lab in labels}}
                for c in counts]
        out.append(f"### {m}\n\n" + markdown_table(rows, ["category", "prompts", *labels]))
    return "\n\n".join(out)


def method_groups(labels: list[str]) -> dict[str, list[tuple[float, str]]]:
    """Labels METHOD@alpha grouped by METHOD (only groups with >= 2 runs), sorted by alpha."""
    groups: dict[str, list[tuple[float, str]]] = {}
    for lab in labels:
        m = _METHOD_ALPHA.match(lab)
        if m:
            try:
                groups.setdefault(m.group(1), []).append((float(m.group(2)), lab))
            except ValueError:
                continue
    return {k: sorted(v) for k, v in groups.items() if len(v) >= 2}


def reward_divergence_plot(rows: list[dict], metrics: list[str], x_key: str, path: Path) -> Path | None:
    """One panel per reward: x = divergence proxy, y = mean reward, a line per METHOD through its alphas."""
    by_label = {r["model"]: r for r in rows}
    groups = method_groups(list(by_label))
    if not groups or not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for method, runs in groups.items():
            xs = [by_label[lab][x_key] for _, lab in runs]
            ys = [by_label[lab][m] for _, lab in runs]
            ax.plot(xs, ys, "o-", label=method)
            for (alpha, _), x, y in zip(runs, xs, ys):
                ax.annotate(f"{alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for r in rows:  # the other rows (references, baselines) as single points
            if not any(r["model"] == lab for runs in groups.values() for _, lab in runs):
                ax.scatter([r[x_key]], [r[m]], marker="x", color="k")
                ax.annotate(r["model"], (r[x_key], r[m]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel(x_key)
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
