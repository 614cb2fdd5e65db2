"""Where the digits world's weights live: the shipped directory, the file of each model, the manifest.

    files.weights_dir(None)              the shipped distar/weights/digits (or a rebuilt directory)
    files.weight_file(path, "judge")     a weights dir or a single .safetensors file -> the file
"""
from __future__ import annotations

import json
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "weights" / "digits"
FILES = {"teacher": "teacher_unet.safetensors", "text_encoder": "text_encoder.safetensors",
         "onestep": "onestep_generator.safetensors", "onestep_fake": "onestep_fake_score.safetensors",
         "alignment": "alignment_reward.safetensors", "boldness": "boldness_reward.safetensors",
         "judge": "judge_classifier.safetensors"}
REBUILD = "python -m jobs.digits.build_weights --out {dir}"


def weights_dir(path: str | Path | None = None) -> Path:
    """A digits weights directory that holds at least the teacher (None = the shipped one)."""
    d = Path(path) if path is not None else SHIPPED_DIR
    if not (d / FILES["teacher"]).is_file():
        raise FileNotFoundError(f"digits weights_dir {str(d)!r}: no {FILES['teacher']} (rebuild with "
                                f"`{REBUILD.format(dir=d)}` from a checkout of the repository)")
    return d


def weight_file(path: str | Path | None, name: str) -> Path:
    """`path` a weights dir (or None = shipped) -> its file for model `name`; a file path is used as is."""
    p = Path(path) if path is not None else SHIPPED_DIR
    return p / FILES[name] if p.is_dir() else p


def read_manifest(d: Path) -> dict:
    p = Path(d) / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {}
