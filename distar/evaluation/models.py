"""Models to evaluate on a prompt file: multi-step SD references and one-step generators.

    ref:DIR_OR_HUB_ID        multi-step reference pipeline (SD1.5 / SDXL, world read from model_index.json);
    ref@N:DIR_OR_HUB_ID      ... at N steps (else --steps), CFG --guidance (else 7.5)
    CHECKPOINT_DIR           a `distar train` checkpoint (config.yaml + generator.safetensors), any world
    models:/NAME@ALIAS       the MLflow model registry
    digits-teacher, digits-onestep

Noise for image j of prompt i is drawn from `image_seed(seed, i, j)` alone, so an image does not depend on
the batch it was generated in, nor on which prompts a resumed run still had to generate.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError

_REF = re.compile(r"^ref(?:@(\d+))?:(.+)$")


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed per (run seed, prompt index, image index): stable across runs, machines and batchings."""
    h = hashlib.sha256(f"distar-eval:{seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


@dataclass
class EvalModel:
    label: str
    spec: str
    bundle: Any
    multistep: bool
    steps: int = 1
    guidance: float | None = None
    net: torch.nn.Module | None = None
    world: str = ""
    settings: dict = field(default_factory=dict)   # what the cached images depend on (besides seeds)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return torch.cat([self.bundle.sample_noise(1, torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """Images [n, C, H, W] in [0, 1]; row k conditioned on prompts[k] with noise from seeds[k]."""
        z = self.noise(seeds)
        if self.multistep and self.world in ("sd15", "sdxl"):
            from ..worlds.sd_sampling import sample_reference

            return sample_reference(self.bundle, prompts, z, steps=self.steps, guidance=self.guidance)
        if self.multistep:  # digits teacher: its own sampler draws the noise from one generator
            return torch.cat([self.bundle.sample_reference([p], torch.Generator().manual_seed(s), steps=self.steps,
                                                           guidance=self.guidance) for p, s in zip(prompts, seeds)])
        b = self.bundle
        return b.decode(b.generate(self.net, z, b.encode_prompts(list(prompts))))


def _world_of_pipeline(source: str) -> str:
    idx = Path(source) / "model_index.json"
    if idx.is_file():
        return "sdxl" if "XL" in json.loads(idx.read_text()).get("_class_name", "") else "sd15"
    if Path(source).exists():
        raise UserError(f"--models 'ref:{source}': not a diffusers pipeline directory (no model_index.json)")
    return "sdxl" if "xl" in source.lower() else "sd15"


def _load_reference(label: str, source: str, steps: int, guidance: float | None, device: str, dtype: str) -> EvalModel:
    from ..worlds.sd_loading import DTYPES, SDLoadError, load_reference
    from ..worlds.stable_diffusion import StableDiffusionBundle

    world = _world_of_pipeline(source)
    try:
        parts = load_reference(world, source, DTYPES[dtype])
    except (SDLoadError, OSError, ValueError) as err:
        raise UserError(f"--models {label}=ref:{source}: {str(err).splitlines()[0]}") from None
    for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    vsf = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    # no generator / fake copies: the reference UNet stands in for both (they are never called here)
    bundle = StableDiffusionBundle(world, parts, parts.unet, parts.unet, 7.5 if guidance is None else guidance,
                                   399, parts.unet.config.sample_size * vsf, device)
    return EvalModel(label, f"ref:{source}", bundle, True, steps, bundle.guidance_scale, world=world,
                     settings={"steps": steps, "guidance": bundle.guidance_scale, "sampler": "ddim", "dtype": dtype})


def load_eval_model(label: str, spec: str, steps: int, guidance: float | None, device: str = "cpu",
                    dtype: str = "float32") -> EvalModel:
    """Resolve one --models entry; a bad spec raises UserError naming --models."""
    from ..worlds.digits.loading import ModelSpecError, load_model

    m = _REF.match(spec)
    if m:
        return _load_reference(label, m.group(2), int(m.group(1) or steps), guidance, device, dtype)
    try:
        lm = load_model(spec, device)
    except (ModelSpecError, FileNotFoundError) as err:
        msg = str(err).replace("--model ", "--models ", 1)
        raise UserError(msg if msg.startswith("--models") else f"--models {label}={spec}: {msg}") from None
    world = getattr(lm.bundle, "world", "digits")
    if lm.multistep:
        return EvalModel(label, spec, lm.bundle, True, steps, guidance, world=world,
                         settings={"steps": steps, "guidance": guidance})
    return EvalModel(label, spec, lm.bundle, False, 1, None, net=lm.net.eval(), world=world,
                     settings={"checkpoint": str(Path(lm.name).resolve()) if Path(lm.name).is_dir() else lm.name})


def parse_models(items: Sequence[str]) -> list[tuple[str, str]]:
    """LABEL=SPEC or SPEC (label = spec); labels must be unique (they name the image cache folders)."""
    pairs = [tuple(m.split("=", 1)) if "=" in m else (m, m) for m in items]
    labels = [p[0] for p in pairs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UserError(f"--models: label(s) {dup} given twice; use LABEL=SPEC with distinct labels")
    from .cache import slug

    slugs = [slug(lab) for lab in labels]
    clash = sorted({lab for lab, s in zip(labels, slugs) if slugs.count(s) > 1})
    if clash:
        raise UserError(f"--models: labels {clash} map to the same image folder; make them differ in letters/digits")
    return pairs
