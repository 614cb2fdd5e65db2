"""LAION aesthetic predictor: an MLP head on normalised CLIP ViT-L/14 image embeddings, differentiable.

This is christophschuhmann/improved-aesthetic-predictor (`sac+logos+ava1-l14-linearMSE.pth`), the
"Aesthetic" column of docs/algorithm.md. `path` selects the weights:
    a file (.pth/.pt/.safetensors)   the head's state dict (keys layers.{0,2,4,6,7}.{weight,bias}); the CLIP
                                     backbone is open_clip "ViT-L-14:openai" (open_clip's cache or download)
    a directory                      holding the head as aesthetic_head.pth / .safetensors or
                                     sac+logos+ava1-l14-linearMSE.pth, and optionally clip/ (an open_clip
                                     directory, see distar.rewards.clip_score) for the backbone
    None                             download the head from the improved-aesthetic-predictor repo
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .clip_score import OpenCLIPEmbedder, load_open_clip
from .preprocess import check_images

HEAD_FILES = ("aesthetic_head.safetensors", "aesthetic_head.pth", "sac+logos+ava1-l14-linearMSE.pth")
HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
            "sac%2Blogos%2Bava1-l14-linearMSE.pth")
BACKBONE = "ViT-L-14:openai"


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (no activations, as released); embedding [B, D] -> [B, 1]."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


class AestheticScore(nn.Module):
    """Aesthetic score (about 1..10) per image [B]; prompts are accepted and ignored."""

    def __init__(self, embedder: OpenCLIPEmbedder, head: AestheticHead):
        super().__init__()
        self.embedder, self.head = embedder, head

    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        check_images(images, prompts, "aesthetic")
        emb = self.embedder.image_features(images)
        return self.head(emb.to(self.head.layers[0].weight.dtype)).squeeze(-1)


def load_head(file: Path, arg: str) -> AestheticHead:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(file))
    else:
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "layers.0.weight" not in sd:
        raise ValueError(f"{arg}={str(file)!r}: not an aesthetic-head state dict (expected keys "
                         f"layers.{{0,2,4,6,7}}.{{weight,bias}})")
    head = AestheticHead(sd["layers.0.weight"].shape[1])
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{arg}={str(file)!r}: aesthetic-head weights do not fit the MLP: {err}") from err
    return head


def build_aesthetic(path: Optional[str], device: torch.device | str) -> AestheticScore:
    arg = "aesthetic path"
    backbone = BACKBONE
    if path is None:
        from ImageReward.utils import _download

        head_file = Path(_download(HEAD_URL, os.path.expanduser("~/.cache/ImageReward")))
    else:
        p = Path(os.path.expanduser(path))
        if p.is_dir():
            head_file = next((p / f for f in HEAD_FILES if (p / f).is_file()), None)
            if head_file is None:
                raise ValueError(f"{arg}={path!r}: directory holds none of {list(HEAD_FILES)}")
            if (p / "clip").is_dir():
                backbone = str(p / "clip")
        elif p.is_file():
            head_file = p
        else:
            raise ValueError(f"{arg}={path!r}: no such file or directory (expected the aesthetic head's state dict "
                             f"or a directory holding it)")
    head = load_head(head_file, arg)
    model, tok, mean, std = load_open_clip(backbone, arg=f"{arg} (CLIP backbone)")
    if _embed_dim(model) not in (None, head.layers[0].in_features):
        raise ValueError(f"{arg}={path!r}: head expects {head.layers[0].in_features}-dim embeddings but the CLIP "
                         f"backbone gives {_embed_dim(model)}")
    return AestheticScore(OpenCLIPEmbedder(model, tok, mean, std), head).to(device).eval().requires_grad_(False)


def _embed_dim(model: nn.Module) -> Optional[int]:
    return getattr(model.visual, "output_dim", None)
