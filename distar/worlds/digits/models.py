"""Network definitions of the digits world and their safetensors I/O.

Reference / fake score / one-step generator: one small diffusers `UNet2DConditionModel` (16x16, one
channel, pixels in [-1, 1]) conditioned through a small transformers `CLIPTextModel` (SD's interface: the
text encoder's last hidden state is `encoder_hidden_states`). Rewards and judges are small plain torch nets
whose inputs are images in [0, 1] of any size (resized in torch, so gradients flow).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .data import to_16

UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


def build_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


# ------------------------------------------------------------------------------------ reward models / judges
def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class DigitCNN(nn.Module):
    """Small CNN: 16x16 image in [0, 1] -> `n_out` values. The proxy rewards' architecture."""

    def __init__(self, n_out: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(_conv(1, width), _conv(width, width), nn.AvgPool2d(2),
                                  _conv(width, 2 * width), _conv(2 * width, 2 * width), nn.AvgPool2d(2),
                                  nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.SiLU())
        self.head = nn.Linear(64, n_out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(to_16(images) * 2.0 - 1.0))


class DigitMLP(nn.Module):
    """Judge classifier, deliberately a different architecture from the proxies (an MLP on raw pixels).

    `features` (the 64-d penultimate layer) are the Frechet-distance embedding."""

    def __init__(self, hidden: int = 256, feat: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(256, hidden), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(hidden, feat), nn.ReLU())
        self.head = nn.Linear(feat, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(to_16(images) * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# ------------------------------------------------------------------------------------ files
def save_weights(module_or_state, path: str | Path, dtype: torch.dtype = torch.float16) -> str:
    """Save a state dict as safetensors (floating tensors cast to `dtype`, half by default to keep the
    package small); returns its sha256."""
    from safetensors.torch import save_file

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    out = {k: (v.detach().to(dtype) if v.dtype.is_floating_point else v.detach()).contiguous().cpu()
           for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return sha256(path)


def load_weights(module: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a safetensors state dict into `module` (cast to the module's dtypes); errors name the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits weights: no file {str(path)!r}")
    state = load_file(str(path))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"digits weights {str(path)!r} do not fit {type(module).__name__}: "
                         f"missing {missing[:3]}..., unexpected {unexpected[:3]}...")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=strict)
    return module


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
