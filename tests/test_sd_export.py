"""Export round trip: train a few steps, export as a diffusers pipeline, reload, same image for the same seed."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd
build, pipeline_dirs = tiny_sd.build, tiny_sd.pipeline_dirs  # pipeline_dirs: a fixture

from distar.config import LossConfig
from distar.ema import EMA
from distar.worlds.sd.export import export_one_step_pipeline
from distar.train_step import TrainState, build_optimizer, train_step


@pytest.mark.parametrize("world,lora", [("sd15", 0), ("sdxl", 4)])
def test_export_round_trip_same_image(pipeline_dirs, tmp_path, world, lora):
    from diffusers import DiffusionPipeline, LCMScheduler

    b = build(world, pipeline_dirs[world], lora_rank=lora)
    state = TrainState(bundle=b, generator=b.generator, fake_score=b.fake_score,
                       generator_opt=build_optimizer(b.generator, 1e-2, (0.9, 0.999), 0.0),
                       fake_opt=build_optimizer(b.fake_score, 1e-3, (0.9, 0.999), 0.0), ema=EMA(b.generator, 0.5))
    base = {k: v.clone() for k, v in tiny_sd_merged(b).items()}
    for s in range(2):
        train_step(state, ["a photo of a cat", "a dog"], LossConfig(c=1.0), fake_steps=1, grad_clip=10.0,
                   reward=None, rng=torch.Generator().manual_seed(s))
    trained = tiny_sd_merged(b)
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the export below carries trained weights

    out = export_one_step_pipeline(b, state.generator, tmp_path / "export")
    meta = json.loads((out / "distar_one_step.json").read_text())
    assert meta["timesteps"] == [399]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, LCMScheduler) and not pipe.scheduler.config.clip_sample
    assert "lora" not in " ".join(pipe.unet.state_dict())
    prompt = "a watercolor painting of a lighthouse"
    ours = b.sample_grid(b.generator, [prompt], torch.Generator().manual_seed(42))
    theirs = pipe(prompt, num_inference_steps=1, guidance_scale=0.0, timesteps=meta["timesteps"],
                  height=b.resolution, width=b.resolution, generator=torch.Generator().manual_seed(42),
                  output_type="pt").images
    assert theirs.shape == ours.shape
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
    other = pipe(prompt, num_inference_steps=1, guidance_scale=0.0, timesteps=[399], height=b.resolution,
                 width=b.resolution, generator=torch.Generator().manual_seed(43), output_type="pt").images
    assert not torch.allclose(other, ours, atol=1e-4)  # the comparison is sensitive to the noise


def tiny_sd_merged(b):
    from distar.worlds.sd.loading import merged_unet

    return merged_unet(b.generator).state_dict()
