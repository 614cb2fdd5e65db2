"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic, differentiable in the image.

Score, as PickScore's reference code computes it: logit_scale.exp() * cos(image embedding, text embedding)
per image (about 18..24; the tables in docs/algorithm.md report it divided by 100). The model is
transformers' CLIPModel; preprocessing (resize shortest side, center crop, normalise) runs in torch.
`path` selects the weights:
    None           model yuvalkirstain/PickScore_v1, tokenizer/processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    a hub id       that CLIPModel, with the laion tokenizer above
    a directory    a saved CLIPModel (config.json + weights) with its tokenizer files in the same directory or
                   in processor/ (optionally with preprocessor_config.json for image mean/std)
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

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


class PickScore(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.model, self.tokenizer, self.mean, self.std = model, tokenizer, tuple(mean), tuple(std)
        self.size = int(model.config.vision_config.image_size)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts, "pickscore")
        dev = self.model.logit_scale.device
        x = clip_preprocess(images, self.size, self.mean, self.std).to(self.model.dtype)
        img = F.normalize(upcast(self.model.get_image_features(pixel_values=x)), dim=-1)
        with torch.no_grad():
            tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
            txt = F.normalize(self.model.get_text_features(input_ids=tok.input_ids.to(dev),
                                                           attention_mask=tok.attention_mask.to(dev)), dim=-1)
        return upcast(self.model.logit_scale.exp()) * (img * txt.to(img.dtype)).sum(-1)


def _is_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path))


def build_pickscore(path: Optional[str], device: torch.device | str) -> PickScore:
    from transformers import AutoTokenizer, CLIPModel

    arg = "pickscore path"
    source = path or MODEL_ID
    tok_source, mean, std = PROCESSOR_ID, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if _is_local(source):
        root = Path(os.path.expanduser(source))
        if not (root / "config.json").is_file():
            raise ValueError(f"{arg}={path!r}: expected a directory with a saved CLIPModel (config.json + weights) "
                             f"and its tokenizer files, or a hub id")
        tok_dir = next((d for d in (root, root / "processor") if any((d / f).is_file() for f in _TOKENIZER_FILES)),
                       None)
        if tok_dir is None:
            raise ValueError(f"{arg}={path!r}: no tokenizer files ({list(_TOKENIZER_FILES)}) in the directory "
                             f"or its processor/ subdirectory")
        tok_source = str(tok_dir)
        pcfg = tok_dir / "preprocessor_config.json"
        if pcfg.is_file():
            cfg = json.loads(pcfg.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        source = str(root)
    try:
        model = CLIPModel.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(tok_source)
    except (OSError, ValueError) as err:
        raise ValueError(f"{arg}={path!r}: cannot load PickScore's CLIPModel / tokenizer: {err}") from err
    model.eval().requires_grad_(False)
    return PickScore(model, tokenizer, mean, std).to(device).eval()
