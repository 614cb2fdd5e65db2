"""SD1.5 / SDXL for inference only: generator UNet, VAE, text encoders and tokenizers; no reference UNet and
no fake score in memory (one UNet per process, where training holds three).

    generator_bundle(StableDiffusionModel(...), device, dtype)   a run's generator (its weights then loaded
                                                                 from generator.safetensors by distar.loading)
    pipeline_bundle(DIR, meta, device, dtype)                    a directory written by export_one_step_pipeline
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .bundle import StableDiffusionBundle
from .loading import SDLoadError, add_lora, load_generator_unet, load_reference


def _assemble(world: str, parts, generator, tau: int, resolution: int | None, device: torch.device,
              dtype: torch.dtype) -> StableDiffusionBundle:
    parts = dataclasses.replace(parts, unet=None)  # the reference UNet is not kept
    if next(generator.parameters()).dtype != dtype:
        generator = generator.to(dtype)
    for m in (generator, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    vsf = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    resolution = resolution or generator.config.sample_size * vsf
    if resolution % vsf:
        raise SDLoadError(f"model.resolution={resolution}: must be a multiple of the VAE factor {vsf}")
    return StableDiffusionBundle(world, parts, generator, None, 1.0, tau, resolution, device)


def generator_bundle(model_cfg, device: torch.device, dtype: torch.dtype = torch.float32) -> StableDiffusionBundle:
    """The generator of a StableDiffusionModel section with its decoder and text encoders, in `dtype`.

    With no `model.generator` the reference pipeline's UNet itself becomes the generator (loaded once, not
    copied); a checkpoint's generator.safetensors is then loaded into it. `model.lora_rank` adds the adapters
    the checkpoint's state dict carries."""
    parts = load_reference(model_cfg.world, model_cfg.reference, dtype, model_cfg.variant)
    if model_cfg.generator is None:
        generator = parts.unet
    else:
        generator = load_generator_unet(model_cfg.generator, model_cfg.generator_subfolder, model_cfg.generator_file,
                                        parts.unet, model_cfg.variant)
    if model_cfg.lora_rank > 0:
        generator = add_lora(generator.to(dtype), model_cfg.lora_rank)
    return _assemble(model_cfg.world, parts, generator, model_cfg.conditioning_timestep, model_cfg.resolution,
                     device, dtype)


def pipeline_bundle(pipeline_dir: str | Path, meta: dict, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> StableDiffusionBundle:
    """An exported one-step pipeline (model_index.json + distar_one_step.json): its `unet/` is the generator."""
    world = meta.get("world")
    if world not in ("sd15", "sdxl"):
        raise SDLoadError(f"{pipeline_dir}: distar_one_step.json names world {world!r} (expected sd15 or sdxl)")
    parts = load_reference(world, str(pipeline_dir), dtype)
    return _assemble(world, parts, parts.unet, int(meta["timesteps"][0]), meta.get("resolution"), device, dtype)
