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

from ... import tables
from ...frechet import frechet_distance
from . import data, models, text
from .files import weight_file
from .rewards import build_alignment_reward, build_boldness_reward


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
        judge = models.load_weights(models.DigitMLP(), weight_file(weights_dir, "judge"))
        judge = judge.to(device).eval().requires_grad_(False)
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


COLUMNS = {"model": "model", "proxy_alignment": "proxy align (log p)", "proxy_boldness": "proxy bold",
           "gold_boldness": "gold bold", "judge_accuracy": "judge acc", "frechet": "Frechet",
           "diversity": "diversity (real=1)", "sec_per_image": "ms / image"}
FORMATS = {"proxy_alignment": "{:.3f}".format, "proxy_boldness": "{:.4f}".format, "gold_boldness": "{:.4f}".format,
           "judge_accuracy": "{:.3f}".format, "frechet": "{:.2f}".format, "diversity": "{:.3f}".format,
           "sec_per_image": lambda v: "-" if v != v else f"{1000 * v:.2f}"}


def markdown_table(rows: Sequence[dict]) -> str:
    """The digits results table (the columns of docs/digits_results.md)."""
    return tables.markdown_table(rows, list(COLUMNS), headers=COLUMNS, formats=FORMATS)
