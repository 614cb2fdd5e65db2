"""The one device choice: 'auto' means CUDA when present, else CPU; asking for CUDA without one is an error.
And the one inference dtype: half precision on a GPU, float32 on a CPU."""
from __future__ import annotations

import torch

from .errors import UserError


def pick_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU raises UserError naming the value."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA device is available here (use 'auto' or 'cpu')")
    return torch.device(name)


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype models run in for inference: bfloat16 on a GPU that has it, else float16; float32 on a CPU."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
