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

_METHOD_ALPHA = re.compile(r"^(.+)@([-+0-9.eE]+)$")


def pooled_features(images: torch.Tensor, side: int = 4) -> torch.Tensor:
    """[n, C, H, W] -> [n, C * side * side] average-pooled pixels (greyscale repeated to 3 channels)."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return torch.nn.functional.adaptive_avg_pool2d(x, side).flatten(1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor, ridge: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to a [N, D] and b [M, D] (ridge keeps small-N covariances PSD)."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    cov = lambda x: (np.cov(x, rowvar=False) if x.shape[0] > 1 else np.zeros((x.shape[1],) * 2)) + ridge * np.eye(x.shape[1])  # noqa: E731
    s1, s2 = cov(a), cov(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    fd = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    return max(float(fd), 0.0)  # rounding makes identical sets give -1e-13


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


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


def grid(images: list[torch.Tensor], cols: int, min_side: int = 64):
    """PIL grid of images [C, H, W] in [0, 1] (1-px grey borders), upscaled (nearest) to >= min_side px cells."""
    from PIL import Image

    from .cache import to_uint8

    arr = to_uint8(torch.stack(images))
    n, h, w, c = arr.shape
    rows = math.ceil(n / cols)
    g = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 64, dtype=np.uint8)
    for i, im in enumerate(arr):
        r, q = divmod(i, cols)
        g[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = im
    img = Image.fromarray(g[..., 0] if c == 1 else g)
    s = max(1, math.ceil(min_side / h))
    return img.resize((img.width * s, img.height * s), Image.NEAREST)
