"""A generator's LoRA adapters as the file diffusers reads: `pipeline.load_lora_weights(dir)` or
`UNet2DConditionModel.load_lora_adapter(dir, prefix="unet")`.

    save_adapters(out_dir, adapter_state, lora_config(unet))   # out_dir/pytorch_lora_weights.safetensors

`adapter_state` holds peft's parameter names (`...to_q.lora_A.default.weight`, as `named_parameters` of a
UNet with `add_adapter` gives them); the file holds diffusers' (`unet....to_q.lora_A.weight`), in float32, with
the adapter's LoraConfig (rank, alpha, target modules) in the safetensors metadata as diffusers writes it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ADAPTER_FILE = "pytorch_lora_weights.safetensors"   # diffusers' LORA_WEIGHT_NAME_SAFE
PREFIX = "unet"
_ADAPTER_NAME = re.compile(r"\.(lora_[AB]|lora_magnitude_vector)\.default(\.|$)")


def lora_config(net: torch.nn.Module) -> dict[str, Any] | None:
    """The module's peft LoraConfig as a dict, or None when it carries no adapters (full fine-tuning)."""
    configs = getattr(net, "peft_config", None)
    if not configs:
        return None
    cfg = next(iter(configs.values())).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}


def adapter_weights(adapter_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft parameter names -> diffusers' LoRA file keys (prefixed with `unet.`), float32 CPU tensors."""
    bad = [k for k in adapter_state if not _ADAPTER_NAME.search(k)]
    if bad:
        raise ValueError(f"not LoRA adapter parameters: {bad[:3]}")
    return {PREFIX + "." + _ADAPTER_NAME.sub(r".\1\2", k): v.detach().to("cpu", torch.float32).contiguous()
            for k, v in adapter_state.items()}


def save_adapters(out_dir: Path, adapter_state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    path = Path(out_dir) / ADAPTER_FILE
    meta = json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True, default=str)
    save_file(adapter_weights(adapter_state), str(path), metadata={"format": "pt", "lora_adapter_metadata": meta})
    return path
