"""A one-step model as a diffusers pipeline directory (`distar export`, and what registration uploads).

    export_model("runs/sdxl/final", "out/sdxl_onestep")        # or a built-in name, or models:/NAME@ALIAS
    DiffusionPipeline.from_pretrained("out/sdxl_onestep")      # SD1.5/SDXL: a standard pipeline, LCM scheduler
    DiffusionPipeline.from_pretrained("out/digits", trust_remote_code=True)   # digits: DigitsOneStepPipeline,
                                                                              # its code in the directory

Every exported directory also holds distar_one_step.json (world, timestep, resolution, usage), which makes it
a model spec distar itself loads (`distar generate --model DIR`, serving, the MLflow pyfunc).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .loading import load_model
from .registry import PIPELINE_EXPORTERS, resolve

class NotExportable(UserError):
    """The model's world has no diffusers pipeline form (the 2-D world)."""


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_model(spec: str, out: str | Path, dtype: str = "float32", weights_dir: str | None = None) -> Path:
    """Write the one-step model `spec` to `out` (absent or empty) as a diffusers pipeline; returns `out`."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {str(out)!r}: exists and is not an empty directory (choose a new one)")
    model = load_model(spec, "cpu", weights_dir, dtype=torch.float32)  # cast once, when writing
    if model.multistep:
        raise UserError(f"--model {spec!r}: a multi-step reference; export takes a one-step generator")
    world = getattr(model.bundle, "world", None)
    if world not in PIPELINE_EXPORTERS:
        raise NotExportable(f"--model {spec!r}: world {world!r} has no diffusers export "
                        f"(exportable worlds: {', '.join(sorted(PIPELINE_EXPORTERS))})")
    out.mkdir(parents=True, exist_ok=True)
    return resolve(PIPELINE_EXPORTERS, world, "world")(model.bundle, model.net, out, EXPORT_DTYPES[dtype])
