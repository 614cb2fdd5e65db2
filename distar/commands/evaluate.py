"""`distar eval`: one results table (markdown + JSON) over several models.

Without --prompts it is the digits world's table (the digits world's judges: the command layer may name a
world; the library's evaluation code does not):

    distar eval --models "reference 50-step CFG=digits-teacher" digits-onestep runs/di_star_a10 --out results/
Columns: proxy rewards, gold boldness, judge accuracy, Frechet distance (judge features vs held-out real
digits), per-class diversity, milliseconds per image. Every model gets the same prompts and seeds.

With --prompts FILE|parti (PartiPrompts TSV, one prompt per line, or `parti`: the shipped PartiPrompts) it
runs the general path instead
(distar.evaluation): multi-step references (ref[@N]:PIPELINE) and one-step models, scored by --rewards.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="results table over models (digits world)")
    p.add_argument("--models", nargs="+", required=True,
                   help="SPEC or LABEL=SPEC; SPEC = digits-teacher | digits-onestep | checkpoint dir")
    p.add_argument("--n-per-class", type=int, default=100, help="samples per digit class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="sampling steps of multi-step models")
    p.add_argument("--guidance", type=float, default=None, help="CFG of multi-step models (default the bundle's)")
    p.add_argument("--real", action="store_true", help="add a row for the held-out real digits")
    p.add_argument("--out", required=True, help="directory for results.md and results.json")
    p.add_argument("--threads", type=int, default=2)
    g = p.add_argument_group("prompt-file evaluation (distar.evaluation; selected by --prompts)")
    g.add_argument("--prompts", default=None, help="parti (the shipped PartiPrompts), a .tsv with a Prompt column, or one prompt per line")
    g.add_argument("--limit", type=int, default=None, help="first N prompts only")
    g.add_argument("--images-per-prompt", type=int, default=1)
    g.add_argument("--rewards", nargs="*", default=[], help="name[:path] ... (image_reward, aesthetic, pickscore, "
                   "clip_score, hpsv2)")
    g.add_argument("--rewards-backend", choices=["local", "serve"], default="local")
    g.add_argument("--batch-size", type=int, default=4, help="prompts per generation batch")
    g.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights of multi-step references (auto: bf16/fp16 on a GPU, float32 on a CPU)")
    g.add_argument("--fid-ref", default=None, metavar="DIR",
                   help="a folder of reference images: adds FID (torchmetrics) against it")
    g.add_argument("--fid-limit", type=int, default=None, metavar="N",
                   help="the first N reference images (sorted by path) only")
    g.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth); "
                        "default: downloaded by torch-fidelity")
    g.add_argument("--clip-fd", default=None, metavar="SPEC",
                   help="an open_clip spec (ARCH:TAG, hf-hub:..., or a local dir): adds CLIP-FD against --fid-ref")
    g.add_argument("--mlflow", action="store_true", help="also log the results to MLflow")
    g.add_argument("--mlflow-uri", default=None, help="default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    g.add_argument("--mlflow-experiment", default="distar-eval")


def run(args: argparse.Namespace) -> int:
    import torch

    from .paths import writable_dir

    out = writable_dir(args.out)
    torch.set_num_threads(args.threads)
    if args.prompts is not None:
        return _run_prompts(args, out)
    return _run_digits(args, out)


def _run_prompts(args: argparse.Namespace, out: Path) -> int:
    from functools import partial

    from ..evaluation.run import PromptEval, evaluate_prompts
    from ..evaluation.scoring import local_reward_client

    from ..device import pick_device

    device = str(pick_device(args.device, arg="--device"))  # once, before anything loads
    if args.rewards_backend == "serve":
        from services.reward_service import serve_reward_client as open_client
    else:
        open_client = partial(local_reward_client, device=device)
    opts = PromptEval(prompts=args.prompts, models=args.models, out=out, rewards=args.rewards or [],
                      limit=args.limit, images_per_prompt=args.images_per_prompt, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, device=device,
                      dtype=args.dtype, rewards_backend=args.rewards_backend, mlflow=args.mlflow,
                      mlflow_uri=args.mlflow_uri, mlflow_experiment=args.mlflow_experiment, fid_ref=args.fid_ref,
                      fid_weights=args.fid_weights, clip_fd=args.clip_fd, fid_limit=args.fid_limit)
    evaluate_prompts(opts, open_client)
    return 0


def _run_digits(args: argparse.Namespace, out: Path) -> int:
    """The digits world's own table (judges, gold boldness, Frechet in judge features)."""
    from ..errors import UserError
    from ..loading import load_model
    from ..worlds.digits.judges import Judges, evaluate_sampler, markdown_table, real_row

    if args.n_per_class <= 0:
        raise UserError(f"--n-per-class must be >= 1, got {args.n_per_class}")
    if args.steps <= 0:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    specs = [m.split("=", 1) if "=" in m else [m, m] for m in args.models]
    loaded = [(label, load_model(spec)) for label, spec in specs]  # fail on a bad spec before any sampling
    judges = Judges.load()
    rows = [real_row(judges)] if args.real else []
    for label, model in loaded:
        kw = {"steps": args.steps, "guidance": args.guidance} if model.multistep else {}
        rows.append(evaluate_sampler(label, lambda p, g: model.sample(p, g, **kw), judges,
                                     n_per_class=args.n_per_class, seed=args.seed))
        print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    md = markdown_table(rows)
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(md)
    return 0
