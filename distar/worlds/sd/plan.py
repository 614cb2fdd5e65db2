"""`distar plan` for SD1.5 / SDXL: the bundle's networks built on the meta device from architecture configs.

The configs come from `model.reference` when it is a local pipeline directory or a hub id in the local Hugging
Face cache (only `*/config.json` is read, never weights), else from the architecture files shipped in `arch/`
(SDXL-base's and SD1.5's public config.json values). Dtypes and trainable parameters follow `build_bundle`:
frozen reference, VAE and text encoders in `model.dtype` (an fp16 VAE that asks for upcasting in float32);
full fine-tuning trains float32 copies of the UNet; LoRA trains float32 adapters on frozen `model.dtype` bases.

Activations are measured, not guessed: one forward of each pass of the step runs on meta tensors of the run's
shapes, and a `saved_tensors_hooks` pack hook adds up the distinct storages autograd keeps for backward
(parameters excluded). Under gradient checkpointing that is the checkpoint units' inputs plus what runs outside
them; the largest unit's own saved tensors (measured with checkpointing off) come back during its recompute.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ...memory_plan import Activations, PlanModels
from .loading import DTYPES, SDLoadError, _is_local, add_lora, norms_in_float32

ARCH_DIR = Path(__file__).parent / "arch"
COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
# classes whose forward diffusers runs under torch.utils.checkpoint when gradient checkpointing is on
CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "UNetMidBlock2D", "UpDecoderBlock2D")
FORMULA = ("activations: saved-for-backward bytes of one forward of each pass, measured on meta tensors at the run's "
           "shapes (parameters excluded); generator update = generator + fake score + CFG reference (2x a "
           "batch-B pass) + VAE decode, all alive until its backward; + the largest checkpoint unit's own saved "
           "tensors (its recompute). Counted in the compute dtype (bf16 under train.mixed_precision=bf16, where "
           "autocast keeps norms/softmax in float32: an undercount the reserve covers); attention as SDPA's math path "
           "(probabilities saved: an overcount where flash / memory-efficient attention runs); reward models' "
           "activations and backward temporaries are not counted")


def _read(path: Path, field: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SDLoadError(f"{field}: cannot read the architecture config {str(path)!r}: {err}") from err


def arch_configs(world: str, source: str) -> tuple[dict[str, dict], str]:
    """Each component's config.json (as a dict) and where they came from."""
    names = COMPONENTS[world]
    if _is_local(source):
        root = Path(os.path.expanduser(source))
        missing = [c for c in names if not (root / c / "config.json").is_file()]
        if missing:
            raise SDLoadError(f"model.reference={source!r}: no {missing[0]}/config.json (expected a diffusers "
                              f"pipeline directory with {', '.join(names)})")
        return {c: _read(root / c / "config.json", "model.reference") for c in names}, f"{source} (its config.json files)"
    from huggingface_hub import try_to_load_from_cache

    cached = {c: try_to_load_from_cache(source, f"{c}/config.json") for c in names}
    if all(isinstance(p, str) for p in cached.values()):
        return {c: _read(Path(p), "model.reference") for c, p in cached.items()}, f"{source} (local hub cache)"
    shipped = {c: _read(ARCH_DIR / f"{world}_{c}.json", "model.reference") for c in names}
    base = "SDXL-base-1.0" if world == "sdxl" else "SD1.5"
    return shipped, f"shipped {base} configs in distar/worlds/sd/arch ({source} is not a local dir or in the hub cache)"


def _meta_parts(world: str, cfgs: dict[str, dict]) -> dict[str, nn.Module]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights(include_buffers=True):
        parts = {"unet": UNet2DConditionModel.from_config(cfgs["unet"]),
                 "vae": AutoencoderKL.from_config(cfgs["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))}
        if world == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder_2"]))
    return parts


@functools.lru_cache(maxsize=8)
def _cached_arch(world: str, source: str) -> tuple[str, str]:
    cfgs, where = arch_configs(world, source)
    return json.dumps(cfgs, sort_keys=True), where


def plan_models(cfg) -> PlanModels:
    """The bundle's networks as `build_bundle` makes them, on the meta device."""
    m = cfg.model
    cfgs_json, where = _cached_arch(m.world, m.reference)
    cfgs = json.loads(cfgs_json)
    dtype = DTYPES[m.dtype]
    from accelerate import init_empty_weights

    parts = _meta_parts(m.world, cfgs)
    ref = parts["unet"].to(dtype)
    vae = parts["vae"].to(dtype)
    if dtype == torch.float16 and cfgs["vae"].get("force_upcast", False):
        vae = vae.float()
    with init_empty_weights(include_buffers=True):
        gen = copy.deepcopy(ref)    # as build_bundle: the generator copies the reference as loaded, then the
        if dtype == torch.bfloat16:  # reference's norms go to float32, then the fake copies it
            norms_in_float32(ref)
        fake = copy.deepcopy(ref)
        if m.lora_rank > 0:
            gen, fake = add_lora(gen, m.lora_rank), add_lora(fake, m.lora_rank)
        else:
            gen, fake = gen.float().requires_grad_(True), fake.float().requires_grad_(True)
    encoders = [parts[c].to(dtype) for c in ("text_encoder", "text_encoder_2") if c in parts]
    for x in (ref, vae, *encoders):
        x.requires_grad_(False)
    frozen = [("VAE", vae)] + [("text encoders", e) for e in encoders]
    return PlanModels(gen, fake, ref, frozen, functools.partial(_activations, cfg, cfgs_json), where)


# ----------------------------------------------------------------------------------------------- activations
def saved_bytes(run: Callable[[], torch.Tensor], params: set, units: tuple[str, ...] = (),
                modules: Optional[nn.Module] = None) -> tuple[int, int]:
    """(bytes autograd saves for backward during `run()`, the largest `units`-class submodule's share of it).

    Distinct storages only, parameters (`params`: storage ids to skip) excluded; works on meta and real tensors.
    The per-unit share is attributed to the outermost unit running when a tensor is saved."""
    seen: dict[int, int] = {}
    per_unit: dict[int, int] = {}
    stack: list[int] = []
    hooks = []

    def enter(mod, args) -> None:
        stack.append(id(mod))

    def leave(mod, args, out) -> None:  # returns None: the output is left as it is
        stack.pop()

    for mod in (modules.modules() if modules is not None else ()):
        if type(mod).__name__ in units:
            hooks += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            if stack:
                per_unit[stack[0]] = per_unit.get(stack[0], 0) + seen[key]
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        del out
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values()), max(per_unit.values(), default=0)


@functools.lru_cache(maxsize=4)
def _meta_net(cfgs_json: str, what: str, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with init_empty_weights(include_buffers=True):
        cls = UNet2DConditionModel if what == "unet" else AutoencoderKL
        return cls.from_config(json.loads(cfgs_json)[what]).to(dtype)


@functools.lru_cache(maxsize=32)
def _pass(cfgs_json: str, what: str, dtype: torch.dtype, trained: bool, checkpointing: bool, batch: int,
          latent: int) -> tuple[int, int]:
    """(saved bytes, largest checkpoint unit's saved bytes) of one UNet ('unet') or VAE-decode ('vae') pass on
    meta tensors; the unit's share is measured with checkpointing off (what its recompute holds)."""
    net = _meta_net(cfgs_json, what, dtype)
    net.requires_grad_(trained).train()
    if checkpointing:
        net.enable_gradient_checkpointing()
    else:
        net.disable_gradient_checkpointing()
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(batch, net.config.latent_channels if what == "vae" else net.config.in_channels, latent, latent,
                    requires_grad=True, **meta)
    if what == "vae":
        def run():
            return net.decode(x).sample
    else:
        c = net.config
        added = None
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            added = {"text_embeds": torch.empty(batch, pooled, **meta), "time_ids": torch.empty(batch, 6, **meta)}
        text = torch.empty(batch, 77, c.cross_attention_dim, **meta)

        def run():
            return net(x, torch.zeros(batch, device="meta", dtype=torch.long), encoder_hidden_states=text,
                       added_cond_kwargs=added).sample
    saved, unit = saved_bytes(run, params, CHECKPOINT_UNITS, net)
    if checkpointing:
        unit = _pass(cfgs_json, what, dtype, trained, False, batch, latent)[1]
    return saved, unit


def _activations(cfg, cfgs_json: str, batch: int) -> Activations:
    """The step's passes (docs/algorithm.md's cost model): generator update and one fake update."""
    m, loss = cfg.model, cfg.loss
    cfgs = json.loads(cfgs_json)
    vsf = 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1)
    latent = (m.resolution or cfgs["unet"]["sample_size"] * vsf) // vsf
    bf16 = cfg.train.mixed_precision == "bf16"
    frozen_dt = torch.bfloat16 if bf16 else DTYPES[m.dtype]
    trained_dt = torch.bfloat16 if bf16 else (DTYPES[m.dtype] if m.lora_rank > 0 else torch.float32)
    gc = m.gradient_checkpointing
    gen, gen_unit = _pass(cfgs_json, "unet", trained_dt, True, gc, batch, latent)
    fake, _ = _pass(cfgs_json, "unet", trained_dt, False, gc, batch, latent)
    ref, _ = _pass(cfgs_json, "unet", frozen_dt, False, gc, batch, latent)
    ref *= 1 if m.guidance_scale == 1.0 else 2
    update, units = gen + fake + ref, [gen_unit]
    decodes = loss.reward_mode == "diffused" or (loss.alpha_rew > 0 or loss.alpha_control is not None)
    if loss.reward_mode == "diffused":  # DIDR's K-step proxy through the CFG reference (one step held if checkpointed)
        update += ref * (1 if loss.drp_checkpoint else loss.drp_steps)
    if decodes:
        vae_dt = torch.bfloat16 if bf16 else DTYPES[m.dtype]
        vae, vae_unit = _pass(cfgs_json, "vae", vae_dt, False, gc, batch, latent)
        update += vae
        units.append(vae_unit)
    return Activations(generator_update=update, fake_update=gen, recompute=max(units) if gc else 0, formula=FORMULA)
