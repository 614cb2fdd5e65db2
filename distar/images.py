"""Images in and out: the one uint8 quantisation, PNG encode/decode, grids and per-image PNG files.

Every image that leaves distar (`distar generate`, the HTTP API, the eval cache, MLflow grids) goes through
`to_uint8`, so the same float image always becomes the same bytes. Images are float tensors
[n, C, H, W] in [0, 1] with C = 1 (grey) or 3 (RGB); 2-D points [n, 2] (the toy world) plot as a scatter.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] (or [C, H, W]) floats in [0, 1] -> uint8 on the CPU, rounded to nearest."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _pil(image_u8: torch.Tensor):
    """One [C, H, W] uint8 image -> a PIL image (mode L for one channel, RGB for three)."""
    from PIL import Image

    a = image_u8[0].numpy() if image_u8.shape[0] == 1 else image_u8.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(a))


def encode_png(image_u8: torch.Tensor) -> bytes:
    """One [C, H, W] uint8 image (C = 1 or 3) -> PNG bytes (grey or RGB)."""
    buf = io.BytesIO()
    _pil(image_u8).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> [C, H, W] uint8."""
    from PIL import Image

    return _from_pil(Image.open(io.BytesIO(data)))


def read_png(path: str | Path) -> torch.Tensor:
    """A PNG file -> [C, H, W] float in [0, 1] (the inverse of `save_png` up to quantisation)."""
    from PIL import Image

    with Image.open(path) as im:
        return _from_pil(im).float() / 255


def read_rgb_u8(path: str | Path) -> torch.Tensor:
    """Any image file PIL reads (PNG, JPEG, WebP, ...) -> [3, H, W] uint8 RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return _from_pil(im.convert("RGB"))


def _from_pil(im) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(im).copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """One float image [C, H, W] in [0, 1] -> a PNG file."""
    _pil(to_uint8(image)).save(path)
    return Path(path)


def grid(images: torch.Tensor | list[torch.Tensor], cols: int | None = None, min_side: int = 64,
         pad_value: float = 0.25):
    """A PIL image of `images` ([n, C, H, W] or a list of [C, H, W]) tiled `cols` wide (default: square),
    1-px borders of `pad_value`, each cell upscaled (nearest) to at least `min_side` pixels."""
    from PIL import Image
    from torchvision.utils import make_grid

    x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
    x = x.detach().float().cpu().clamp(0, 1)
    cols = cols or math.ceil(math.sqrt(len(x)))
    g = to_uint8(make_grid(x, nrow=cols, padding=1, pad_value=pad_value))
    img = _pil(g[:1] if x.shape[1] == 1 else g)
    s = max(1, math.ceil(min_side / x.shape[-2]))
    return img.resize((img.width * s, img.height * s), Image.NEAREST)


def scatter_png(points: torch.Tensor, path: str | Path, lim: tuple[float, float] = (4.0, 5.0)) -> Path:
    """2-D points [n, 2] as a small scatter plot (the toy world's "images")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points.detach().float().cpu()
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.scatter(pts[:, 0], pts[:, 1], s=6)
    ax.set_xlim(-lim[0], lim[0]), ax.set_ylim(-lim[1], lim[1])
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def save_grid_png(images: torch.Tensor, path: str | Path) -> Path:
    """Images [n, C, H, W] as one grid PNG; 2-D points [n, 2] as a scatter plot."""
    if images.dim() == 2:
        return scatter_png(images, path)
    grid(images).save(path)
    return Path(path)


def save_images(images: torch.Tensor, out: Path, prefix: str = "sample") -> list[Path]:
    """One PNG per image (native resolution) plus grid.png (upscaled) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_png(im, out / f"{prefix}_{i:04d}.png") for i, im in enumerate(images)]
    grid(images).save(out / "grid.png")
    return paths
