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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..loading import ModelSpecError, check_model_spec, load_model
from ..registry import REFERENCE_PIPELINES, resolve

REF_SPEC = re.compile(r"^ref(?:@(\d+))?:(.+)$")


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
        if self.multistep:
            return self.bundle.sample_reference(list(prompts), z, steps=self.steps, guidance=self.guidance)
        b = self.bundle
        return b.decode(b.generate(self.net, z, b.encode_prompts(list(prompts))))


def check_eval_spec(label: str, spec: str) -> None:
    """Cheap checks of one --models entry before anything is loaded or generated."""
    if REF_SPEC.match(spec):
        return
    try:
        check_model_spec(f"--models {label}=", spec)
    except ModelSpecError as err:
        raise UserError(f"{err} (multi-step references: ref[@N]:PIPELINE)") from None


def load_eval_model(label: str, spec: str, steps: int, guidance: float | None, device: str = "cpu",
                    dtype: str = "float32") -> EvalModel:
    """Resolve one --models entry; a bad spec raises UserError naming --models."""
    m = REF_SPEC.match(spec)
    if m:
        source, n_steps = m.group(2), int(m.group(1) or steps)
        try:
            bundle, world = resolve(REFERENCE_PIPELINES, "diffusers", "reference loader")(source, guidance, device, dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"--models {label}=ref:{source}: {str(err).splitlines()[0]}") from None
        return EvalModel(label, spec, bundle, True, n_steps, bundle.guidance_scale, world=world,
                         settings={"steps": n_steps, "guidance": bundle.guidance_scale, "sampler": "ddim",
                                   "dtype": dtype})
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
