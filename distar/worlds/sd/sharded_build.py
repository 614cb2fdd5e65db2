"""SD1.5 / SDXL bundles built already sharded: no rank ever holds a whole UNet (`ray.strategy=fsdp`).

    bundle = build_sharded_bundle(model_cfg, device, shard)   # shard(module) -> the module, sharded in place

`build_bundle` loads three full UNets on every rank and FSDP shards them afterwards: at SDXL size a ~26 GB host
peak per rank before the first step. Here the reference, generator and fake score are made on the meta device
from their config.json, given the dtypes `build_bundle` gives them, sharded by `shard` (`distar.fsdp.shard_module`:
same units, same mixed-precision policy), allocated with `to_empty`, and each rank then copies its own slice of
every tensor straight out of the weights files (`weight_files`: safetensors slices, memory-mapped torch files).
The result is the state `build_bundle` followed by sharding gives, value for value:

  reference   file -> model.dtype (norms then float32 when bf16), as diffusers' from_pretrained(torch_dtype) + norms
  generator   None: the reference's values (file -> model.dtype) in float32; a state-dict file or UNet folder: its
              values in float32. LoRA: the base in model.dtype.
  fake score  the reference's values in float32 (full fine-tuning); LoRA: the reference's dtypes and values.
  LoRA        adapters drawn on the CPU as peft draws them (`_init_adapters`), in the same order (generator, then
              fake score), from each rank's torch RNG; each rank keeps its slice, as when `build_bundle`'s adapters
              are sharded.

The small frozen parts (VAE, text encoders, tokenizers, scheduler) load whole, as in `build_bundle`; the hooks'
`prepare_bundle` then shards the big ones (SDXL's second text encoder), as before.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .bundle import StableDiffusionBundle, assemble_bundle
from .loading import (DTYPES, LORA_INIT, SDLoadError, _load_config, add_lora, check_same_shapes, load_reference,
                      norms_in_float32, resolve_generator)
from .weight_files import UNetWeights, local_index, unet_weight_files


def _meta_unet(config: dict, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    nn.Module.to(unet, dtype)  # not diffusers' override, which warns of fp32 modules even when there are none
    buffers = [name for name, _ in unet.named_buffers()]
    if buffers:  # to_empty would leave them garbage, and a weights file need not hold them
        raise SDLoadError(f"the sharded build cannot fill the UNet's buffer {buffers[0]!r} (diffusers' "
                          f"UNet2DConditionModel has none; build without ray.strategy=fsdp)")
    return unet


def _shapes(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def _file_shapes(files: list[Path], field: str) -> dict[str, tuple[int, ...]]:
    with UNetWeights(files, field) as weights:
        return dict(weights.shapes)


def _generator_source(m, ref_config: dict, ref_files: list[Path], dtype: torch.dtype, want: dict):
    """(config, weights files, dtype its values pass through) of the generator; its keys and shapes checked."""
    kind, path = resolve_generator(m.generator, m.generator_subfolder, m.generator_file)
    if kind == "copy":
        return ref_config, ref_files, dtype
    if kind == "file":
        check_same_shapes(_file_shapes([path], "model.generator"), want, "model.generator", str(path))
        return ref_config, [path], torch.float32
    from diffusers import UNet2DConditionModel

    config = dict(_load_config(UNet2DConditionModel, m.generator, m.generator_subfolder, "model.generator",
                               "generator UNet config"))
    files = unet_weight_files(m.generator, m.generator_subfolder, m.variant, "model.generator", "generator UNet")
    check_same_shapes(_file_shapes(files, "model.generator"), want, "model.generator", m.generator,
                      allow_unexpected=True)  # as diffusers' from_pretrained, build_bundle's loader
    return config, files, torch.float32


def _init_adapters(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Full float32 values of `unet`'s LoRA adapters (which are on the meta device), drawn as `add_lora` draws
    them: peft builds each adapter as two nn.Linear (their default init draws from the RNG), re-initialises them
    with `LORA_INIT`, then casts them to the base layer's dtype; `add_lora` casts them back to float32."""
    from peft.tuners.lora import LoraLayer

    values = {}
    for name, layer in unet.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        base_dtype = layer.get_base_layer().weight.dtype
        for adapter in list(layer.lora_A.keys()):
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            for lin in (a, b):
                lin.to_empty(device="cpu")
                lin.reset_parameters()  # nn.Linear's own init, as at peft's construction
            layer.reset_lora_parameters(adapter, LORA_INIT)
            for part, lin in (("lora_A", a), ("lora_B", b)):
                for pname, p in lin.named_parameters():
                    values[f"{name}.{part}.{adapter}.{pname}"] = p.detach().to(base_dtype).float()
                lin.to("meta")
    return values


@torch.no_grad()
def _fill(unet: nn.Module, weights: UNetWeights, via: torch.dtype, adapters: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slice of every parameter of the (sharded, `to_empty`) `unet` out of `weights`: a value
    is the file's, cast to `via`, then to the parameter's dtype; LoRA adapters come from `adapters`."""
    from torch.distributed.tensor import DTensor

    for name, p in unet.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel() == 0:  # a tensor with fewer rows than ranks: nothing here
            continue
        index = local_index(p)
        if "lora_" in name:
            local.copy_(adapters[name][index])
        else:
            local.copy_(weights.read(name.replace(".base_layer", ""), index).to(via))


def _as_trained(unet: nn.Module, lora_rank: int) -> nn.Module:
    """Full fine-tuning: float32, trainable. LoRA: the base frozen as it is, float32 adapters trainable, made on the
    meta device (drawing nothing from the RNG: `_init_adapters` draws their values later)."""
    if lora_rank > 0:
        with torch.device("meta"):
            return add_lora(unet, lora_rank)
    return unet.float().requires_grad_(True)


def build_sharded_bundle(model_cfg, device: torch.device | str,
                         shard: Callable[[nn.Module], nn.Module]) -> StableDiffusionBundle:
    """The bundle `build_bundle(model_cfg, device)` gives, with its three UNets sharded by `shard` (module doc).
    Every rank calls it (the sharding is collective-free, but the ranks' modules must match)."""
    from diffusers import UNet2DConditionModel

    m, device = model_cfg, torch.device(device)
    dtype = DTYPES[m.dtype]
    parts = load_reference(m.world, m.reference, dtype, m.variant, with_unet=False)
    ref_config = dict(_load_config(UNet2DConditionModel, m.reference, "unet", "model.reference",
                                   "reference UNet config"))
    ref_files = unet_weight_files(m.reference, "unet", m.variant, "model.reference", "reference UNet")
    reference = _meta_unet(ref_config, dtype)
    want = _shapes(reference)
    check_same_shapes(_file_shapes(ref_files, "model.reference"), want, "model.reference",
                      str(ref_files[0].parent), allow_unexpected=True)  # as from_pretrained in build_bundle
    gen_config, gen_files, gen_via = _generator_source(m, ref_config, ref_files, dtype, want)

    generator = _meta_unet(gen_config, dtype if m.lora_rank > 0 else torch.float32)
    if gen_config is not ref_config:
        check_same_shapes(_shapes(generator), want, "model.generator", f"{m.generator} (its config.json)")
    fake = _meta_unet(ref_config, dtype)
    if dtype == torch.bfloat16:  # as build_bundle: the reference's norms in float32, and the fake copies it
        for net in (reference, fake):
            norms_in_float32(net)
    generator, fake = _as_trained(generator, m.lora_rank), _as_trained(fake, m.lora_rank)
    adapters = {net: _init_adapters(net) if m.lora_rank > 0 else {} for net in (generator, fake)}
    reference.requires_grad_(False).eval()
    if m.gradient_checkpointing:
        for net in (generator, fake, reference, parts.vae):
            net.enable_gradient_checkpointing()
    for net, files, via in ((reference, ref_files, dtype), (generator, gen_files, gen_via), (fake, ref_files, dtype)):
        shard(net)
        net.to_empty(device=device)
        # files opened per module: the pages of them this rank read are unmapped before the next module's
        with UNetWeights(files, "model.reference" if files is ref_files else "model.generator") as weights:
            _fill(net, weights, via, adapters.get(net, {}))
    for part in (parts.vae, parts.text_encoder, parts.text_encoder_2):
        if part is not None:
            part.requires_grad_(False).eval().to(device)
    generator.train()
    fake.train()
    return assemble_bundle(m, dataclasses.replace(parts, unet=reference), generator, fake, device)
