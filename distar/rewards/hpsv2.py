"""HPSv2 / HPSv2.1 (human preference score): open_clip ViT-H-14 fine-tuned on HPD, differentiable.

Score, as the hpsv2 package computes it: cos(image embedding, text embedding) per image (no logit scale;
typical values 0.2..0.35). The hpsv2 package itself is not needed: its model is open_clip's ViT-H-14 with
a full state dict in `checkpoint["state_dict"]`. `path` selects the weights:
    a file (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt)  the checkpoint; architecture ViT-H-14
    a directory           open_clip_config.json (the architecture, open_clip hub layout) and the checkpoint
                          as HPS_v2.1_compressed.pt / HPS_v2_compressed.pt / hps.pt
    None                  download HPS_v2.1_compressed.pt from the xswu/HPSv2 hub repo
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .clip_score import OpenCLIPEmbedder
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_images

CHECKPOINTS = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt", "hps.pt")
ARCH = "ViT-H-14"


class HPSv2Score(nn.Module):
    def __init__(self, embedder: OpenCLIPEmbedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts, "hpsv2")
        return (self.embedder.image_features(images) * self.embedder.text_features(prompts)).sum(-1)


def _checkpoint_state_dict(file: Path, arg: str) -> dict:
    ckpt = torch.load(str(file), map_location="cpu", weights_only=True)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or "visual.proj" not in sd and "visual.conv1.weight" not in sd:
        raise ValueError(f"{arg}={str(file)!r}: not an HPSv2 checkpoint (expected an open_clip CLIP state dict "
                         f"under 'state_dict')")
    return sd


def build_hpsv2(path: Optional[str], device: torch.device | str) -> HPSv2Score:
    import open_clip
    from open_clip.model import CLIP

    arg = "hpsv2 path"
    model_cfg = None
    if path is None:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download("xswu/HPSv2", CHECKPOINTS[0]))
    else:
        p = Path(os.path.expanduser(path))
        if p.is_dir():
            file = next((p / f for f in CHECKPOINTS if (p / f).is_file()), None)
            if file is None:
                raise ValueError(f"{arg}={path!r}: directory holds none of {list(CHECKPOINTS)}")
            if (p / "open_clip_config.json").is_file():
                model_cfg = json.loads((p / "open_clip_config.json").read_text())["model_cfg"]
        elif p.is_file():
            file = p
        else:
            raise ValueError(f"{arg}={path!r}: no such file or directory (expected an HPSv2 checkpoint such as "
                             f"HPS_v2.1_compressed.pt, or a directory holding one)")
    model = CLIP(**model_cfg) if model_cfg is not None else open_clip.create_model(ARCH, pretrained=None)
    try:
        model.load_state_dict(_checkpoint_state_dict(file, arg), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{arg}={str(file)!r}: checkpoint does not fit the {ARCH if model_cfg is None else 'configured'} "
                         f"architecture: {str(err)[:400]}") from err
    ctx = (model_cfg or {}).get("text_cfg", {}).get("context_length", 77)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    model.eval().requires_grad_(False)
    return HPSv2Score(OpenCLIPEmbedder(model, tok, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)).to(device).eval()
