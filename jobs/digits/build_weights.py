"""Rebuild every shipped weight of the digits world from scratch, with fixed seeds, on CPU.

    python -m jobs.digits.build_weights --out distar/weights/digits

Stages (in order; a later stage loads what earlier ones wrote to --out):
    teacher   reference UNet + CLIP text encoder             (teacher split)
    rewards   alignment classifier + boldness regressor      (reward split; gold labels on real digits)
    judge     judge classifier (MLP)                          (held-out split)
    onestep   one-step generator by SIM distillation          (data-free, from the teacher), and the
              distillation's final fake score (post-training starts with a fake matched to the generator)
    onestep_fake  only the fake score, fitted by DSM to the one-step generator already in --out
manifest.json records each file's sha256 and size, the training configs, times and metrics.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from distar.worlds.digits import models
from distar.logs import setup_logging
from distar.worlds.digits.files import FILES, REBUILD

STAGES = ("teacher", "rewards", "judge", "onestep")
EXTRA_STAGES = ("onestep_fake",)


def _update_manifest(out: Path, key: str, entry: dict) -> None:
    p = out / "manifest.json"
    man = json.loads(p.read_text()) if p.is_file() else {}
    man[key] = entry
    man["files"] = {f.name: {"sha256": models.sha256(f), "bytes": f.stat().st_size}
                    for f in sorted(out.glob("*.safetensors"))}
    man["rebuild"] = REBUILD.format(dir=out)
    man["torch"] = torch.__version__
    man["platform"] = platform.platform()
    p.write_text(json.dumps(man, indent=1) + "\n")


def teacher_reference_metrics(out: Path, n_per_class: int = 20) -> dict:
    """Judge metrics of the teacher's 50-step CFG samples, same protocol as bundle.evaluate."""
    from distar.config import DigitsModel
    from distar.worlds.digits import text
    from distar.worlds.digits.bundle import build_bundle
    from distar.worlds.digits.judges import Judges

    b = build_bundle(DigitsModel(weights_dir=str(out)), "cpu")
    prompts = [p for p in text.eval_prompts() for _ in range(n_per_class)]
    images = b.sample_reference(prompts, b.sample_noise(len(prompts), torch.Generator().manual_seed(1234)), steps=50)
    return {k: round(v, 5) for k, v in Judges.load(out).metrics(images, prompts).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for the safetensors files and manifest.json")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES + EXTRA_STAGES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="runs/build_weights", help="training runs of the onestep stages (resumable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(0)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_all = time.time()
    if "teacher" in args.stages:
        from jobs.digits.train_teacher import train_teacher

        unet, te, info = train_teacher(log=log)
        models.save_weights(unet, out / FILES["teacher"])
        models.save_weights(te, out / FILES["text_encoder"])
        info.update(unet_config=models.UNET_CONFIG, text_config=models.TEXT_CONFIG)
        _update_manifest(out, "teacher", info)
    if "rewards" in args.stages:
        from jobs.digits.train_small import train_alignment, train_boldness

        m, info = train_alignment()
        models.save_weights(m, out / FILES["alignment"], dtype=torch.float32)
        _update_manifest(out, "alignment_reward", info)
        m, info = train_boldness()
        models.save_weights(m, out / FILES["boldness"], dtype=torch.float32)
        _update_manifest(out, "boldness_reward", info)
        log(f"rewards done")
    if "judge" in args.stages:
        from jobs.digits.train_small import train_judge

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
        from jobs.digits.distill import distill_onestep

        state, fake, info = distill_onestep(out, runs=Path(args.runs) / "distill")
        models.save_weights(state, out / FILES["onestep"])
        models.save_weights(fake, out / FILES["onestep_fake"])
        _update_manifest(out, "onestep", info)
    if "onestep_fake" in args.stages:
        from jobs.digits.distill import fit_fake_score

        fake, info = fit_fake_score(out, runs=Path(args.runs) / "fake_fit")
        models.save_weights(fake, out / FILES["onestep_fake"])
        _update_manifest(out, "onestep_fake", info)
    log(f"build_weights done in {time.time() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
