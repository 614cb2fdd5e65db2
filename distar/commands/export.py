"""`distar export --model SPEC --out DIR [--dtype float32|bfloat16|float16]`: a one-step model as a diffusers
pipeline directory (distar.export)."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a one-step model as a diffusers pipeline directory",
                       description="Write the one-step generator SPEC with its text encoders, decoder and a one-step "
                                   "scheduler as a directory DiffusionPipeline.from_pretrained loads (the digits world: "
                                   "a custom pipeline class shipped in the directory, load with trust_remote_code=True).")
    p.add_argument("--model", required=True, help="digits-onestep | checkpoint dir | models:/NAME@ALIAS")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights")
    p.add_argument("--weights-dir", default=None, help="digits weights directory (built-in models; default: shipped)")


def run(args: argparse.Namespace) -> int:
    from ..export import export_model

    out = export_model(args.model, args.out, args.dtype, args.weights_dir)
    print(json.dumps({"model": args.model, "pipeline": str(out),
                      **json.loads((out / "distar_one_step.json").read_text())}, indent=2))
    return 0
