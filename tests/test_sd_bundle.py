"""Tiny SD1.5 / SDXL bundles loaded through production code, checked against diffusers' own pipelines."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd
build, pipeline_dirs = tiny_sd.build, tiny_sd.pipeline_dirs  # pipeline_dirs: a fixture

from distar import diffusion
from distar.bundle import ModelBundle
from distar.schedules import sd_alphas_cumprod

PROMPTS = ["a photo of a cat", "a red house on a hill"]


def _diffusers_pipe(path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path))


@pytest.mark.parametrize("world", ["sd15", "sdxl"])
def test_bundle_matches_diffusers_conditioning_cfg_and_generator_rule(pipeline_dirs, world):
    b = build(world, pipeline_dirs[world], guidance_scale=4.0)
    assert isinstance(b, ModelBundle)
    pipe = _diffusers_pipe(pipeline_dirs[world])
    assert torch.allclose(b.alphas_cumprod, sd_alphas_cumprod())
    cond = b.encode_prompts(PROMPTS)
    with torch.no_grad():
        if world == "sdxl":
            pe, npe, ppe, nppe = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
            time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            assert torch.equal(cond.pooled, ppe) and torch.equal(cond.null_pooled, nppe)
            assert torch.equal(cond.time_ids, time_ids.expand(2, -1))
            assert torch.count_nonzero(npe) == 0  # force_zeros_for_empty_prompt, as SDXL-base's pipeline
            added = lambda p: {"text_embeds": p, "time_ids": time_ids.expand(2, -1)}  # noqa: E731
        else:
            pe, npe = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=True)
            ppe = nppe = None
            added = lambda p: None  # noqa: E731
        assert torch.equal(cond.text, pe) and torch.equal(cond.null_text, npe)
        assert not torch.allclose(cond.text[0], cond.text[1])

        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([50, 700])
        e_c = pipe.unet(x, t, encoder_hidden_states=pe, added_cond_kwargs=added(ppe)).sample
        e_u = pipe.unet(x, t, encoder_hidden_states=npe, added_cond_kwargs=added(nppe)).sample
        assert torch.allclose(b.eps_ref(x, t, cond), e_u + 4.0 * (e_c - e_u), atol=1e-5)
        assert torch.allclose(b.eps_fake(b.fake_score, x, t, cond), e_c, atol=1e-5)  # fake = copy of reference

        z = b.sample_noise(2, torch.Generator().manual_seed(3))
        assert z.shape == (2, 4, 8, 8)
        tau = torch.full((2,), 399)
        eps = pipe.unet(z, tau, encoder_hidden_states=pe, added_cond_kwargs=added(ppe)).sample
        abar = sd_alphas_cumprod()[399]
        assert torch.allclose(b.generate(b.generator, z, cond), (z - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-4)


@pytest.mark.parametrize("world", ["sd15", "sdxl"])
def test_decode_is_differentiable_vae_decode_in_unit_range(pipeline_dirs, world):
    b = build(world, pipeline_dirs[world])
    x0 = (2 * torch.randn(2, 4, 8, 8)).requires_grad_(True)
    img = b.decode(x0)
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    with torch.no_grad():  # diffusers' own decode: latents / scaling_factor, then (x / 2 + 0.5).clamp(0, 1)
        ref = (b.vae.decode(x0 / b.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(img, ref, atol=1e-6)
    img.mean().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(not p.requires_grad for m in b.frozen_modules() for p in m.parameters())
    assert {id(m) for m in b.frozen_modules()} >= {id(b.reference), id(b.vae)}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in b.generator.parameters())


def test_sample_grid_and_training_prompts(pipeline_dirs):
    b = build("sdxl", pipeline_dirs["sdxl"])
    prompts = b.training_prompts()
    assert len(prompts) >= 8 and all(isinstance(p, str) and p for p in prompts)
    g1 = b.sample_grid(b.generator, prompts[:3], torch.Generator().manual_seed(0))
    g2 = b.sample_grid(b.generator, prompts[:3], torch.Generator().manual_seed(0))
    assert g1.shape == (3, 3, 16, 16) and torch.equal(g1, g2) and not g1.requires_grad


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_generator_from_state_dict_file(pipeline_dirs, tmp_path, suffix):
    """A DMD2-style bare UNet state dict (fp16, as DMD2 ships) becomes the float32 generator."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(7)
    other = tiny_sd.tiny_unet(True)
    sd = {k: v.half() for k, v in other.state_dict().items()}
    f = tmp_path / f"dmd2_tiny_unet_fp16{suffix}"
    if suffix == ".bin":
        torch.save(sd, f)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(f))
    b = build("sdxl", pipeline_dirs["sdxl"], generator=str(f))
    got = b.generator.state_dict()
    assert all(torch.equal(got[k], v.float()) for k, v in sd.items())
    ref = UNet2DConditionModel.from_pretrained(str(pipeline_dirs["sdxl"]), subfolder="unet").state_dict()
    assert not torch.equal(got["conv_in.weight"], ref["conv_in.weight"])  # not silently the reference
    assert torch.equal(b.fake_score.state_dict()["conv_in.weight"], ref["conv_in.weight"])  # fake = reference
    # the same file found inside a directory through generator_file
    b2 = build("sdxl", pipeline_dirs["sdxl"], generator=str(tmp_path), generator_file=f.name)
    assert torch.equal(b2.generator.state_dict()["conv_in.weight"], got["conv_in.weight"])


def test_generator_from_diffusers_unet_folder(pipeline_dirs, tmp_path):
    torch.manual_seed(11)
    unet = tiny_sd.tiny_unet(False)
    unet.save_pretrained(tmp_path / "gen" / "unet")
    b = build("sd15", pipeline_dirs["sd15"], generator=str(tmp_path / "gen"), generator_subfolder="unet")
    assert torch.equal(b.generator.state_dict()["conv_in.weight"], unet.state_dict()["conv_in.weight"])


def test_lora_trains_only_adapters_and_starts_at_the_base(pipeline_dirs):
    full = build("sd15", pipeline_dirs["sd15"])
    b = build("sd15", pipeline_dirs["sd15"], lora_rank=4, dtype="bfloat16")
    trainable = [n for n, p in b.generator.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in b.generator.named_parameters() if "lora_" in n)
    assert b.reference.dtype == torch.bfloat16 and b.vae.dtype == torch.bfloat16
    assert all("lora_" in n for n, p in b.fake_score.named_parameters() if p.requires_grad)
    cond, cond_full = b.encode_prompts(PROMPTS), full.encode_prompts(PROMPTS)
    z = b.sample_noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():  # LoRA B = 0 at init: same x0 as the full model, up to the bf16 base
        x_lora, x_full = b.generate(b.generator, z, cond), full.generate(full.generator, z, cond_full)
    assert x_lora.dtype == torch.float32
    assert torch.allclose(x_lora, x_full, atol=0.05 * x_full.abs().max().item())


def test_gradient_checkpointing_gives_the_same_gradient(pipeline_dirs):
    grads = []
    for gc in (False, True):
        b = build("sdxl", pipeline_dirs["sdxl"], gradient_checkpointing=gc)
        assert b.generator.is_gradient_checkpointing == gc
        cond = b.encode_prompts(PROMPTS)
        x0 = b.generate(b.generator, b.sample_noise(2, torch.Generator().manual_seed(0)), cond)
        t = torch.tensor([100, 800])
        b.eps_ref(diffusion.add_noise(x0, torch.ones_like(x0), *diffusion.alpha_sigma(b.alphas_cumprod, t)), t,
                  cond).pow(2).sum().backward()
        grads.append(b.generator.conv_in.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
