"""Training checkpoints, written atomically, and the exportable generator directory.

Layout of a checkpoint directory (also what `distar generate --model DIR` and serving load):
    config.yaml              the resolved RunConfig
    generator.safetensors    the EMA generator's full state dict (what gets served and registered)
    meta.json                step, metrics at save time
    train_state.pt           everything needed to resume: raw generator, fake score, both optimizers,
                             EMA shadow, step, RNG state (absent in export-only directories)

A directory is written under a temporary name and renamed into place, so a crash mid-write never leaves
a half checkpoint where a resume would find it. `latest` (a one-line file) names the newest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

GENERATOR_FILE = "generator.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


def _contiguous_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def write_atomic_dir(final: Path, write: callable) -> Path:
    """Call `write(tmpdir)` then rename tmpdir to `final` (replacing an older one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_generator_dir(out: Path, generator_state: dict[str, torch.Tensor], config_yaml: str,
                       meta: dict[str, Any], train_state: dict[str, Any] | None = None) -> Path:
    def write(tmp: Path) -> None:
        save_file(_contiguous_cpu(generator_state), str(tmp / GENERATOR_FILE))
        (tmp / CONFIG_FILE).write_text(config_yaml)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=float))
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)

    return write_atomic_dir(Path(out), write)


def save_step_checkpoint(run_dir: Path, step: int, **kwargs) -> Path:
    """checkpoints/step_XXXXXXX under `run_dir`, then point `latest` at it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    path = save_generator_dir(ckpt_root / f"step_{step:07d}", **kwargs)
    write_text_atomic(ckpt_root / "latest", path.name + "\n")
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under `run_dir`, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def is_model_dir(path: str | Path) -> bool:
    """A directory `distar generate/serve/eval` can load: config.yaml + generator.safetensors."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / GENERATOR_FILE).is_file()


def load_generator_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(model_dir) / GENERATOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model directory {str(model_dir)!r}: no {GENERATOR_FILE} (expected a directory "
                                f"written by `distar train`)")
    return load_file(str(path))


def load_train_state(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location=map_location, weights_only=False)
