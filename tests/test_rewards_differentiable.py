"""The five reward models, built tiny, saved, loaded through their production builders (via the registry).

Checked: output shape and finiteness, finite-difference image gradients (float64), prompt dependence,
frozen parameters, torch preprocessing against the PIL pipelines, clear errors for wrong paths/weights.
"""
from __future__ import annotations

import importlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd

from distar.registry import REWARDS, resolve
from distar.rewards.preprocess import clip_preprocess

SAVERS = {
    "image_reward": tiny_sd.save_image_reward_dir,
    "pickscore": tiny_sd.save_pickscore_dir,
    "clip_score": tiny_sd.save_open_clip_dir,
    "aesthetic": tiny_sd.save_aesthetic_dir,
    "hpsv2": tiny_sd.save_hpsv2_dir,
}
TEXT_CONDITIONED = {"image_reward", "pickscore", "clip_score", "hpsv2"}


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rewards")
    return {name: save(root / name) for name, save in SAVERS.items()}


def _build(name, path):
    return resolve(REWARDS, name, "reward")(None if path is None else str(path), "cpu")


@pytest.mark.parametrize("name", sorted(SAVERS))
def test_reward_gradient_matches_finite_differences(reward_dirs, name):
    r = _build(name, reward_dirs[name])
    assert all(not p.requires_grad for p in r.parameters())
    prompts = ["a photo of a cat", "a red house"]
    x = 0.2 + 0.6 * torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(0))  # resized inside
    out = r(x, prompts)
    assert out.shape == (2,) and torch.isfinite(out).all()
    r = r.double()
    if name == "pickscore":  # transformers' CLIP text mask overflows in float64; the text side has no image grad
        r.model.text_model.float()
        r.model.text_projection.float()
    x = x.double().requires_grad_(True)
    grad = torch.autograd.grad(r(x, prompts).sum(), x)[0]
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in r.parameters())
    for seed in (1, 2):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        h = 1e-4
        with torch.no_grad():
            fd = (r(x + h * v, prompts).sum() - r(x - h * v, prompts).sum()) / (2 * h)
        ad = (grad * v).sum()
        assert torch.isclose(fd, ad, rtol=1e-5, atol=1e-9 * grad.abs().sum()), (name, fd.item(), ad.item())


@pytest.mark.parametrize("name", sorted(TEXT_CONDITIONED))
def test_reward_depends_on_the_prompt(reward_dirs, name):
    r = _build(name, reward_dirs[name])
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    s = r(x, ["a photo of a cat", "the blue painting of a house"])
    assert not torch.isclose(s[0], s[1], rtol=1e-6, atol=1e-7)


def _smooth_image(h, w, seed):
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(np.random.RandomState(seed).rand(h, w, 3) * 255, (2 * h / 64, 2 * w / 64, 0))
    return ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("hw", [(512, 512), (300, 400), (1024, 768)])
def test_torch_preprocessing_matches_pil_pipelines(hw):
    """Same tensors as ImageReward's torchvision transform and transformers' CLIPImageProcessor (up to uint8 rounding)."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    img = _smooth_image(*hw, seed=hw[1])
    ours = clip_preprocess(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, 224)[0]
    ir = importlib.import_module("ImageReward.ImageReward")._transform(224)(Image.fromarray(img))
    hf = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})(
        Image.fromarray(img), return_tensors="pt").pixel_values[0]
    for ref in (ir, hf):
        assert ref.shape == ours.shape
        assert (ref - ours).abs().mean() < 0.01 and (ref - ours).abs().max() < 0.1


def test_image_reward_network_is_the_packages_architecture(tmp_path):
    """With the default ViT-L and BLIP's real med_config, our construction has exactly ImageReward-v1.0's weights."""
    from unittest import mock

    from accelerate import init_empty_weights

    from distar.rewards.image_reward import VIT_LARGE, blip_tokenizer, build_network

    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
           "encoder_width": 768, "add_cross_attention": True}  # BLIP's med_config.json
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    tok = blip_tokenizer(str(tiny_sd.save_image_reward_dir(tmp_path / "tiny") / "tokenizer"))
    package = importlib.import_module("ImageReward.ImageReward")
    with init_empty_weights():
        ours = build_network(str(tmp_path / "med_config.json"), VIT_LARGE, tok)
        with mock.patch("ImageReward.models.BLIP.blip_pretrain.init_tokenizer", lambda: tok):
            theirs = package.ImageReward(str(tmp_path / "med_config.json"))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert type(ours).score_gard is package.ImageReward.score_gard


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", sorted(SAVERS))
def test_wrong_path_names_the_argument(tmp_path, name):
    with pytest.raises(ValueError, match=rf"{name} path=.*no_such"):
        _build(name, tmp_path / "no_such")


def test_missing_files_and_mismatched_weights(reward_dirs, tmp_path):
    import shutil

    d = tmp_path / "ir"
    shutil.copytree(reward_dirs["image_reward"], d)
    (d / "med_config.json").unlink()
    with pytest.raises(ValueError, match=r"image_reward path=.*missing med_config\.json"):
        _build("image_reward", d)
    shutil.copy(reward_dirs["image_reward"] / "med_config.json", d)
    (d / "vision_config.json").write_text(json.dumps({"image_size": 32, "patch_size": 8, "embed_dim": 48,
                                                      "depth": 2, "num_heads": 2}))
    with pytest.raises(ValueError, match=r"does not fit the ImageReward architecture"):
        _build("image_reward", d)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"clip_score path=.*no open_clip_config\.json"):
        _build("clip_score", empty)
    with pytest.raises(ValueError, match=r"pickscore path=.*saved CLIPModel"):
        _build("pickscore", empty)
    with pytest.raises(ValueError, match=r"hpsv2 path=.*none of"):
        _build("hpsv2", empty)
    with pytest.raises(ValueError, match=r"clip_score path='nonsense'.*expected an open_clip spec"):
        _build("clip_score", "nonsense")
    with pytest.raises(ValueError, match=r"unknown open_clip architecture 'NoSuchArch'"):
        _build("clip_score", "NoSuchArch:openai")

    a = tmp_path / "aes"
    shutil.copytree(reward_dirs["aesthetic"], a)
    from distar.rewards.aesthetic import AestheticHead

    torch.save(AestheticHead(32).state_dict(), a / "aesthetic_head.pth")  # head for 32-dim embeddings, CLIP gives 16
    with pytest.raises(ValueError, match=r"head expects 32-dim embeddings but the CLIP backbone gives 16"):
        _build("aesthetic", a)

    h = tmp_path / "hps"
    shutil.copytree(reward_dirs["hpsv2"], h)
    cfg = json.loads((h / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["width"] = 48
    (h / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"hpsv2 path=.*does not fit"):
        _build("hpsv2", h)
