"""Loading SD1.5 / SDXL components the way diffusers does: a hub id or a local pipeline directory.

    parts = load_reference(cfg)              # tokenizers, text encoders, VAE, reference UNet, scheduler
    gen = load_generator_unet(cfg, parts.unet)   # DMD2 state dict, diffusers UNet folder, or a copy

Every user error (missing directory, missing component, a state dict for another UNet) raises
`SDLoadError` naming the config field and what was expected.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_DICT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


class SDLoadError(ValueError):
    """A model path or file in `model.*` cannot be used; the message names the field and what was expected."""


@dataclass
class ReferenceParts:
    """The frozen pieces of a pipeline (text encoders and tokenizers are None where the world has none)."""

    unet: nn.Module
    vae: nn.Module
    scheduler: Any                 # DDPMScheduler with the pipeline's betas (alphas_cumprod)
    scheduler_config: dict         # the pipeline scheduler's own config, as saved
    tokenizer: Any
    text_encoder: nn.Module
    tokenizer_2: Optional[Any]
    text_encoder_2: Optional[nn.Module]
    force_zeros_for_empty_prompt: bool
    pipeline_config: dict


def _is_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path))


def _load(cls, source: str, subfolder: Optional[str], field: str, what: str, **kw) -> Any:
    """`cls.from_pretrained(source, subfolder=...)`, with errors that name the config field."""
    if _is_local(source):
        root = Path(os.path.expanduser(source))
        if not root.is_dir():
            raise SDLoadError(f"{field}={source!r}: no such directory (expected a diffusers pipeline directory "
                              f"or a hub id)")
        if subfolder is not None and not (root / subfolder).is_dir():
            raise SDLoadError(f"{field}={source!r}: missing component {subfolder!r} ({what}); expected a "
                              f"subdirectory {subfolder}/ as written by save_pretrained")
        source = str(root)
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        where = f"{source}/{subfolder}" if subfolder else source
        raise SDLoadError(f"{field}={source!r}: cannot load {what} ({cls.__name__}) from {where!r}: {err}") from err


def _load_config(cls, source: str, subfolder: Optional[str], field: str, what: str) -> dict:
    if _is_local(source) and not (Path(os.path.expanduser(source)) / (subfolder or "")).is_dir():
        raise SDLoadError(f"{field}={source!r}: missing component {subfolder!r} ({what}); expected a "
                          f"subdirectory {subfolder}/ as written by save_pretrained")
    try:
        return cls.load_config(os.path.expanduser(source), subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise SDLoadError(f"{field}={source!r}: cannot load {what} from {subfolder!r}: {err}") from err


def load_pipeline_config(source: str, field: str = "model.reference") -> dict:
    """model_index.json of a pipeline (hub id or local dir)."""
    from diffusers import DiffusionPipeline

    if _is_local(source) and not (Path(os.path.expanduser(source)) / "model_index.json").is_file():
        raise SDLoadError(f"{field}={source!r}: not a diffusers pipeline directory (no model_index.json)")
    try:
        return dict(DiffusionPipeline.load_config(os.path.expanduser(source)))
    except (OSError, ValueError) as err:
        raise SDLoadError(f"{field}={source!r}: cannot read the pipeline's model_index.json: {err}") from err


def norms_in_float32(unet: nn.Module) -> None:
    """GroupNorm / LayerNorm weights to float32 in place (a fraction of a percent of a UNet's parameters): a bf16
    reference's norms then match its float32 fake score's (`distar.worlds.sd.bundle`, precision)."""
    for m in unet.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            m.float()


def load_reference(world: str, source: str, dtype: torch.dtype, variant: Optional[str] = None,
                   with_unet: bool = True) -> ReferenceParts:
    """Tokenizers, text encoders, VAE, reference UNet and scheduler of an SD1.5 or SDXL pipeline.

    Frozen weights are loaded in `dtype`, except an fp16 VAE whose config asks for upcasting (SDXL's VAE
    overflows in fp16), which stays in float32. with_unet=False leaves `unet` None (the sharded build makes
    the reference UNet itself, `distar.worlds.sd.sharded_build`).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    pipe_cfg = load_pipeline_config(source)
    has_te2 = "text_encoder_2" in pipe_cfg and pipe_cfg["text_encoder_2"] not in (None, [None, None])
    if world == "sdxl" and not has_te2:
        raise SDLoadError(f"model.reference={source!r}: model.world='sdxl' but the pipeline has no text_encoder_2 "
                          f"(an SD1.5 pipeline? use world: sd15)")
    if world == "sd15" and has_te2:
        raise SDLoadError(f"model.reference={source!r}: model.world='sd15' but the pipeline has text_encoder_2 "
                          f"(an SDXL pipeline? use world: sdxl)")
    f = "model.reference"
    kw = {"torch_dtype": dtype, "variant": variant}
    unet = _load(UNet2DConditionModel, source, "unet", f, "reference UNet", **kw) if with_unet else None
    vae = _load(AutoencoderKL, source, "vae", f, "VAE", **kw)
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae = vae.to(torch.float32)
    # Keep the pipeline scheduler's raw config (exported pipelines derive their LCM scheduler from it, as
    # DMD2 does); the training schedule is the DDPM one with the same betas.
    scheduler_config = dict(_load_config(DDPMScheduler, source, "scheduler", f, "scheduler config"))
    scheduler = DDPMScheduler.from_config(scheduler_config)
    tok = _load(CLIPTokenizer, source, "tokenizer", f, "tokenizer")
    te_cls = CLIPTextModel
    te = _load(te_cls, source, "text_encoder", f, "text encoder", **kw)
    tok2 = te2 = None
    if world == "sdxl":
        tok2 = _load(CLIPTokenizer, source, "tokenizer_2", f, "second tokenizer")
        te2 = _load(CLIPTextModelWithProjection, source, "text_encoder_2", f, "second text encoder", **kw)
    force_zeros = bool(pipe_cfg.get("force_zeros_for_empty_prompt", False)) if world == "sdxl" else False
    return ReferenceParts(unet=unet, vae=vae, scheduler=scheduler, scheduler_config=scheduler_config, tokenizer=tok, text_encoder=te,
                          tokenizer_2=tok2, text_encoder_2=te2, force_zeros_for_empty_prompt=force_zeros,
                          pipeline_config=pipe_cfg)


def _read_state_dict(path: Path, field: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A bare UNet state dict file. mmap: a torch file is memory-mapped (tensors read on first touch; a file in
    torch's legacy non-zip format cannot be, and is read whole)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "zipfile" not in str(err):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors come in many types
        raise SDLoadError(f"{field}={str(path)!r}: not a readable torch state dict: {err}") from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SDLoadError(f"{field}={str(path)!r}: expected a dict of tensors (a UNet state dict)")
    return sd


def check_same_architecture(sd: dict[str, torch.Tensor], like: nn.Module, field: str, source: str) -> None:
    """Raise SDLoadError unless `sd` has exactly the keys and shapes of `like`'s state dict."""
    check_same_shapes({k: tuple(v.shape) for k, v in sd.items()},
                      {k: tuple(v.shape) for k, v in like.state_dict().items()}, field, source)


def check_same_shapes(got: dict[str, tuple], ref: dict[str, tuple], field: str, source: str,
                      allow_unexpected: bool = False) -> None:
    """Raise SDLoadError unless the key -> shape maps `got` (weights) and `ref` (the reference UNet) are equal
    (`allow_unexpected`: keys in `got` only are ignored, as diffusers' from_pretrained ignores them)."""
    missing = sorted(set(ref) - set(got))
    unexpected = [] if allow_unexpected else sorted(set(got) - set(ref))
    shapes = sorted(k for k in set(ref) & set(got) if ref[k] != got[k])
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: {got[k]} vs reference {ref[k]})")
        raise SDLoadError(f"{field}={source!r}: weights do not match the reference UNet's architecture: "
                          + "; ".join(parts))


def resolve_generator(generator: Optional[str], subfolder: Optional[str], file: Optional[str]) -> tuple[str, Path]:
    """Where `model.generator` points: ("copy", None) for None (a copy of the reference UNet), ("file", path)
    for a bare UNet state-dict file (downloaded when `file` names one in a hub repo), ("folder", path) for a
    diffusers UNet folder or hub id (`path` as given, resolved by diffusers / `weight_files`)."""
    field = "model.generator"
    if generator is None:
        return "copy", None
    path = Path(os.path.expanduser(generator))
    if file is not None:
        if _is_local(generator):
            path = path / (subfolder or "") / file
            if not path.is_file():
                raise SDLoadError(f"model.generator_file={file!r}: no such file {str(path)!r}")
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(generator, file, subfolder=subfolder))
            except Exception as err:
                raise SDLoadError(f"{field}={generator!r}, model.generator_file={file!r}: cannot download: {err}") from err
    if path.suffix in STATE_DICT_SUFFIXES or file is not None:
        if not path.is_file():
            raise SDLoadError(f"{field}={generator!r}: no such file (expected a UNet state dict "
                              f"{'/'.join(STATE_DICT_SUFFIXES)}, a diffusers UNet folder or a hub id)")
        return "file", path
    if _is_local(generator) and not path.is_dir():
        raise SDLoadError(f"{field}={generator!r}: no such file or directory (expected a UNet state dict "
                          f"{'/'.join(STATE_DICT_SUFFIXES)}, a diffusers UNet folder or a hub id)")
    return "folder", path


def load_generator_unet(generator: Optional[str], subfolder: Optional[str], file: Optional[str],
                        reference_unet: nn.Module, variant: Optional[str] = None) -> nn.Module:
    """The generator's UNet in float32, with the reference UNet's architecture.

    generator None: a copy of the reference UNet. A .bin/.pt/.safetensors file: a bare UNet state dict
    (DMD2's `dmd2_sdxl_1step_unet_fp16.bin`). A directory or hub id: a diffusers UNet folder (in
    `subfolder` if given), or, with `file`, a state-dict file inside that hub repo / directory.
    """
    from diffusers import UNet2DConditionModel

    field = "model.generator"
    kind, path = resolve_generator(generator, subfolder, file)
    if kind == "copy":
        return copy.deepcopy(reference_unet).float()
    if kind == "file":
        sd = _read_state_dict(path, field)
        check_same_architecture(sd, reference_unet, field, str(path))
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            unet = UNet2DConditionModel.from_config(reference_unet.config)
        unet.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
        return unet.float()
    unet = _load(UNet2DConditionModel, generator, subfolder, field, "generator UNet", torch_dtype=torch.float32,
                 variant=variant)
    check_same_architecture(unet.state_dict(), reference_unet, field, generator)
    return unet.float()


LORA_INIT = "gaussian"  # peft's init_lora_weights: A ~ N(0, 1/r), B = 0


def add_lora(unet: nn.Module, rank: int) -> nn.Module:
    """Freeze `unet` and add trainable float32 LoRA adapters (rank `rank`) on its attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=LORA_INIT,
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return unet


def merged_unet(unet: nn.Module) -> nn.Module:
    """A float32 copy of `unet` with any LoRA adapters merged into the base weights and removed."""
    out = copy.deepcopy(unet).float()  # merge in float32, not in the frozen base's bf16/fp16
    if getattr(out, "peft_config", None):
        out.fuse_lora()
        out.unload_lora()
    return out.float().requires_grad_(False)
