"""Resolve a model named on the command line (or in a serving config) to something that draws images.

    NAME                a built-in model of a world (distar.registry.BUILTIN_MODELS, e.g. digits-onestep)
    DIR                 a checkpoint written by `distar train` (config.yaml + generator.safetensors), any world
    DIR                 a pipeline written by `distar export` (model_index.json + distar_one_step.json)
    models:/NAME@ALIAS  the MLflow model registry ($MLFLOW_TRACKING_URI or ./mlflow.db)

One-step models load for inference only (distar.registry.GENERATOR_LOADERS / PIPELINE_LOADERS): generator,
decoder and text encoders, no reference or fake score, in bfloat16/float16 on a GPU and float32 on a CPU.
World-agnostic: worlds plug in through the registry and the bundle interface, never by import here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import is_model_dir, load_generator_state, load_module_state
from .device import inference_dtype, pick_device
from .errors import UserError
from .model_registry import PIPELINE_META
from .registry import BUILTIN_MODELS, GENERATOR_LOADERS, PIPELINE_LOADERS, resolve

NET_BATCH = 16  # most rows per one-step network call; see LoadedModel.sample_from_noise


class ModelSpecError(UserError, ValueError):
    """The model argument names nothing loadable; the message says why."""


def seeded_rng(seed: int) -> torch.Generator:
    """The one place a user's seed becomes randomness: `distar generate` and `distar serve` both draw an
    image batch's noise as `bundle.sample_noise(n, seeded_rng(seed))`, so equal (prompt, seed, n) give
    equal images."""
    return torch.Generator().manual_seed(seed)


@dataclass
class LoadedModel:
    name: str
    bundle: Any
    multistep: bool
    net: torch.nn.Module | None = None     # one-step generator (None for a multi-step reference)
    pad_rows: bool = True                  # pad every network call to NET_BATCH rows (on a CPU; see below)

    @torch.no_grad()
    def sample(self, prompts: list[str], rng: torch.Generator, steps: int | None = None,
               guidance: float | None = None) -> torch.Tensor:
        """Images [n, C, H, W] in [0, 1]."""
        z = self.bundle.sample_noise(len(prompts), rng)
        if self.multistep:
            return self.bundle.sample_reference(prompts, z, steps=steps or 50, guidance=guidance)
        if steps not in (None, 1):
            raise ModelSpecError(f"--steps {steps}: {self.name} is a one-step generator (use --steps 1 or omit it)")
        if guidance is not None:
            raise ModelSpecError(f"--guidance: {self.name} is a one-step generator; guidance is baked in by training")
        return self.sample_from_noise(prompts, z)

    @torch.no_grad()
    def sample_from_noise(self, prompts: list[str], z: torch.Tensor) -> torch.Tensor:
        """One-step images [n, C, H, W] in [0, 1] from noise z [n, ...] (row i conditioned on prompts[i]).

        Calls take at most NET_BATCH rows. With `pad_rows` (models on a CPU) every call takes exactly
        NET_BATCH rows, the last one padded: CPU matmul kernels change with the row count (a 1-row batch takes
        a gemv path), which moved pixels by ~1e-6 with the batch size, so an image served inside a batch of
        other requests could drift from `distar generate`. On a GPU (no bit-for-bit promise there: its
        kernels and half precision are not batch-invariant anyway) calls are not padded, so one SDXL image
        costs one UNet row, not sixteen."""
        b = self.bundle
        out = []
        for i in range(0, z.shape[0], NET_BATCH):
            zi, pi = z[i:i + NET_BATCH], list(prompts[i:i + NET_BATCH])
            n = zi.shape[0]
            if self.pad_rows and n < NET_BATCH:
                zi = torch.cat([zi, zi[-1:].expand(NET_BATCH - n, *zi.shape[1:])])
                pi += pi[-1:] * (NET_BATCH - n)
            out.append(b.decode(b.generate(self.net, zi, b.encode_prompts(pi)))[:n])
        return torch.cat(out)


def check_model_spec(flag: str, spec: str) -> None:
    """Refuse an obviously unloadable spec cheaply (before a cluster starts or anything is generated).
    `flag` prefixes the message, e.g. "--model " or "--models LABEL="."""
    if spec in BUILTIN_MODELS or spec.startswith("models:/"):
        return
    p = Path(spec)
    if not p.is_dir():
        raise ModelSpecError(f"{flag}{spec!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}), "
                             f"not a checkpoint or exported pipeline directory, not a models:/ URI")
    if not is_model_dir(p) and not is_pipeline_dir(p):
        raise ModelSpecError(f"{flag}{spec!r}: a checkpoint directory needs config.yaml and generator.safetensors "
                             f"(an exported pipeline: model_index.json and {PIPELINE_META})")


def is_pipeline_dir(path: str | Path) -> bool:
    """A one-step pipeline written by `distar export` (any world)."""
    p = Path(path)
    return (p / "model_index.json").is_file() and (p / PIPELINE_META).is_file()


def resolve_registry_uri(uri: str) -> Path:
    """`models:/NAME@ALIAS` -> a local checkpoint dir, with registry errors as ModelSpecError."""
    from .model_registry import RegistryError
    from .model_registry import resolve_registry_uri as resolve_uri

    try:
        return resolve_uri(uri)
    except RegistryError as err:
        raise ModelSpecError(str(err)) from None


def load_model(spec: str, device: torch.device | str = "cpu", weights_dir: str | None = None,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """A built-in name, a checkpoint or pipeline directory or a models:/ URI -> a LoadedModel on `device`.

    One-step models hold only what inference needs, in `dtype` (default: distar.device.inference_dtype).
    `weights_dir` reaches built-in models only (e.g. a rebuilt digits weights directory)."""
    import json

    from .config import load_config
    from .worlds import build_bundle

    device = pick_device(device)
    dtype = dtype or inference_dtype(device)
    if spec.startswith("models:/"):
        spec = str(resolve_registry_uri(spec))
    check_model_spec("--model ", spec)
    pad = device.type == "cpu"
    if spec in BUILTIN_MODELS:
        bundle, multistep = resolve(BUILTIN_MODELS, spec, "built-in model")(device, weights_dir, dtype=dtype)
        return LoadedModel(spec, bundle, multistep, None if multistep else bundle.generator.eval(), pad)
    p = Path(spec)
    if is_pipeline_dir(p):
        meta = json.loads((p / PIPELINE_META).read_text())
        bundle = resolve(PIPELINE_LOADERS, meta.get("world"), "pipeline world")(p, meta, device, dtype)
        return LoadedModel(str(p), bundle, False, bundle.generator.eval(), pad)
    model_cfg = load_config(p / "config.yaml").model
    init = {k: None for k in ("generator", "generator_file", "generator_subfolder") if k in type(model_cfg).model_fields}
    model_cfg = model_cfg.model_copy(update=init)  # the weights come from DIR: never fetch the run's initial ones
    if model_cfg.world in GENERATOR_LOADERS:
        bundle = resolve(GENERATOR_LOADERS, model_cfg.world, "world")(model_cfg, device, dtype)
    else:
        bundle = build_bundle(model_cfg, device)
    load_module_state(bundle.generator, load_generator_state(p), str(p))
    return LoadedModel(str(p), bundle, multistep=False, net=bundle.generator.eval(), pad_rows=pad)
