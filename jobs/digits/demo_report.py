"""The main job's before/after table: the 50-step CFG reference, the one-step init and the trained generator,
each measured by the judges on 1,000 samples (100 per digit, sample seed 0), and the three conditions a
post-trained model must meet (gold boldness above the reference, judge accuracy at least the reference's minus
0.02, Frechet at most 1.5x the reference's).

The reference row costs minutes on a CPU (50 UNet steps x CFG per image), so it is measured once and kept
beside the weights (`reference_eval.json`, written by `python -m jobs.digits.reference_eval`), keyed by the
SHA-256 of the teacher, judge and reward files it was measured with; a stale or missing file is re-measured.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from distar.worlds.digits import files

log = logging.getLogger(__name__)
REFERENCE_FILE = "reference_eval.json"
KEYED_BY = ("teacher", "text_encoder", "judge", "alignment", "boldness")
REF_LABEL = "reference, 50-step DDIM, CFG 2"


def _digest(d: Path) -> dict[str, str]:
    return {k: hashlib.sha256((d / files.FILES[k]).read_bytes()).hexdigest() for k in KEYED_BY}


def measure(spec: str, label: str, weights_dir: Path, n_per_class: int = 100) -> dict:
    """One row of the judges' table for a built-in model name or a run's final/ directory."""
    from distar.loading import load_model

    from distar.worlds.digits.judges import Judges, evaluate_sampler

    model = load_model(spec, weights_dir=str(weights_dir))
    kw = {"steps": 50} if model.multistep else {}
    return evaluate_sampler(label, lambda p, g: model.sample(p, g, **kw), Judges.load(weights_dir), n_per_class,
                            seed=0, weights_dir=weights_dir)


def reference_row(weights_dir: str | Path | None = None, remeasure: bool = False) -> dict:
    """The reference's 1,000-sample row: from reference_eval.json when it matches the weights, else measured."""
    d = files.weights_dir(weights_dir)
    path, digest = d / REFERENCE_FILE, _digest(d)
    if not remeasure and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("sha256") == digest:
            return saved["row"]
        log.warning("%s was measured with other weights: measuring the reference again (minutes)", path)
    row = measure("digits-teacher", REF_LABEL, d)
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"row": row, "sha256": digest,
                                   "command": f"python -m jobs.digits.reference_eval --weights-dir {d}"}, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only install still gets its table
        log.warning("could not keep the reference row in %s: %s", path, e)
    return row


def conditions(ref: dict, trained: dict) -> list[tuple[str, bool]]:
    """The three conditions of the main job, each with whether `trained` meets it."""
    return [(f"gold boldness {trained['gold_boldness']:.4f} > reference {ref['gold_boldness']:.4f}",
             trained["gold_boldness"] > ref["gold_boldness"]),
            (f"judge accuracy {trained['judge_accuracy']:.3f} >= reference - 0.02 = "
             f"{ref['judge_accuracy'] - 0.02:.3f}", trained["judge_accuracy"] >= ref["judge_accuracy"] - 0.02),
            (f"Frechet {trained['frechet']:.2f} <= 1.5 x reference = {1.5 * ref['frechet']:.2f}",
             trained["frechet"] <= 1.5 * ref["frechet"])]


def demo_table(final_dir: str | Path, label: str, init_spec: str = "digits-onestep",
               weights_dir: str | Path | None = None) -> str:
    """Markdown: reference / init / trained rows (1,000 samples each) and the three conditions."""
    from distar.worlds.digits.judges import markdown_table

    d = files.weights_dir(weights_dir)
    ref = reference_row(d)
    rows = [ref, measure(init_spec, "one-step init", d), measure(str(final_dir), label, d)]
    checks = conditions(ref, rows[-1])
    lines = [markdown_table(rows), "", "Conditions (1,000 samples, the judges never enter training):"]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    lines.append("all three met" if all(ok for _, ok in checks) else "NOT all met")
    lines += ["", f"(The reference's ms / image comes from {REFERENCE_FILE}, measured once on whatever load that "
              "machine had; `python -m jobs.bench_onestep_vs_multistep` times both in one run, as a ratio.)"]
    return "\n".join(lines)
