"""Images in [0, 1] -> PNG bytes, with the same quantisation as `distar generate` (loading.save_images)."""
from __future__ import annotations

import io

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] floats in [0, 1] -> uint8 on the CPU."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def encode_png(image_u8: torch.Tensor) -> bytes:
    """One [C, H, W] uint8 image (C = 1 or 3) -> PNG bytes (grey or RGB)."""
    a = image_u8[0].numpy() if image_u8.shape[0] == 1 else image_u8.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> [C, H, W] uint8 (for tests and clients)."""
    import numpy as np

    a = np.asarray(Image.open(io.BytesIO(data)))
    t = torch.from_numpy(a.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)
