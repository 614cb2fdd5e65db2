"""SD1.5 and SDXL model bundles: CFG reference, fake score, DMD2-style one-step generator, VAE decode.

    bundle = build_bundle(StableDiffusionModel(world="sdxl", reference="stabilityai/stable-diffusion-xl-base-1.0",
                                               generator="tianweiy/DMD2",
                                               generator_file="dmd2_sdxl_1step_unet_fp16.bin"), device)

Objects (docs/algorithm.md): the reference UNet (frozen, `dtype`) gives eps_ref with CFG inside; the
fake score starts as a float32 copy of it; the generator is a UNet at the fixed timestep tau,
`x0 = (z - sigma_tau * eps_theta(z, tau, c)) / alpha_tau`. Latents are in the UNet's (scaled) latent space;
`decode` maps them to [0, 1] pixels through the VAE, differentiably.

Precision: with a bfloat16 reference, a fake score equal to it must give e_fake - e_ref = 0 and no generator
gradient, although its master weights are float32. So the reference and the fake are both evaluated under bf16
autocast (`score_precision`), whatever train.mixed_precision says (without it a float32 fake beside a pure-bf16
reference differs from it by bf16 rounding alone: over a 4x128x128 latent a gap of the order of c), and the
reference's normalization layers are kept in float32 like the fake's (with bf16 norm weights in one and float32
in the other, the forward agrees but the backward to x_t does not). tests/test_precision.py holds both.
The generator follows train.mixed_precision.

Building: `build_bundle` loads every network whole on the CPU and moves it to `device` (one process, DDP). Under
`ray.strategy=fsdp` the loop builds through `distar.worlds.sd.sharded_build` instead: the same modules, dtypes and
values, but the three UNets are made on the meta device, sharded, and each rank reads only its slices of the weights
files (no rank holds a whole UNet). Both end in `assemble_bundle`.
"""
from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ... import diffusion
from ...bundle import unwrap
from ...schedules import alphas_cumprod_from_scheduler
from .loading import (DTYPES, ReferenceParts, SDLoadError, add_lora, load_generator_unet, load_reference,
                      norms_in_float32)

# A small built-in prompt set (Parti-style), used when the run config gives no prompts.
BUILTIN_PROMPTS = (
    "a photo of a red fox sitting in a snowy forest",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "a watercolor painting of a lighthouse at sunset",
    "a close-up portrait of an old fisherman, 85mm photo",
    "a futuristic city skyline at night with flying cars",
    "a cute corgi wearing sunglasses on a beach",
    "a medieval castle on a cliff above a stormy sea",
    "an oil painting of sunflowers in a blue vase",
    "a steaming cup of coffee on a wooden table, morning light",
    "a tiny robot watering a plant in a greenhouse",
    "a snowy mountain range reflected in a still lake",
    "a hummingbird hovering near a pink flower, macro photo",
    "a cozy library with tall bookshelves and a fireplace",
    "a vintage car parked on a cobblestone street in Paris",
    "a dragon made of autumn leaves, fantasy illustration",
)


@dataclass
class SDCond:
    """Conditioning for a batch of B prompts (all on the bundle's device, no grad).

    text, null_text: [B, L, D] prompt / null-prompt embeddings (SDXL: both encoders' penultimate states).
    pooled, null_pooled: [B, P] SDXL pooled text embeddings (None for SD1.5).
    time_ids: [B, 6] SDXL micro-conditioning (original size, crop top-left, target size; None for SD1.5).
    """

    text: torch.Tensor
    null_text: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    null_pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None


def _input_dtype(net: nn.Module) -> torch.dtype:
    """The dtype a UNet's inputs must have: its base weights' (LoRA weights are float32 on any base)."""
    for name, p in unwrap(net).named_parameters():
        if "lora_" not in name:
            return p.dtype
    return torch.float32


class StableDiffusionBundle:
    """A `distar.bundle.ModelBundle` over diffusers components (see the module docstring)."""

    def __init__(self, world: str, parts: ReferenceParts, generator: nn.Module, fake_score: nn.Module,
                 guidance_scale: float, conditioning_timestep: int, resolution: int, device: torch.device):
        self.world = world
        self.parts = parts
        self.reference = parts.unet
        self.vae = parts.vae
        self.generator = generator
        self.fake_score = fake_score
        self.guidance_scale = float(guidance_scale)
        self.conditioning_timestep = int(conditioning_timestep)
        self.resolution = int(resolution)
        self.device = torch.device(device)
        self.alphas_cumprod = alphas_cumprod_from_scheduler(parts.scheduler).to(self.device)
        self.prediction_type = parts.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise SDLoadError(f"model.reference: scheduler prediction_type {self.prediction_type!r} is not "
                              f"supported (expected 'epsilon' or 'v_prediction')")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.score_dtype = _input_dtype(self.reference) if self.reference is not None else torch.float32
        self.latent_shape = (unwrap(generator).config.in_channels, self.resolution // self.vae_scale_factor,
                             self.resolution // self.vae_scale_factor)
        self._null: Optional[tuple] = None

    # ------------------------------------------------------------------------------------------ text
    def _tokens(self, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def _encode_sd15(self, prompts: Sequence[str]) -> torch.Tensor:
        te = self.parts.text_encoder
        ids = self._tokens(self.parts.tokenizer, prompts)
        mask = torch.ones_like(ids) if getattr(te.config, "use_attention_mask", False) else None
        return te(ids, attention_mask=mask)[0]

    @torch.no_grad()
    def _encode_sdxl(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both encoders, pooled of the 2nd."""
        embeds, pooled = [], None
        for tok, te in ((self.parts.tokenizer, self.parts.text_encoder),
                        (self.parts.tokenizer_2, self.parts.text_encoder_2)):
            out = te(self._tokens(tok, prompts), output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    def _time_ids(self, n: int) -> torch.Tensor:
        r = self.resolution
        ids = [r, r, 0, 0, r, r]  # original size, crop top-left, target size
        unet = unwrap(self.generator)  # the reference's architecture (checked at load); a generator-only bundle has no reference
        expected = unet.add_embedding.linear_1.in_features
        passed = unet.config.addition_time_embed_dim * len(ids) + self.parts.text_encoder_2.config.projection_dim
        if expected != passed:
            raise SDLoadError(f"model.reference: the UNet expects an added embedding of {expected}, but time ids and "
                              f"text_encoder_2.projection_dim give {passed} (not an SDXL pipeline?)")
        return torch.tensor([ids], dtype=torch.float32, device=self.device).expand(n, -1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> SDCond:
        """Prompt and null-prompt embeddings (SDXL: with pooled embeds and add_time_ids); no gradient."""
        n = len(prompts)
        if self.world == "sd15":
            if self._null is None:
                self._null = (self._encode_sd15([""]),)
            return SDCond(text=self._encode_sd15(prompts), null_text=self._null[0].expand(n, -1, -1))
        text, pooled = self._encode_sdxl(prompts)
        if self._null is None:
            if self.parts.force_zeros_for_empty_prompt:  # SDXL-base's pipeline config: zero null embeddings
                self._null = (torch.zeros_like(text[:1]), torch.zeros_like(pooled[:1]))
            else:
                self._null = self._encode_sdxl([""])
        null_text, null_pooled = self._null
        return SDCond(text=text, null_text=null_text.expand(n, -1, -1), pooled=pooled,
                      null_pooled=null_pooled.expand(n, -1), time_ids=self._time_ids(n))

    # ------------------------------------------------------------------------------------------ UNets
    def unet_eps(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
             pooled: Optional[torch.Tensor], time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Epsilon prediction of a UNet (float32 out), casting inputs to the net's dtype."""
        dt = _input_dtype(net)
        added = None if pooled is None else {"text_embeds": pooled.to(dt), "time_ids": time_ids.to(dt)}
        out = net(x.to(dt), t, encoder_hidden_states=text.to(dt), added_cond_kwargs=added).sample.float()
        if self.prediction_type == "v_prediction":
            alpha, sigma = diffusion.alpha_sigma(self.alphas_cumprod, t)
            out = diffusion.eps_from_v(x.float(), out, alpha, sigma)
        return out

    def score_precision(self):
        """The precision both scores are evaluated at: bf16 autocast when the reference is bf16 (module doc)."""
        if self.score_dtype != torch.bfloat16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sample_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float32).to(self.device)

    def generate(self, net: nn.Module, z: torch.Tensor, cond: SDCond) -> torch.Tensor:
        """x0 = (z - sigma_tau * eps_theta(z, tau, c)) / alpha_tau, latents [n, C, h, w] (float32)."""
        t = torch.full((z.shape[0],), self.conditioning_timestep, dtype=torch.long, device=z.device)
        eps = self.unet_eps(net, z, t, cond.text, cond.pooled, cond.time_ids)
        alpha, sigma = diffusion.alpha_sigma(self.alphas_cumprod, t)
        return diffusion.x0_from_eps(z.float(), eps, alpha, sigma)

    def eps_fake(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: SDCond) -> torch.Tensor:
        with self.score_precision():
            return self.unet_eps(net, x_t, t, cond.text, cond.pooled, cond.time_ids)

    def eps_ref(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDCond) -> torch.Tensor:
        """eps(x, null) + w (eps(x, c) - eps(x, null)), one batched UNet pass over [null; cond]."""
        self._need_reference()
        with self.score_precision():
            return self._guided_eps_ref(x_t, t, cond)

    def _guided_eps_ref(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDCond) -> torch.Tensor:
        if self.guidance_scale == 1.0:
            return self.unet_eps(self.reference, x_t, t, cond.text, cond.pooled, cond.time_ids)
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        text = torch.cat([cond.null_text, cond.text])
        pooled = None if cond.pooled is None else torch.cat([cond.null_pooled, cond.pooled])
        time_ids = None if cond.time_ids is None else torch.cat([cond.time_ids, cond.time_ids])
        e_null, e_cond = self.unet_eps(self.reference, x2, t2, text, pooled, time_ids).chunk(2)
        return diffusion.classifier_free_guidance(e_null, e_cond, self.guidance_scale)

    # ------------------------------------------------------------------------------------------ pixels
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE decode of latents to images in [0, 1] [n, 3, H, W] (float32), differentiable in x0."""
        cfg = self.vae.config
        z = x0 / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:
            z = z + cfg.shift_factor
        img = self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample.float()
        return (img / 2 + 0.5).clamp(0, 1)

    def frozen_modules(self) -> list[nn.Module]:
        mods = [self.reference, self.vae, self.parts.text_encoder, self.parts.text_encoder_2]
        return [m for m in mods if m is not None]

    def _need_reference(self) -> None:
        if self.reference is None:
            raise RuntimeError("this model was loaded for inference (generator only): it has no reference UNet; "
                               "build the full bundle (distar.worlds.build_bundle) to train or sample the reference")

    # ------------------------------------------------------------------------------------------ optional
    def training_prompts(self) -> list[str]:
        return list(BUILTIN_PROMPTS)

    @torch.no_grad()
    def sample_grid(self, net: nn.Module, prompts: Sequence[str], rng: torch.Generator) -> torch.Tensor:
        cond = self.encode_prompts(list(prompts))
        return self.decode(self.generate(unwrap(net), self.sample_noise(len(prompts), rng), cond))

    def sample_reference(self, prompts: Sequence[str], z: torch.Tensor, steps: int = 50,
                         guidance: float | None = None) -> torch.Tensor:
        """The reference's multi-step DDIM samples (CFG `guidance`, default the bundle's) from noise z."""
        from .sampling import sample_reference

        self._need_reference()
        return sample_reference(self, prompts, z, steps=steps, guidance=guidance)


def build_bundle(model_cfg, device: torch.device | str) -> StableDiffusionBundle:
    """Load an SD1.5 / SDXL bundle from a `distar.config.StableDiffusionModel` section."""
    device = torch.device(device)
    dtype = DTYPES[model_cfg.dtype]
    parts = load_reference(model_cfg.world, model_cfg.reference, dtype, model_cfg.variant)
    generator = load_generator_unet(model_cfg.generator, model_cfg.generator_subfolder, model_cfg.generator_file,
                                    parts.unet, model_cfg.variant)
    if dtype == torch.bfloat16:  # the fake's norms are float32 (module doc, precision)
        norms_in_float32(parts.unet)
    fake = copy.deepcopy(parts.unet)
    if model_cfg.lora_rank > 0:  # frozen base in `dtype`, float32 LoRA adapters trained
        generator = add_lora(generator.to(dtype), model_cfg.lora_rank)
        fake = add_lora(fake, model_cfg.lora_rank)
    else:  # full fine-tuning: float32 master weights
        generator, fake = generator.float().requires_grad_(True), fake.float().requires_grad_(True)
    for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval()
    if model_cfg.gradient_checkpointing:
        for m in (generator, fake, parts.unet, parts.vae):
            m.enable_gradient_checkpointing()
    for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2, generator, fake):
        if m is not None:
            m.to(device)
    generator.train()
    fake.train()
    return assemble_bundle(model_cfg, parts, generator, fake, device)


def assemble_bundle(model_cfg, parts: ReferenceParts, generator: nn.Module, fake: nn.Module,
                    device: torch.device) -> StableDiffusionBundle:
    """The bundle over built modules (already on `device`), at `model.resolution` or the UNet's own."""
    vsf = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    resolution = model_cfg.resolution or parts.unet.config.sample_size * vsf
    if resolution % vsf:
        raise SDLoadError(f"model.resolution={resolution}: must be a multiple of the VAE factor {vsf}")
    return StableDiffusionBundle(model_cfg.world, parts, generator, fake, model_cfg.guidance_scale,
                                 model_cfg.conditioning_timestep, resolution, device)


def _world_of_pipeline(source: str) -> str:
    idx = Path(source) / "model_index.json"
    if idx.is_file():
        return "sdxl" if "XL" in json.loads(idx.read_text()).get("_class_name", "") else "sd15"
    if Path(source).exists():
        raise SDLoadError(f"{source!r}: not a diffusers pipeline directory (no model_index.json)")
    return "sdxl" if "xl" in source.lower() else "sd15"


def reference_bundle(source: str, guidance: float | None, device: str, dtype: str) -> tuple["StableDiffusionBundle", str]:
    """A diffusers pipeline (dir or hub id) as a sampling-only bundle (evaluation's `ref:PIPELINE`)."""
    world = _world_of_pipeline(source)
    parts = load_reference(world, source, DTYPES[dtype])
    for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    vsf = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    # no generator / fake copies: the reference UNet stands in for both (they are never called here)
    bundle = StableDiffusionBundle(world, parts, parts.unet, parts.unet, 7.5 if guidance is None else guidance,
                                   399, parts.unet.config.sample_size * vsf, device)
    return bundle, world
