"""Train the small supervised models: the two proxy rewards (reward split) and the judge (held-out split)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from distar.progress import progress
from distar.worlds.digits import data, models
from distar.worlds.digits.rewards import AlignmentReward, BoldnessReward


def _shift(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel translations (label-preserving for class and for mean ink, up to the border)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=rng).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _fit(net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn, steps: int, lr: float,
         seed: int, augment: bool, batch_size: int = 64) -> float:
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    t0 = time.time()
    for _ in progress(range(steps), desc="small model", unit="step"):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=rng)
        xb = _shift(x[idx], rng) if augment else x[idx]
        loss = loss_fn(net(xb), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return time.time() - t0


@torch.no_grad()
def _accuracy(net, x, y) -> float:
    return (net(x).argmax(-1) == y).float().mean().item()


def train_alignment(steps: int = 1500, seed: int = 1) -> tuple[AlignmentReward, dict]:
    x, y = data.load_split("reward")
    # Seeded init (the shipped alignment_reward predates this line: its init came from the unseeded global
    # RNG, so a rebuild gives a different, equally trained classifier). The boldness and judge inits follow
    # deterministically from the fits before them (build order: rewards, then judge).
    torch.manual_seed(seed)
    m = AlignmentReward()
    secs = _fit(m.classifier, x, y, F.cross_entropy, steps, 2e-3, seed, augment=True)
    xh, yh = data.load_split("heldout")
    return m, dict(split="reward", steps=steps, seed=seed, lr=2e-3, train_seconds=round(secs, 1),
                   train_accuracy=round(_accuracy(m.classifier, x, y), 4),
                   heldout_accuracy=round(_accuracy(m.classifier, xh, yh), 4))


def train_boldness(steps: int = 1500, seed: int = 2) -> tuple[BoldnessReward, dict]:
    """Fitted to gold labels of real reward-split digits only (labels = the simulated human preference)."""
    x, _ = data.load_split("reward")
    gold = data.gold_boldness(x)
    m = BoldnessReward()
    secs = _fit(m.regressor, x, gold[:, None], F.mse_loss, steps, 2e-3, seed, augment=False)
    xh, _ = data.load_split("heldout")
    with torch.no_grad():
        pred, gh = m(xh, [""] * len(xh)), data.gold_boldness(xh)
    r2 = 1 - ((pred - gh) ** 2).mean() / gh.var()
    return m, dict(split="reward", steps=steps, seed=seed, lr=2e-3, train_seconds=round(secs, 1),
                   heldout_r2=round(r2.item(), 4), heldout_mae=round((pred - gh).abs().mean().item(), 5))


def train_judge(steps: int = 3000, seed: int = 3) -> tuple[models.DigitMLP, dict]:
    """The judge classifier (an MLP, unlike the CNN proxies), trained on the held-out split only."""
    x, y = data.load_split("heldout")
    m = models.DigitMLP()
    secs = _fit(m, x, y, F.cross_entropy, steps, 1e-3, seed, augment=True)
    xt, yt = data.load_split("teacher")
    return m, dict(split="heldout", steps=steps, seed=seed, lr=1e-3, train_seconds=round(secs, 1),
                   train_accuracy=round(_accuracy(m, x, y), 4), teacher_split_accuracy=round(_accuracy(m, xt, yt), 4))
