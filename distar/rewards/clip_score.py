"""CLIP score with open_clip: 100 * cos(image embedding, text embedding), differentiable in the image.

`path` (an "open_clip spec") picks the model and weights:
    None                       "ViT-L-14:openai" (OpenAI CLIP ViT-L/14, what torchmetrics' CLIPScore uses)
    "ARCH:TAG"                 a built-in open_clip architecture and pretrained tag, e.g.
                               "ViT-H-14:laion2b_s32b_b79k" (downloaded into open_clip's cache)
    "ARCH:/path/weights.bin"   a built-in architecture with a local checkpoint file (.bin/.pt/.safetensors)
    "hf-hub:org/repo"          an open_clip model on the Hugging Face hub
    "/path/dir"                a local dir in open_clip's hub layout: open_clip_config.json
                               ({"model_cfg": ..., "preprocess_cfg": ...}) and open_clip_pytorch_model.bin
                               or open_clip_model.safetensors
The score is not clamped at 0 (unlike Hessel et al.'s CLIPScore), so its gradient never vanishes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_images, clip_preprocess, upcast

DEFAULT_SPEC = "ViT-L-14:openai"
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _from_local_dir(root: Path, arg: str):
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    cfg_file = root / "open_clip_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{arg}={str(root)!r}: directory has no open_clip_config.json (expected open_clip's hub "
                         f"layout: open_clip_config.json + {' or '.join(_WEIGHT_FILES)})")
    weights = next((root / f for f in _WEIGHT_FILES if (root / f).is_file()), None)
    if weights is None:
        raise ValueError(f"{arg}={str(root)!r}: no weights file (expected one of {list(_WEIGHT_FILES)})")
    full = json.loads(cfg_file.read_text())
    model_cfg = dict(full["model_cfg"])
    custom = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
    model = (CustomTextCLIP if custom else CLIP)(**model_cfg)
    open_clip.load_checkpoint(model, str(weights))
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_tokenizer_name" in text_cfg:
        tokenizer = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                                    context_length=text_cfg.get("context_length", 77))
    else:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    pre = full.get("preprocess_cfg", {})
    return model, tokenizer, pre.get("mean", OPENAI_CLIP_MEAN), pre.get("std", OPENAI_CLIP_STD)


def load_open_clip(spec: Optional[str], arg: str = "path", default: str = DEFAULT_SPEC):
    """(model, tokenizer, mean, std) for an open_clip spec (see the module docstring); model in eval, frozen."""
    import open_clip

    spec = spec or default
    local = Path(os.path.expanduser(spec))
    if local.is_dir():
        model, tok, mean, std = _from_local_dir(local, arg)
    elif spec.startswith("hf-hub:"):
        try:
            model = open_clip.create_model(spec)
        except Exception as err:
            raise ValueError(f"{arg}={spec!r}: cannot load this open_clip hub model: {err}") from err
        tok = open_clip.get_tokenizer(spec)
        pre = getattr(model.visual, "preprocess_cfg", {}) or {}
        mean, std = pre.get("mean", OPENAI_CLIP_MEAN), pre.get("std", OPENAI_CLIP_STD)
    else:
        if ":" not in spec:
            raise ValueError(f"{arg}={spec!r}: expected an open_clip spec 'ARCH:TAG' (e.g. {DEFAULT_SPEC!r}), "
                             f"'ARCH:/path/weights.bin', 'hf-hub:org/repo' or an existing directory")
        arch, pretrained = spec.split(":", 1)
        if arch not in open_clip.list_models():
            raise ValueError(f"{arg}={spec!r}: unknown open_clip architecture {arch!r}")
        is_file = os.path.sep in pretrained or pretrained.startswith((".", "~"))
        if is_file and not Path(os.path.expanduser(pretrained)).is_file():
            raise ValueError(f"{arg}={spec!r}: no such weights file {pretrained!r}")
        try:
            model = open_clip.create_model(arch, pretrained=os.path.expanduser(pretrained))
        except Exception as err:
            raise ValueError(f"{arg}={spec!r}: cannot load open_clip {arch} with weights {pretrained!r}: {err}") from err
        tok = open_clip.get_tokenizer(arch)
        pre = getattr(model.visual, "preprocess_cfg", {}) or {}
        mean, std = pre.get("mean", OPENAI_CLIP_MEAN), pre.get("std", OPENAI_CLIP_STD)
    model.eval().requires_grad_(False)
    return model, tok, tuple(mean), tuple(std)


class OpenCLIPEmbedder(nn.Module):
    """Normalised open_clip image (differentiable) and text (no grad) embeddings from [0, 1] images."""

    def __init__(self, model: nn.Module, tokenizer, mean, std):
        super().__init__()
        self.model, self.tokenizer, self.mean, self.std = model, tokenizer, mean, std
        size = model.visual.image_size
        self.size = size if isinstance(size, int) else size[0]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images, self.size, self.mean, self.std)
        dtype = next(self.model.visual.parameters()).dtype
        return F.normalize(upcast(self.model.encode_image(x.to(dtype))), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts)).to(next(self.model.parameters()).device)
        return F.normalize(upcast(self.model.encode_text(ids)), dim=-1)


class CLIPScore(nn.Module):
    """100 * cos(E_img(x), E_txt(prompt)) per image [B]."""

    def __init__(self, embedder: OpenCLIPEmbedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts, "clip_score")
        img = self.embedder.image_features(images)
        txt = self.embedder.text_features(prompts)
        return 100.0 * (img * txt).sum(-1)


def build_clip_score(path: Optional[str], device: torch.device | str) -> CLIPScore:
    model, tok, mean, std = load_open_clip(path, arg="clip_score path")
    return CLIPScore(OpenCLIPEmbedder(model, tok, mean, std)).to(device).eval()
