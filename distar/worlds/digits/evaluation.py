"""Judging digits models (never used in training): gold boldness, judge accuracy, Frechet distance in the
judge's features against held-out real digits, per-class diversity, proxy rewards, seconds per image.

The judge is an MLP trained on the held-out split (a different architecture and a different split from the
proxy rewards), so a generator that fools the proxies does not automatically fool it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import data, models, text


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    from scipy import linalg

    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def per_class_diversity(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise distance between same-class feature vectors."""
    out = []
    for k in labels.unique().tolist():
        f = feats[labels == k]
        if f.shape[0] > 1:
            d = torch.cdist(f, f)
            out.append((d.sum() / (f.shape[0] * (f.shape[0] - 1))).item())
    return float(np.mean(out)) if out else float("nan")


@dataclass
class Judges:
    judge: models.DigitMLP
    real_feats: torch.Tensor      # judge features of the held-out real digits
    real_diversity: float
    device: torch.device

    @classmethod
    def load(cls, weights_dir: str | Path | None = None, device: torch.device | str = "cpu") -> "Judges":
        from .bundle import FILES, SHIPPED_DIR

        d = Path(weights_dir) if weights_dir is not None else SHIPPED_DIR
        judge = models.load_weights(models.DigitMLP(), d / FILES["judge"]).to(device).eval().requires_grad_(False)
        x, y = data.load_split("heldout")
        with torch.no_grad():
            feats = judge.features(x.to(device)).cpu()
        return cls(judge, feats, per_class_diversity(feats, y), torch.device(device))

    @torch.no_grad()
    def metrics(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """images [N, C, H, W] in [0, 1] generated for `prompts` (each naming one digit)."""
        labels = torch.tensor([text.parse_digit(p) for p in prompts])
        images = images.to(self.device)
        feats = self.judge.features(images)
        pred = self.judge.head(feats).argmax(-1).cpu()
        feats = feats.cpu()
        return {
            "gold_boldness": data.gold_boldness(images).mean().item(),
            "judge_accuracy": (pred == labels).float().mean().item(),
            "frechet": frechet_distance(feats, self.real_feats),
            "diversity": per_class_diversity(feats, labels) / self.real_diversity,
        }


@torch.no_grad()
def proxy_rewards(images: torch.Tensor, prompts: Sequence[str], weights_dir=None) -> dict[str, float]:
    from .rewards import build_alignment_reward, build_boldness_reward

    a = build_alignment_reward(weights_dir, images.device)(images, prompts)
    b = build_boldness_reward(weights_dir, images.device)(images, prompts)
    return {"proxy_alignment": a.mean().item(), "proxy_boldness": b.mean().item()}


def evaluate_sampler(name: str, sample: Callable[[list[str], torch.Generator], torch.Tensor],
                     judges: Judges, n_per_class: int = 100, seed: int = 0, batch: int = 250,
                     weights_dir=None) -> dict:
    """One table row: `sample(prompts, rng) -> images [n,1,16,16] in [0,1]`, timed per image."""
    prompts = [p for p in text.eval_prompts() for _ in range(n_per_class)]
    sample(prompts[:20], torch.Generator().manual_seed(seed + 1))  # warm-up: one-time costs are not timed
    rng = torch.Generator().manual_seed(seed)
    chunks, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunks.append(sample(prompts[i:i + batch], rng))
    secs = (time.perf_counter() - t0) / len(prompts)
    images = torch.cat(chunks)
    row = {"model": name, "n": len(prompts)}
    row.update(proxy_rewards(images, prompts, weights_dir))
    row.update(judges.metrics(images, prompts))
    row["sec_per_image"] = secs
    return row


def real_row(judges: Judges, weights_dir=None) -> dict:
    """The held-out real digits scored like a model (the Frechet floor is not 0: same set)."""
    x, y = data.load_split("heldout")
    prompts = [text.eval_prompts()[k] for k in y.tolist()]
    row = {"model": "real held-out digits", "n": len(prompts)}
    row.update(proxy_rewards(x, prompts, weights_dir))
    row.update(judges.metrics(x, prompts))
    row["sec_per_image"] = float("nan")
    return row


COLUMNS = [("model", "model", "{}"), ("proxy_alignment", "proxy align (log p)", "{:.3f}"),
           ("proxy_boldness", "proxy bold", "{:.4f}"), ("gold_boldness", "gold bold", "{:.4f}"),
           ("judge_accuracy", "judge acc", "{:.3f}"), ("frechet", "Frechet", "{:.2f}"),
           ("diversity", "diversity (real=1)", "{:.3f}"), ("sec_per_image", "ms / image", "{}")]


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            if key == "sec_per_image":
                cells.append("-" if v is None or v != v else f"{1000 * v:.2f}")
            else:
                cells.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
