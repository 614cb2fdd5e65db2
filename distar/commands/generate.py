"""`distar generate`: draw images from a built-in model or a checkpoint written by `distar train`."""
from __future__ import annotations

import argparse
import time


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="write PNGs from a model (digits-teacher, digits-onestep, a checkpoint dir)")
    p.add_argument("--model", required=True, help="digits-teacher | digits-onestep | checkpoint dir | models:/NAME@ALIAS")
    p.add_argument("--prompt", required=True, help='e.g. "a handwritten digit 3"')
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (multi-step models; default 50)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (multi-step models; default the model's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..images import save_images
    from ..loading import load_model, seeded_rng
    from .paths import writable_dir

    if args.n <= 0:
        raise UserError(f"--n must be a positive number of images, got {args.n}")
    if args.steps is not None and args.steps <= 0:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    out = writable_dir(args.out)
    model = load_model(args.model, args.device)  # a bad spec raises ModelSpecError (a UserError)
    t0 = time.perf_counter()
    images = model.sample([args.prompt] * args.n, seeded_rng(args.seed), steps=args.steps, guidance=args.guidance)
    secs = time.perf_counter() - t0
    save_images(images, out)
    print(f"wrote {args.n} images and grid.png to {out} ({1000 * secs / args.n:.1f} ms/image, model {model.name})")
    return 0
