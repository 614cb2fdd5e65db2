"""`distar eval --prompts FILE`: generate (cached, timed), score, tabulate, plot, optionally log to MLflow.

    distar eval --prompts parti --limit 200 --images-per-prompt 1 \
        --models "SDXL-base=ref@50:stabilityai/stable-diffusion-xl-base-1.0" DI*@100=runs/di_star/final \
        --rewards image_reward:/w/IR aesthetic:/w/aes pickscore:/w/pick clip_score:/w/clip --out results/parti

Writes OUT/results.md, OUT/results.json, OUT/scores.json (every image's scores), OUT/grids/*.png,
OUT/reward_vs_divergence.png (when labels METHOD@alpha give >= 2 runs of a method) and OUT/images/ (the
cache a re-run resumes from). Reward scoring goes through whatever `RewardClient` the caller opens (in
process, or the Ray Serve deployments: the command layer decides), so this module never imports Ray.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..images import grid
from ..progress import progress
from ..prompts import Prompt, load_prompts
from ..rewards.base import RewardClient
from .cache import GenerationCache, slug
from .models import EvalModel, check_eval_spec, image_seed, load_eval_model, parse_models
from ..frechet import frechet_distance
from .report import category_tables, markdown_table, pooled_features, reward_divergence_plot
from .scoring import DISPLAY, parse_rewards, score_images

log = logging.getLogger(__name__)
RewardClientFactory = Callable[[list[tuple[str, "str | None"]]], AbstractContextManager[RewardClient]]


@dataclass(frozen=True)
class PromptEval:
    """What `distar eval --prompts` evaluates (the CLI flags, typed)."""
    prompts: str                      # a prompt file, or a shipped set's name (parti)
    models: Sequence[str]             # LABEL=SPEC or SPEC
    out: Path
    rewards: Sequence[str] = ()       # name[:path]
    limit: int | None = None
    images_per_prompt: int = 1
    steps: int = 50
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"              # auto: CUDA when present, else CPU
    dtype: str = "auto"               # auto: bf16/fp16 on a GPU, float32 on a CPU
    rewards_backend: str = "local"
    mlflow: bool = False
    mlflow_uri: str | None = None
    mlflow_experiment: str = "distar-eval"
    fid_ref: str | None = None        # a folder of reference images: FID (and CLIP-FD) columns against it
    fid_weights: str | None = None    # torch-fidelity's Inception-v3 weights file (None: it downloads them)
    clip_fd: str | None = None        # an open_clip spec: CLIP-FD against fid_ref too
    fid_limit: int | None = None      # the first N reference images only


def resolve_device(opts: PromptEval) -> PromptEval:
    """`auto` device and dtype made concrete (pick_device errors name the value asked for)."""
    from dataclasses import replace

    from ..device import inference_dtype, pick_device

    device = pick_device(opts.device)
    dtype = str(inference_dtype(device)).removeprefix("torch.") if opts.dtype == "auto" else opts.dtype
    return replace(opts, device=str(device), dtype=dtype)


def generate_missing(model: EvalModel, cache: GenerationCache, prompts: list, n_images: int, seed: int,
                     batch_prompts: int, device: str) -> int:
    """Generate the prompts the cache lacks, timing each batch (after one untimed warm-up); returns how many."""
    idx = list(range(len(prompts)))
    todo = cache.missing(idx, [p.text for p in prompts], n_images)
    if not todo:
        return 0
    model.generate([prompts[todo[0]].text], [image_seed(seed, todo[0], 0)])  # warm-up: kernels, lazy init
    for k in progress(range(0, len(todo), batch_prompts), desc=f"generate {model.label}", unit="batch"):
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


def _generate_all(opts: PromptEval, pairs, prompts: list[Prompt]) -> tuple[dict, dict, dict]:
    """Fill every model's cache (one model in memory at a time); (caches, meta, generated counts)."""
    caches, meta, generated = {}, {}, {}
    n_img = opts.images_per_prompt
    for label, spec in pairs:
        model = load_eval_model(label, spec, opts.steps, opts.guidance, opts.device, opts.dtype)
        cache = GenerationCache(opts.out, label, {"spec": spec, "seed": opts.seed, "images_per_prompt": n_img,
                                                  **model.settings})
        generated[label] = generate_missing(model, cache, prompts, n_img, opts.seed, opts.batch_size, str(opts.device))
        log.info("%s: generated %d prompts, %d cached", label, generated[label], len(prompts) - generated[label])
        caches[label], meta[label] = cache, {"steps": model.steps, "multistep": model.multistep}
        del model
    return caches, meta, generated


def _score_all(opts: PromptEval, rewards, images: dict, texts: list[str],
               open_client: RewardClientFactory) -> dict[str, dict[str, np.ndarray]]:
    scores: dict[str, dict[str, np.ndarray]] = {label: {} for label in images}
    if not rewards:
        return scores
    bs = opts.batch_size * opts.images_per_prompt
    with open_client(rewards) as client:
        for label, x in images.items():
            parts = [score_images(client, x[k:k + bs], texts[k:k + bs])
                     for k in progress(range(0, len(x), bs), desc=f"score {label}", unit="batch")]
            for name, _ in rewards:
                scores[label][DISPLAY.get(name, name)] = torch.cat([p[name] for p in parts]).numpy()
    return scores


def _open_folder_distances(opts: PromptEval):
    """FolderDistances for opts.fid_ref (reference statistics computed now, before any generation, so a bad
    folder, weights file or CLIP spec fails at once); None without --fid-ref."""
    if not opts.fid_ref:
        return None
    from .fid import FolderDistances, reference_files

    return FolderDistances(reference_files(opts.fid_ref, opts.fid_limit), opts.fid_weights, opts.clip_fd,
                           opts.device, batch=max(opts.batch_size * opts.images_per_prompt, 8))


def _rows(caches: dict, meta: dict, images: dict, scores: dict, metrics: list[str], n_prompts: int,
          n_img: int, folder: dict[str, dict[str, float]]) -> tuple[list[dict], list[str], str]:
    ref_label = next((lab for lab in caches if meta[lab]["multistep"]), next(iter(caches)))
    ref_feats = pooled_features(images[ref_label])
    fd_key = f"FD-pix to {ref_label}"
    rows = []
    for label, c in caches.items():
        r = {"model": label, "steps": meta[label]["steps"], "images": len(images[label])}
        r.update({m: float(scores[label][m].mean()) for m in metrics})
        r.update(folder.get(label, {}))
        r[fd_key] = frechet_distance(pooled_features(images[label]), ref_feats)
        r["s / image"] = c.seconds_per_image(list(range(n_prompts)), n_img)
        rows.append(r)
    dists = list(next(iter(folder.values()), {}))
    return rows, ["model", "steps", *metrics, *dists, fd_key, "s / image"], ref_label


def _write_grids(out: Path, images: dict, n_prompts: int, n_img: int) -> int:
    (out / "grids").mkdir(exist_ok=True)
    show = min(n_prompts, 8)
    for label, x in images.items():
        grid([x[i * n_img + j] for i in range(min(n_prompts, 16)) for j in range(n_img)],
             cols=n_img * 4 if n_img < 4 else n_img).save(out / "grids" / f"{slug(label)}.png")
    grid([x[i * n_img] for x in images.values() for i in range(show)], cols=show).save(out / "grids" / "comparison.png")
    return show


def evaluate_prompts(opts: PromptEval, open_client: RewardClientFactory) -> dict:
    """The whole pipeline; `open_client(rewards)` opens the RewardClient that scores (local or Serve)."""
    if opts.images_per_prompt <= 0 or opts.steps <= 0 or opts.batch_size <= 0:
        raise UserError("--images-per-prompt, --steps and --batch-size must be >= 1")
    if (opts.clip_fd or opts.fid_weights) and not opts.fid_ref:
        raise UserError("--clip-fd / --fid-weights: give --fid-ref DIR too (the reference images they compare to)")
    opts = resolve_device(opts)
    try:
        prompts = load_prompts(opts.prompts, opts.limit)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"--prompts: {err}") from None
    rewards = parse_rewards(opts.rewards or [])
    pairs = parse_models(opts.models)
    for label, spec in pairs:
        check_eval_spec(label, spec)
    out, n_img = Path(opts.out), opts.images_per_prompt
    distances = _open_folder_distances(opts)
    caches, meta, generated = _generate_all(opts, pairs, prompts)
    images = {label: _load_all(c, len(prompts), n_img) for label, c in caches.items()}
    all_texts = [p.text for p in prompts for _ in range(n_img)]
    scores = _score_all(opts, rewards, images, all_texts, open_client)
    metrics = [DISPLAY.get(n, n) for n, _ in rewards]
    folder = {label: distances(x, label) for label, x in images.items()} if distances else {}
    n_ref = distances.n_ref if distances else 0
    rows, columns, ref_label = _rows(caches, meta, images, scores, metrics, len(prompts), n_img, folder)

    cat_of = [p.category or "(none)" for p in prompts]
    counts = {c: cat_of.count(c) for c in dict.fromkeys(cat_of)}
    cats = [c for c in cat_of for _ in range(n_img)]
    per_cat = {label: {c: {m: float(np.mean([s for s, k in zip(scores[label][m], cats) if k == c])) for m in metrics}
                       for c in counts} for label in caches}
    show = _write_grids(out, images, len(prompts), n_img)
    plot = reward_divergence_plot(rows, metrics, columns[-2], out / "reward_vs_divergence.png")
    md = [f"## Results: {len(prompts)} prompts from {opts.prompts}, {n_img} image(s) each, seed {opts.seed}", "",
          markdown_table(rows, columns), "",
          f"Rewards: mean raw score over all images. {columns[-2]}: Frechet distance of 4x4-pooled RGB pixels vs "
          f"{ref_label} (a fidelity proxy, lower = closer). s / image: generation wall time (batches of "
          f"{opts.batch_size} prompts, after a warm-up), from the run that generated the images.", ""]
    if folder:
        md[-1:-1] = [f"FID: torchmetrics FrechetInceptionDistance (Inception-v3, 2048-d) vs the {n_ref} images in "
                     f"{opts.fid_ref}" + (f"; CLIP-FD: the same metric on open_clip {opts.clip_fd} image embeddings"
                                          if opts.clip_fd else "") + ". Below a few thousand images both are "
                     "biased upwards: compare models only at equal counts."]
    if metrics:
        md += ["## Per category", "", category_tables(per_cat, metrics, counts), ""]
    md += ["## Grids", "", "comparison: rows = models (" + ", ".join(caches) + f"), columns = the first {show} prompts",
           *[f"- {label}: grids/{slug(label)}.png" for label in caches]]
    if plot:
        md += ["", "Reward vs divergence: reward_vs_divergence.png"]
    (out / "results.md").write_text("\n".join(md) + "\n")
    result = {"prompts": str(opts.prompts), "n_prompts": len(prompts), "images_per_prompt": n_img, "seed": opts.seed,
              "device": opts.device, "dtype": opts.dtype, "fid_ref": opts.fid_ref, "fid_ref_images": n_ref,
              "clip_fd": opts.clip_fd,
              "rewards": [{"name": n, "path": p} for n, p in rewards], "rewards_backend": opts.rewards_backend,
              "columns": columns, "rows": rows, "reference": ref_label, "per_category": per_cat,
              "category_counts": counts, "generated": generated}
    _write_json(out, result, scores, len(prompts), n_img)
    if opts.mlflow:
        from .tracking import log_eval

        result["mlflow_run_id"] = log_eval(opts.mlflow_uri, opts.mlflow_experiment, result, out)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(rows, columns), flush=True)
    return result


def _write_json(out: Path, result: dict, scores: dict, n_prompts: int, n_img: int) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "scores.json").write_text(json.dumps(
        {label: {"prompt_index": [i for i in range(n_prompts) for _ in range(n_img)],
                 **{m: v.tolist() for m, v in s.items()}} for label, s in scores.items()}) + "\n")
