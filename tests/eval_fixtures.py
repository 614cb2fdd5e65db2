"""Tiny offline fixtures for the prompt-file evaluation tests: an SD1.5 pipeline, a one-step checkpoint
trained from it for two steps, and the four paper rewards, all random-init and saved to disk."""
from __future__ import annotations

from pathlib import Path

import torch

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd

REWARD_SAVERS = {"image_reward": tiny_sd.save_image_reward_dir, "aesthetic": tiny_sd.save_aesthetic_dir,
                 "pickscore": tiny_sd.save_pickscore_dir, "clip_score": tiny_sd.save_open_clip_dir}


def save_onestep_checkpoint(pipeline: Path, out: Path, train_steps: int = 1) -> Path:
    """A `distar train`-style checkpoint dir (config.yaml + generator.safetensors) of a tiny SD1.5 generator."""
    from distar.checkpoint import save_generator_dir
    from distar.config import LossConfig, dump_config, load_config
    from distar.ema import EMA
    from distar.train_step import TrainState, build_optimizer, train_step

    cfg = load_config("sd15", [f"model.reference={pipeline}", "model.dtype=float32", "model.resolution=null",
                               "model.gradient_checkpointing=false"])
    b = tiny_sd.build("sd15", pipeline, conditioning_timestep=999)
    state = TrainState(bundle=b, generator=b.generator, fake_score=b.fake_score,
                       generator_opt=build_optimizer(b.generator, 1e-2, (0.9, 0.999), 0.0),
                       fake_opt=build_optimizer(b.fake_score, 1e-3, (0.9, 0.999), 0.0), ema=EMA(b.generator, 0.5))
    for s in range(train_steps):
        train_step(state, ["a photo of a cat", "a dog"], LossConfig(c=1.0), fake_steps=1, grad_clip=10.0,
                   reward=None, rng=torch.Generator().manual_seed(s))
    return save_generator_dir(out, b.generator.state_dict(), dump_config(cfg), {"step": train_steps})


def build_all(root: Path) -> dict[str, Path]:
    root = Path(root)
    sd15 = tiny_sd.save_sd15(root)
    out = {"sd15": sd15, "onestep": save_onestep_checkpoint(sd15, root / "onestep")}
    out.update({name: save(root / name) for name, save in REWARD_SAVERS.items()})
    return out


if __name__ == "__main__":
    import sys

    print(build_all(Path(sys.argv[1])))
