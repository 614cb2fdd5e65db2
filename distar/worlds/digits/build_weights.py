"""Rebuild every shipped weight of the digits world from scratch, with fixed seeds, on CPU.

    python -m distar.worlds.digits.build_weights --out distar/weights/digits

Stages (in order; a later stage loads what earlier ones wrote to --out):
    teacher   reference UNet + CLIP text encoder             (teacher split)
    rewards   alignment classifier + boldness regressor      (reward split; gold labels on real digits)
    judge     judge classifier (MLP)                          (held-out split)
    onestep   one-step generator by SIM distillation          (data-free, from the teacher)
manifest.json records each file's sha256 and size, the training configs, times and metrics.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from . import models
from .bundle import FILES

STAGES = ("teacher", "rewards", "judge", "onestep")


def _update_manifest(out: Path, key: str, entry: dict) -> None:
    p = out / "manifest.json"
    man = json.loads(p.read_text()) if p.is_file() else {}
    man[key] = entry
    man["files"] = {f.name: {"sha256": models.sha256(f), "bytes": f.stat().st_size}
                    for f in sorted(out.glob("*.safetensors"))}
    man["rebuild"] = "python -m distar.worlds.digits.build_weights --out " + str(out)
    man["torch"] = torch.__version__
    man["platform"] = platform.platform()
    p.write_text(json.dumps(man, indent=1) + "\n")


def teacher_reference_metrics(out: Path, n_per_class: int = 20) -> dict:
    """Judge metrics of the teacher's 50-step CFG samples, same protocol as bundle.evaluate."""
    from ...config import DigitsModel
    from . import text
    from .bundle import build_bundle
    from .evaluation import Judges

    b = build_bundle(DigitsModel(weights_dir=str(out)), "cpu")
    prompts = [p for p in text.eval_prompts() for _ in range(n_per_class)]
    images = b.sample_reference(prompts, torch.Generator().manual_seed(1234), steps=50)
    return {k: round(v, 5) for k, v in Judges.load(out).metrics(images, prompts).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for the safetensors files and manifest.json")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)
    t_all = time.time()
    if "teacher" in args.stages:
        from .train_teacher import train_teacher

        unet, te, info = train_teacher(log=log)
        models.save_weights(unet, out / FILES["teacher"])
        models.save_weights(te, out / FILES["text_encoder"])
        info.update(unet_config=models.UNET_CONFIG, text_config=models.TEXT_CONFIG)
        _update_manifest(out, "teacher", info)
    if "rewards" in args.stages:
        from .train_small import train_alignment, train_boldness

        m, info = train_alignment()
        models.save_weights(m, out / FILES["alignment"], dtype=torch.float32)
        _update_manifest(out, "alignment_reward", info)
        m, info = train_boldness()
        models.save_weights(m, out / FILES["boldness"], dtype=torch.float32)
        _update_manifest(out, "boldness_reward", info)
        log(f"rewards done")
    if "judge" in args.stages:
        from .train_small import train_judge

        m, info = train_judge()
        models.save_weights(m, out / FILES["judge"], dtype=torch.float32)
        _update_manifest(out, "judge", info)
        log(f"judge done: {info}")
    if "teacher" in args.stages or "judge" in args.stages:
        t0 = time.time()
        ref = teacher_reference_metrics(out)
        _update_manifest(out, "teacher_reference_metrics", {**ref, "seconds": round(time.time() - t0, 1),
                                                            "protocol": "50-step DDIM, CFG 2, 20 per class"})
        log(f"teacher reference metrics: {ref}")
    if "onestep" in args.stages:
        from .distill import distill_onestep

        state, info = distill_onestep(out, log=log)
        models.save_weights(state, out / FILES["onestep"])
        _update_manifest(out, "onestep", info)
    log(f"build_weights done in {time.time() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
