"""Export a trained one-step generator as a diffusers pipeline directory.

    export_one_step_pipeline(bundle, ema.averaged(bundle.generator), "out/di_star_sdxl")
    pipe = DiffusionPipeline.from_pretrained("out/di_star_sdxl")
    image = pipe(prompt, num_inference_steps=1, guidance_scale=0, timesteps=[399]).images[0]

The directory holds the reference pipeline's VAE, text encoders and tokenizers, the generator as `unet/`
(LoRA adapters merged in, float32 unless `dtype` says otherwise) and an LCMScheduler built from the
reference scheduler's config, as DMD2 publishes its SDXL one-step model. With timesteps=[399] LCM's step
is x0 = (z - sigma_tau eps) / alpha_tau (its boundary-condition weights are 1 - 1e-8 and 1e-8 there),
the generator rule of distar.worlds.sd.bundle. `distar_one_step.json` records the timestep.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...bundle import unwrap
from .loading import merged_unet


def one_step_pipeline(bundle, generator_net: nn.Module, dtype: torch.dtype = torch.float32):
    """A StableDiffusion(XL)Pipeline around the generator with an LCM one-step scheduler (not saved)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    p = bundle.parts
    unet = merged_unet(unwrap(generator_net)).to("cpu", dtype)
    scheduler = LCMScheduler.from_config(p.scheduler_config)
    common = dict(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=unet, scheduler=scheduler)
    if bundle.world == "sdxl":
        return StableDiffusionXLPipeline(text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2,
                                         force_zeros_for_empty_prompt=p.force_zeros_for_empty_prompt, **common)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                   **common)


def export_one_step_pipeline(bundle, generator_net: nn.Module, out_dir: str | Path,
                             dtype: torch.dtype = torch.float32, safe_serialization: bool = True) -> Path:
    """Save a diffusers pipeline directory for one-step generation with `generator_net`; returns its path."""
    out = Path(out_dir)
    pipe = one_step_pipeline(bundle, generator_net, dtype)
    pipe.save_pretrained(out, safe_serialization=safe_serialization)
    (out / "distar_one_step.json").write_text(json.dumps({
        "timesteps": [bundle.conditioning_timestep], "num_inference_steps": 1, "guidance_scale": 0.0,
        "resolution": bundle.resolution, "world": bundle.world,
        "usage": "DiffusionPipeline.from_pretrained(dir)(prompt, num_inference_steps=1, guidance_scale=0, "
                 f"timesteps=[{bundle.conditioning_timestep}], height={bundle.resolution}, width={bundle.resolution})",
    }, indent=2))
    return out
