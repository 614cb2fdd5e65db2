"""ImageReward (Xu et al. 2023, the image-reward package), differentiable in the image via `score_gard`.

The network is the package's own `ImageReward` class (BLIP ViT + BERT with cross-attention + MLP head) and
its `score_gard(ids, mask, image)`; only construction differs from `RM.load`, which hard-codes ViT-L and
fetches BLIP's BERT tokenizer from the hub inside the constructor. Here the vision tower's size may come
from a file (tests use a tiny one) and the tokenizer from a local directory. Weights load as `RM.load`
loads them (torch.load + load_state_dict(strict=False)), but a missing weight or a shape mismatch raises.

`path` selects the weights:
    None         hub: THUDM/ImageReward (ImageReward.pt, med_config.json), tokenizer bert-base-uncased
    a directory  ImageReward.pt and med_config.json (both required); optional tokenizer/ (a BERT tokenizer
                 directory with vocab.txt; default: bert-base-uncased from the hub cache) and optional
                 vision_config.json (default: BLIP's ViT-L/16 at 224 px, what ImageReward-v1.0 uses)
    a .pt file   the state dict, with med_config.json (and the optional files above) beside it
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .preprocess import check_images, clip_preprocess

VIT_LARGE = {"image_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
MAX_PROMPT_TOKENS = 35  # as ImageReward.score / inference_rank tokenize


def blip_tokenizer(source: str):
    """BLIP's BERT tokenizer with its extra [DEC] / [ENC] tokens (ImageReward.models.BLIP.blip.init_tokenizer)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


class _BLIP(nn.Module):
    """BLIP_Pretrain's modules (same names, so ImageReward.pt loads) with a configurable ViT."""

    def __init__(self, med_config: str, vision: dict, tokenizer, embed_dim: int = 256):
        super().__init__()
        from ImageReward.models.BLIP.med import BertConfig, BertModel
        from ImageReward.models.BLIP.vit import VisionTransformer

        width = vision["embed_dim"]
        self.visual_encoder = VisionTransformer(img_size=vision["image_size"], patch_size=vision["patch_size"],
                                                embed_dim=width, depth=vision["depth"],
                                                num_heads=vision["num_heads"], drop_path_rate=0.0)
        self.tokenizer = tokenizer
        cfg = BertConfig.from_json_file(med_config)
        cfg.encoder_width = width
        self.text_encoder = BertModel(config=cfg, add_pooling_layer=False)
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, embed_dim)


def build_network(med_config: str, vision: dict, tokenizer, device: torch.device | str = "cpu") -> nn.Module:
    """The package's ImageReward module, built around a `_BLIP` instead of a hard-coded ViT-L BLIP."""
    from ImageReward.ImageReward import MLP, ImageReward

    class _ImageReward(ImageReward):
        def __init__(self):
            nn.Module.__init__(self)  # ImageReward.__init__ would build ViT-L and hit the hub for the tokenizer
            self.device = torch.device(device)
            self.blip = _BLIP(med_config, vision, tokenizer)
            self.mlp = MLP(self.blip.text_encoder.config.hidden_size)
            self.mean = 0.16717362830052426
            self.std = 1.0333394966054072

    return _ImageReward()


class ImageRewardScore(nn.Module):
    """ImageReward per image [B] (standardised, about -2..2) from [0, 1] images and prompts."""

    def __init__(self, net: nn.Module, image_size: int):
        super().__init__()
        self.net, self.image_size = net, image_size

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts, "image_reward")
        dev = next(self.net.parameters()).device
        self.net.device = dev  # score_gard puts its attention mask on `self.device`
        tok = self.net.blip.tokenizer(list(prompts), padding="max_length", truncation=True,
                                      max_length=MAX_PROMPT_TOKENS, return_tensors="pt")
        pixels = clip_preprocess(images, self.image_size).to(dev, next(self.net.parameters()).dtype)
        return self.net.score_gard(tok.input_ids.to(dev), tok.attention_mask.to(dev), pixels).squeeze(-1)


def _resolve(path: Optional[str]) -> tuple[Path, Path, str, dict]:
    """(state-dict file, med_config.json, tokenizer source, vision config) for `path`."""
    arg = "image_reward path"
    if path is None:
        from ImageReward.utils import ImageReward_download

        root = os.path.expanduser("~/.cache/ImageReward")
        base = "https://huggingface.co/THUDM/ImageReward/blob/main/"
        try:
            ckpt = Path(ImageReward_download(base + "ImageReward.pt", root))
            med = Path(ImageReward_download(base + "med_config.json", root))
        except Exception as err:
            raise ValueError(f"{arg}=None: cannot download THUDM/ImageReward (offline? give a local directory "
                             f"with ImageReward.pt and med_config.json): {err}") from err
        return ckpt, med, "bert-base-uncased", dict(VIT_LARGE)
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        root, ckpt = p, p / "ImageReward.pt"
    elif p.is_file():
        root, ckpt = p.parent, p
    else:
        raise ValueError(f"{arg}={path!r}: no such file or directory (expected a directory with ImageReward.pt "
                         f"and med_config.json, or the path of ImageReward.pt)")
    med = root / "med_config.json"
    for f, what in ((ckpt, "the ImageReward state dict"), (med, "BLIP's med_config.json")):
        if not f.is_file():
            raise ValueError(f"{arg}={path!r}: missing {f.name} ({what})")
    tok = str(root / "tokenizer") if (root / "tokenizer" / "vocab.txt").is_file() else "bert-base-uncased"
    vision = dict(VIT_LARGE)
    if (root / "vision_config.json").is_file():
        vision.update(json.loads((root / "vision_config.json").read_text()))
    return ckpt, med, tok, vision


def build_image_reward(path: Optional[str], device: torch.device | str) -> ImageRewardScore:
    arg = "image_reward path"
    ckpt, med, tok_source, vision = _resolve(path)
    try:
        tokenizer = blip_tokenizer(tok_source)
    except (OSError, ValueError) as err:
        raise ValueError(f"{arg}={path!r}: cannot load BLIP's BERT tokenizer from {tok_source!r} (put a BERT "
                         f"tokenizer with vocab.txt in tokenizer/ next to ImageReward.pt): {err}") from err
    net = build_network(str(med), vision, tokenizer, device)
    sd = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    try:
        missing, _ = net.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        raise ValueError(f"{arg}={path!r}: {ckpt.name} does not fit the ImageReward architecture "
                         f"(med_config.json / vision_config.json): {str(err)[:500]}") from err
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{arg}={path!r}: {ckpt.name} lacks {len(missing)} weights of the ImageReward "
                         f"architecture (e.g. {missing[:3]})")
    net.eval().requires_grad_(False)
    return ImageRewardScore(net, int(vision["image_size"])).to(device).eval()
