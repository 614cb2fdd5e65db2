"""The one device choice: 'auto' means CUDA when present, else CPU; asking for CUDA without one is an error.
And the one inference dtype: half precision on a GPU, float32 on a CPU."""
from __future__ import annotations

import torch

from .errors import UserError


def pick_device(device: str | torch.device, arg: str = "device") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU, or a name torch does not know, raises
    UserError naming `arg` (the flag or field the value came from) and the value."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{arg} {name!r}: no CUDA device is available here (use 'auto' or 'cpu')")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"{arg} {name!r}: expected auto, cpu, cuda or cuda:N") from None


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype models run in for inference: bfloat16 on a GPU that has it, else float16; float32 on a CPU."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
