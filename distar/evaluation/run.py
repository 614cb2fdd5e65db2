"""`distar eval --prompts FILE`: generate (cached, timed), score, tabulate, plot, optionally log to MLflow.

    distar eval --prompts /data/PartiPrompts.tsv --limit 200 --images-per-prompt 1 \
        --models "SDXL-base=ref@50:stabilityai/stable-diffusion-xl-base-1.0" DI*@100=runs/di_star/final \
        --rewards image_reward:/w/IR aesthetic:/w/aes pickscore:/w/pick clip_score:/w/clip --out results/parti

Writes OUT/results.md, OUT/results.json, OUT/scores.json (every image's scores), OUT/grids/*.png,
OUT/reward_vs_divergence.png (when labels METHOD@alpha give >= 2 runs of a method) and OUT/images/ (the
cache a re-run resumes from).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import is_model_dir
from ..errors import UserError
from .cache import GenerationCache, slug
from .models import EvalModel, image_seed, load_eval_model, parse_models
from .report import (category_tables, frechet_distance, grid, markdown_table, pooled_features,
                     reward_divergence_plot)
from .scoring import DISPLAY, parse_rewards, reward_client, score_images


def _check_spec(label: str, spec: str) -> None:
    """Cheap checks of every --models entry before anything is loaded or generated."""
    from .models import _REF

    if _REF.match(spec) or spec.startswith("models:/") or spec in ("digits-teacher", "digits-onestep"):
        return
    p = Path(spec)
    if not p.is_dir():
        raise UserError(f"--models {label}={spec}: not ref[@N]:PIPELINE, a checkpoint directory, a models:/ URI "
                        f"or a built-in digits model")
    if not is_model_dir(p):
        raise UserError(f"--models {label}={spec}: a checkpoint directory needs config.yaml and generator.safetensors")


def generate_missing(model: EvalModel, cache: GenerationCache, prompts: list, n_images: int, seed: int,
                     batch_prompts: int, device: str) -> int:
    """Generate the prompts the cache lacks, timing each batch (after one untimed warm-up); returns how many."""
    idx = list(range(len(prompts)))
    todo = cache.missing(idx, [p.text for p in prompts], n_images)
    if not todo:
        return 0
    model.generate([prompts[todo[0]].text], [image_seed(seed, todo[0], 0)])  # warm-up: kernels, lazy init
    for k in range(0, len(todo), batch_prompts):
        chunk = todo[k:k + batch_prompts]
        texts = [prompts[i].text for i in chunk for _ in range(n_images)]
        seeds = [image_seed(seed, i, j) for i in chunk for j in range(n_images)]
        t0 = time.perf_counter()
        images = model.generate(texts, seeds)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / len(chunk)
        for q, i in enumerate(chunk):
            cache.put(i, prompts[i].text, images[q * n_images:(q + 1) * n_images], dt)
        cache.flush()
    return len(todo)


def _load_all(cache: GenerationCache, n_prompts: int, n_images: int) -> torch.Tensor:
    return torch.stack([cache.load(i, j) for i in range(n_prompts) for j in range(n_images)])


def evaluate_prompts(args) -> dict:
    from ..prompts import load_prompts

    if args.images_per_prompt <= 0 or args.steps <= 0 or args.batch_size <= 0:
        raise UserError("--images-per-prompt, --steps and --batch-size must be >= 1")
    try:
        prompts = load_prompts(args.prompts, args.limit)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"--prompts: {err}") from None
    rewards = parse_rewards(args.rewards or [])
    pairs = parse_models(args.models)
    for label, spec in pairs:
        _check_spec(label, spec)
    out = Path(args.out)
    n_img, texts = args.images_per_prompt, [p.text for p in prompts]
    caches, meta, generated = {}, {}, {}
    for label, spec in pairs:  # one model in memory at a time
        model = load_eval_model(label, spec, args.steps, args.guidance, args.device, args.dtype)
        cache = GenerationCache(out, label, {"spec": spec, "seed": args.seed, "images_per_prompt": n_img,
                                             **model.settings})
        generated[label] = generate_missing(model, cache, prompts, n_img, args.seed, args.batch_size, args.device)
        print(f"[eval] {label}: generated {generated[label]} prompts, {len(prompts) - generated[label]} cached",
              flush=True)
        caches[label], meta[label] = cache, {"steps": model.steps, "multistep": model.multistep}
        del model

    images = {label: _load_all(c, len(prompts), n_img) for label, c in caches.items()}
    all_texts = [t for t in texts for _ in range(n_img)]
    scores: dict[str, dict[str, np.ndarray]] = {label: {} for label in caches}
    if rewards:
        with reward_client(rewards, args.rewards_backend, args.device) as client:
            for label, x in images.items():
                bs = args.batch_size * n_img
                parts = [score_images(client, x[k:k + bs], all_texts[k:k + bs]) for k in range(0, len(x), bs)]
                for name, _ in rewards:
                    scores[label][DISPLAY.get(name, name)] = torch.cat([p[name] for p in parts]).numpy()
    metrics = [DISPLAY.get(n, n) for n, _ in rewards]

    ref_label = next((lab for lab in caches if meta[lab]["multistep"]), next(iter(caches)))
    ref_feats = pooled_features(images[ref_label])
    fd_key = f"FD-pix to {ref_label}"
    rows = []
    for label, c in caches.items():
        r = {"model": label, "steps": meta[label]["steps"], "images": len(images[label])}
        r.update({m: float(scores[label][m].mean()) for m in metrics})
        r[fd_key] = frechet_distance(pooled_features(images[label]), ref_feats)
        r["s / image"] = c.seconds_per_image(list(range(len(prompts))), n_img)
        rows.append(r)
    columns = ["model", "steps", *metrics, fd_key, "s / image"]

    cat_of = [p.category or "(none)" for p in prompts]
    counts = {c: cat_of.count(c) for c in dict.fromkeys(cat_of)}
    cats = [c for c in cat_of for _ in range(n_img)]
    per_cat = {label: {c: {m: float(np.mean([s for s, k in zip(scores[label][m], cats) if k == c])) for m in metrics}
                       for c in counts} for label in caches}

    (out / "grids").mkdir(exist_ok=True)
    show = min(len(prompts), 8)
    for label in caches:
        grid([images[label][i * n_img + j] for i in range(min(len(prompts), 16)) for j in range(n_img)],
             cols=n_img * 4 if n_img < 4 else n_img).save(out / "grids" / f"{slug(label)}.png")
    grid([images[label][i * n_img] for label in caches for i in range(show)], cols=show).save(
        out / "grids" / "comparison.png")
    plot = reward_divergence_plot(rows, metrics, fd_key, out / "reward_vs_divergence.png")

    md = [f"## Results: {len(prompts)} prompts from {args.prompts}, {n_img} image(s) each, seed {args.seed}", "",
          markdown_table(rows, columns), "",
          f"Rewards: mean raw score over all images. {fd_key}: Frechet distance of 4x4-pooled RGB pixels vs "
          f"{ref_label} (a fidelity proxy, lower = closer). s / image: generation wall time (batches of "
          f"{args.batch_size} prompts, after a warm-up), from the run that generated the images.", ""]
    if metrics:
        md += ["## Per category", "", category_tables(per_cat, metrics, counts), ""]
    md += ["## Grids", "", "comparison: rows = models (" + ", ".join(caches) + f"), columns = the first {show} prompts",
           *[f"- {label}: grids/{slug(label)}.png" for label in caches]]
    if plot:
        md += ["", "Reward vs divergence: reward_vs_divergence.png"]
    (out / "results.md").write_text("\n".join(md) + "\n")
    result = {"prompts": str(args.prompts), "n_prompts": len(prompts), "images_per_prompt": n_img, "seed": args.seed,
              "rewards": [{"name": n, "path": p} for n, p in rewards], "rewards_backend": args.rewards_backend,
              "columns": columns, "rows": rows, "reference": ref_label, "per_category": per_cat,
              "category_counts": counts, "generated": generated}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "scores.json").write_text(json.dumps(
        {label: {"prompt_index": [i for i in range(len(prompts)) for _ in range(n_img)],
                 **{m: v.tolist() for m, v in s.items()}} for label, s in scores.items()}) + "\n")
    if args.mlflow:
        from .tracking import log_eval

        result["mlflow_run_id"] = log_eval(args.mlflow_uri, args.mlflow_experiment, result, out)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(rows, columns), flush=True)
    return result
