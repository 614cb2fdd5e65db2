"""The precision trap (issue 11): a bf16 reference beside a float32 fake score must not show a score gap.

With the fake an exact copy of the reference and CFG 1, e_fake = e_ref, so the logged ||e_fake - e_ref|| must be ~0
relative to c. Were the two networks evaluated at different precisions, rounding alone would give a gap that grows
like sqrt(D) over the latent: on 4x128x128 (SDXL's 65,536 dims) it could reach c and push the generator along
rounding noise. The tiny UNets here have SDXL's latent size (resolution 256 through a factor-2 VAE) and a few
channels, with the calibration of the shipped configs: sdxl_dmd2 (bf16 autocast, c 0.25 per_dim, score weighting)
and sd15 (no autocast, c 1 per sample) -- both with model.dtype=bfloat16 and float32 trained nets.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd

from distar.config import LossConfig
from distar.train_step import generator_loss

PROMPTS = ["a photo of a cat", "a red house on a hill"]
# attention only at the 32x32 level (1,024 tokens) keeps a 128x128 latent fast on one CPU thread
TINY_UNET = dict(block_out_channels=(8, 8, 16), down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
SHIPPED = {  # (world, train.mixed_precision, loss): the settings of distar/configs/sdxl_dmd2.yaml and sd15.yaml
    "sdxl_dmd2": ("sdxl", "bf16", LossConfig(c=0.25, c_scale="per_dim", weighting="score", t_min=20, t_max=980)),
    "sd15": ("sd15", "no", LossConfig(c=1.0, weighting="uniform", t_min=20, t_max=980)),
}


@pytest.fixture(scope="module")
def wide_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide_latent")
    return {"sdxl": tiny_sd.save_sdxl(root, unet_kw=TINY_UNET), "sd15": tiny_sd.save_sd15(root, unet_kw=TINY_UNET)}


@pytest.mark.parametrize("shipped", sorted(SHIPPED))
def test_bf16_reference_and_its_float32_copy_show_no_score_gap_and_no_gradient(wide_pipelines, one_thread, shipped):
    """Before the fix: sd15's setting logged gap / c = 0.64 at t=20 (0.74 at t=500); sdxl_dmd2's logged 0 but its
    generator gradient was 8.4 instead of 0 (bf16 vs float32 norm weights in the backward to x_t)."""
    world, mixed_precision, loss = SHIPPED[shipped]
    b = tiny_sd.build(world, wide_pipelines[world], guidance_scale=1.0, dtype="bfloat16", resolution=256)
    assert b.latent_shape == (4, 128, 128)
    assert next(b.reference.parameters()).dtype == torch.bfloat16          # the trap's premise: mixed dtypes
    assert all(p.dtype == torch.float32 for p in b.fake_score.parameters())
    b.fake_score.requires_grad_(False)  # as generator_update freezes it
    rng = torch.Generator().manual_seed(0)
    cond = b.encode_prompts(PROMPTS)
    for t in (loss.t_min, 500):  # t_min: the smallest c_t of the score weighting
        cfg = loss.model_copy(update={"t_min": t, "t_max": t})
        b.generator.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            total, m = generator_loss(b, b.generator, b.fake_score, cond, PROMPTS, cfg, None, rng)
        gap, c_eff, ratio = float(m["gen/score_gap"]), float(m["gen/c_eff"]), float(m["gen/gap_over_c"])
        assert ratio < 1e-3 and gap < 1e-3 * c_eff, (shipped, t, gap, c_eff, ratio)
        total.backward()  # fake = reference: the divergence pushes the generator nowhere
        grads = [p.grad.float() for p in b.generator.parameters() if p.grad is not None]
        assert grads, "the divergence did not reach the generator"
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        assert norm < 1e-4, (shipped, t, norm)
