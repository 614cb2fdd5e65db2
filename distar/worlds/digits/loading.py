"""Resolve a model name given on the command line to something that draws images.

    digits-teacher      the reference diffusion, multi-step (diffusers DDIM, CFG); honours steps/guidance
    digits-onestep      the shipped one-step generator (SIM-distilled from the teacher)
    DIR                 a checkpoint written by `distar train` (config.yaml + generator.safetensors), any world
    models:/NAME@ALIAS  MLflow registry URI (distar.model_registry; $MLFLOW_TRACKING_URI or ./mlflow.db)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...checkpoint import is_model_dir

BUILTIN = ("digits-teacher", "digits-onestep")


class ModelSpecError(ValueError):
    """The --model argument names nothing loadable; the message says why."""


NET_BATCH = 16  # rows per one-step network call; see LoadedModel.sample_from_noise


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
    net: torch.nn.Module | None = None     # one-step generator (None for the teacher)

    @torch.no_grad()
    def sample(self, prompts: list[str], rng: torch.Generator, steps: int | None = None,
               guidance: float | None = None) -> torch.Tensor:
        """Images [n, C, H, W] in [0, 1]."""
        if self.multistep:
            return self.bundle.sample_reference(prompts, rng, steps=steps or 50, guidance=guidance)
        if steps not in (None, 1):
            raise ModelSpecError(f"--steps {steps}: {self.name} is a one-step generator (use --steps 1 or omit it)")
        if guidance is not None:
            raise ModelSpecError(f"--guidance: {self.name} is a one-step generator; guidance is baked in by training")
        return self.sample_from_noise(prompts, self.bundle.sample_noise(len(prompts), rng))

    @torch.no_grad()
    def sample_from_noise(self, prompts: list[str], z: torch.Tensor) -> torch.Tensor:
        """One-step images [n, C, H, W] in [0, 1] from noise z [n, ...] (row i conditioned on prompts[i]).

        The network always sees exactly NET_BATCH rows (the last call padded): CPU matmul kernels change
        with the row count (a 1-row batch takes a gemv path), which moved pixels by ~1e-6 with the batch
        size, so an image served inside a batch of other requests could drift from `distar generate`."""
        b = self.bundle
        out = []
        for i in range(0, z.shape[0], NET_BATCH):
            zi, pi = z[i:i + NET_BATCH], list(prompts[i:i + NET_BATCH])
            n = zi.shape[0]
            if n < NET_BATCH:
                zi = torch.cat([zi, zi[-1:].expand(NET_BATCH - n, *zi.shape[1:])])
                pi += pi[-1:] * (NET_BATCH - n)
            out.append(b.decode(b.generate(self.net, zi, b.encode_prompts(pi)))[:n])
        return torch.cat(out)


def resolve_registry_uri(uri: str) -> Path:
    """`models:/NAME@ALIAS` -> a local checkpoint dir. The hook for the MLflow model registry."""
    from ...model_registry import RegistryError
    from ...model_registry import resolve_registry_uri as resolve

    try:
        return resolve(uri)
    except RegistryError as err:
        raise ModelSpecError(str(err)) from None


def load_model(spec: str, device: torch.device | str = "cpu", weights_dir: str | None = None) -> LoadedModel:
    from ...config import DigitsModel, load_config
    from .bundle import build_bundle

    if spec.startswith("models:/"):
        spec = str(resolve_registry_uri(spec))
    if spec in BUILTIN:
        bundle = build_bundle(DigitsModel(weights_dir=weights_dir), device)
        if spec == "digits-teacher":
            return LoadedModel(spec, bundle, multistep=True)
        return LoadedModel(spec, bundle, multistep=False, net=bundle.generator.eval())
    p = Path(spec)
    if not p.is_dir():
        raise ModelSpecError(f"--model {spec!r}: not a built-in model ({', '.join(BUILTIN)}), "
                             f"not a checkpoint directory, not a models:/ URI")
    if not is_model_dir(p):
        raise ModelSpecError(f"--model {spec!r}: a checkpoint directory needs config.yaml and generator.safetensors")
    cfg = load_config(p / "config.yaml")
    if cfg.model.world == "digits":
        bundle = build_bundle(cfg.model.model_copy(update={"generator": str(p)}), device)
    else:
        from ...worlds import build_bundle as build_any
        from .models import load_weights

        bundle = build_any(cfg.model, device)
        load_weights(bundle.generator, p / "generator.safetensors")
    return LoadedModel(str(p), bundle, multistep=False, net=bundle.generator.eval())


def grid_image(images: torch.Tensor, cols: int | None = None, scale: int = 4):
    """A PIL image of `images` [n, C, H, W] in [0, 1] tiled in a grid (1-px grey borders), upscaled (nearest)."""
    import math

    import numpy as np
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    n, c, h, w = arr.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros((c, rows * (h + 1) + 1, cols * (w + 1) + 1), dtype=torch.uint8) + 64
    for i, im in enumerate(arr):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = im
    g = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(g))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_images(images: torch.Tensor, out: Path, prefix: str = "sample") -> list[Path]:
    """One PNG per image (native resolution) plus grid.png (upscaled)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    paths = []
    for i, im in enumerate(arr):
        a = im[0].numpy() if im.shape[0] == 1 else im.permute(1, 2, 0).numpy()
        path = out / f"{prefix}_{i:04d}.png"
        Image.fromarray(a).save(path)
        paths.append(path)
    grid_image(images).save(out / "grid.png")
    return paths
