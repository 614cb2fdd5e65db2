"""Tiny random-init SD1.5 / SDXL pipelines and reward models, built offline and saved like the real ones.

Everything here is written to a directory with save_pretrained / torch.save, so tests load it back through
distar's production loading code (never by handing live modules over).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

LATENT = 8          # latent side; the VAE has 2 blocks (factor 2), so images are 16x16
BPE = Path(__import__("open_clip").__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def clip_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49,408 ids, as SD uses), built offline from open_clip's BPE file."""
    from transformers import CLIPTokenizer

    from open_clip.tokenizer import bytes_to_unicode

    merges = gzip.open(BPE).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=77,
                         pad_token=pad_token)


def _text_config(projection_dim: int = 16, hidden: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu")


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=2 * LATENT, scaling_factor=0.5)


def tiny_unet(sdxl: bool, cross_attention_dim: int | None = None, block_out_channels=(16, 32), **blocks):
    """blocks: other down_block_types / up_block_types (with a block_out_channels of their length)."""
    from diffusers import UNet2DConditionModel

    kw = dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
              block_out_channels=block_out_channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    kw.update(blocks)
    if sdxl:  # text_time micro-conditioning: 6 time ids x 4 + pooled projection 16
        kw.update(cross_attention_dim=cross_attention_dim or 32, addition_embed_type="text_time",
                  addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16,
                  use_linear_projection=True)
    else:
        kw.update(cross_attention_dim=cross_attention_dim or 16)
    return UNet2DConditionModel(**kw)


def save_sd15(root: Path, seed: int = 0, unet_kw: dict | None = None) -> Path:
    """An SD1.5-style pipeline directory (PNDM scheduler as SD1.5 ships, no safety checker); unet_kw: see tiny_unet."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(root / "_bpe")
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=tok,
                                   unet=tiny_unet(False, **(unet_kw or {})), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = root / "sd15"
    pipe.save_pretrained(out)
    return out


def save_sdxl(root: Path, seed: int = 0, unet_kw: dict | None = None) -> Path:
    """An SDXL-style pipeline directory: two text encoders (16 + 16 = 32 cross-attention dims), Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = clip_tokenizer(root / "_bpe")
    tok2 = clip_tokenizer(root / "_bpe2", pad_token="!")
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(_text_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer=tok,
                                     tokenizer_2=tok2, unet=tiny_unet(True, **(unet_kw or {})), scheduler=sched,
                                     force_zeros_for_empty_prompt=True)
    out = root / "sdxl"
    pipe.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------ rewards
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_open_clip_dir(out: Path, seed: int = 0, model_cfg: dict | None = None) -> Path:
    """A tiny open_clip model in open_clip's hub layout (open_clip_config.json + open_clip_pytorch_model.bin)."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    cfg = model_cfg or TINY_OPEN_CLIP
    model = CLIP(**cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


def save_aesthetic_dir(out: Path, seed: int = 0) -> Path:
    """Aesthetic head on the tiny open_clip backbone (in clip/)."""
    from distar.rewards.aesthetic import AestheticHead

    save_open_clip_dir(out / "clip", seed)
    torch.manual_seed(seed + 1)
    head = AestheticHead(TINY_OPEN_CLIP["embed_dim"])
    for p in head.parameters():  # default init gives scores ~0 with a tiny gradient; make the signal visible
        torch.nn.init.normal_(p, std=0.5)
    torch.save(head.state_dict(), out / "aesthetic_head.pth")
    return out


def save_hpsv2_dir(out: Path, seed: int = 0) -> Path:
    """An HPSv2-style checkpoint ({'state_dict': open_clip CLIP state dict}) with its tiny architecture."""
    from open_clip.model import CLIP

    save_open_clip_dir(out, seed)
    (out / "open_clip_pytorch_model.bin").unlink()
    torch.manual_seed(seed)
    torch.save({"state_dict": CLIP(**TINY_OPEN_CLIP).state_dict()}, out / "HPS_v2.1_compressed.pt")
    return out


def save_pickscore_dir(out: Path, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel (PickScore's architecture) with a real CLIP BPE tokenizer beside it."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(out)
    clip_tokenizer(out / "_bpe").save_pretrained(out)
    return out


TINY_BERT_WORDS = ["a", "an", "the", "of", "photo", "cat", "dog", "red", "blue", "on", "in", "painting", "house"]


def save_image_reward_dir(out: Path, seed: int = 0) -> Path:
    """ImageReward.pt + med_config.json + tokenizer/ + vision_config.json for a tiny BLIP (ViT 32 px)."""
    from distar.rewards.image_reward import blip_tokenizer, build_network

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_BERT_WORDS + list("abcdefghijklmnopqrstuvwxyz")
    (out / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = blip_tokenizer(str(out / "tokenizer"))
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.0, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 37,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(tok),
           "encoder_width": 32, "add_cross_attention": True}
    (out / "med_config.json").write_text(json.dumps(med))
    vision = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    (out / "vision_config.json").write_text(json.dumps(vision))
    torch.manual_seed(seed)
    net = build_network(str(out / "med_config.json"), vision, tok)
    for p in net.mlp.parameters():  # the package's MLP init makes the score nearly constant; make it visible
        torch.nn.init.normal_(p, std=0.3)
    torch.save(net.state_dict(), out / "ImageReward.pt")
    return out


# ------------------------------------------------------------------------------------------------ fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory) -> dict[str, Path]:
    """{'sd15': dir, 'sdxl': dir}: tiny pipelines saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {"sd15": save_sd15(root), "sdxl": save_sdxl(root)}


def sd_config(world: str, reference: Path, **kw):
    from distar.config import StableDiffusionModel

    return StableDiffusionModel(world=world, reference=str(reference), **kw)


def build(world: str, reference: Path, **kw):
    """Build a bundle through the registry, as the training loop does."""
    from distar.registry import WORLDS, resolve

    return resolve(WORLDS, world, "world")(sd_config(world, reference, **kw), "cpu")
