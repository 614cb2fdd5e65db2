"""Small 2-D world runs for the fault tests: in-process (`train`) or as the `distar train` command (`command`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from distar.config import load_config
from distar.train_loop import run_training

SMALL = ["train.batch_size=64", "train.fake_warmup_steps=5", "train.log_every=10", "train.threads=1",
         "train.device=cpu", "model.hidden=32"]


def overrides(out_dir: Path, *extra: str) -> list[str]:
    return [f"train.out_dir={out_dir}", *SMALL, *extra]


def train(out_dir: Path, *extra: str):
    """One in-process run of the 2-D world into `out_dir` (resumes from what is there)."""
    torch.set_num_threads(1)
    return run_training(load_config("gaussian2d", overrides(out_dir, *extra)))


def command(out_dir: Path, *extra: str) -> list[str]:
    """`distar train` for the same run, as a separate process."""
    return [sys.executable, "-m", "distar.cli", "-q", "train", "--config", "gaussian2d", *overrides(out_dir, *extra)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def replace_file(ckpt_dir: Path, name: str, data: bytes) -> None:
    """Put `data` in place of a checkpoint's file, with meta.json's recorded size to match (a careful edit)."""
    import json

    (ckpt_dir / name).write_bytes(data)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    meta["files"][name] = len(data)
    (ckpt_dir / "meta.json").write_text(json.dumps(meta))
