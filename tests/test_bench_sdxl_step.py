"""jobs/bench_sdxl_step.py at its tiny CPU size: it runs distar's real train_step and reports finite numbers."""
from __future__ import annotations

import math

import pytest
import torch

from jobs.bench_sdxl_step import SDXL_UNET, SDXL_VAE, count_flops, main


def _check(r: dict, batch: int) -> None:
    assert r["batch"] == batch and r["size"] == "tiny"
    for k in ("seconds_per_step", "images_per_s", "F_tflop", "model_tflop_per_image", "achieved_tflops",
              "frac_peak", "frac_matmul_ceiling", "raw_fwd_tflops", "raw_fwd_bwd_tflops", "step_vs_raw_fwd_bwd"):
        assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert r["model_tflop_per_image"] == pytest.approx((9 + 3 * r["fake_steps"]) * r["F_tflop"])
    assert r["images_per_s"] == pytest.approx(batch / r["seconds_per_step"])
    assert r["metrics"]["reward/total"] == r["metrics"]["reward/conv"]  # the reward path ran
    assert all(math.isfinite(v) for v in r["metrics"].values()), r["metrics"]


def test_tiny_full_finetune_fp32(one_thread, capsys):
    r = main(["--size", "tiny", "--steps", "1", "--warmup", "0"])
    _check(r, batch=2)
    assert r["lora_rank"] == 0 and r["precision"] == "fp32" and not r["grad_ckpt"]
    out = capsys.readouterr().out
    assert "images/s" in out and "TFLOP/s" in out and "raw UNet" in out


@pytest.mark.slow
def test_tiny_lora_bf16_autocast_checkpointing(one_thread, tmp_path):
    out = tmp_path / "r.json"
    r = main(["--size", "tiny", "--steps", "1", "--warmup", "0", "--lora-rank", "4", "--precision", "bf16",
              "--grad-ckpt", "--fake-steps", "2", "--json", str(out)])
    _check(r, batch=2)
    assert out.is_file() and '"achieved_tflops"' in out.read_text()


@pytest.mark.slow
def test_sdxl_configs_match_the_published_model():
    """Meta-device count (no memory, no weights): SDXL-base's UNet size and docs/algorithm.md's F at 1024 px."""
    fl = count_flops(SDXL_UNET, SDXL_VAE, 1024, (77, 2048, 1280), with_vae=False)
    assert fl["unet_params"] == 2_567_463_684
    assert fl["vae_params"] == 83_653_863
    assert fl["F"] / 1e12 == pytest.approx(6.76, abs=0.01)
    assert fl["unet_fwd_bwd"] / fl["F"] == pytest.approx(3.0, abs=0.02)


def test_tiny_fsdp_one_rank_lora_bf16(one_thread, monkeypatch):
    """--fsdp: reference, generator and fake score sharded with FSDP2 (bf16 policy) on a one-rank gloo group; the
    step runs, the nets really are FSDP modules, and the process group is gone afterwards."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    import jobs.bench_sdxl_step as bench

    built, build = {}, bench.build
    monkeypatch.setattr(bench, "build", lambda *a, **kw: built.setdefault("bundle", build(*a, **kw)))
    r = main(["--size", "tiny", "--steps", "1", "--warmup", "0", "--lora-rank", "4", "--precision", "bf16", "--fsdp"])
    _check(r, batch=2)
    b = built["bundle"]
    assert r["fsdp"] and all(isinstance(m, FSDPModule) for m in (b.reference, b.generator, b.fake_score))
    assert not dist.is_initialized()
