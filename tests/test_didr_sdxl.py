"""DIDR on SDXL: the sdxl_didr config, one DIDR step on a tiny SDXL (proxy through CFG reference and VAE), and
a stand-in for the authors' released UNet loading through model.generator_file (the real file needs the hub)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd
build, pipeline_dirs = tiny_sd.build, tiny_sd.pipeline_dirs  # pipeline_dirs: a fixture

from distar.cli import main
from distar.config import load_config
from distar.ema import EMA
from distar.rewards.base import LocalRewardClient, WeightedReward
from distar.registry import REWARDS, WORLDS, resolve
from distar.train_step import TrainState, build_optimizer, train_step


def test_sdxl_didr_config_prints_and_differs_from_di_star_only_in_the_loss(capsys):
    assert main(["train", "--config", "sdxl_didr", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    loss = printed["loss"]
    assert (loss["reward_mode"], loss["divergence"], loss["drp_steps"], loss["beta"], loss["drp_checkpoint"]) == \
        ("diffused", "kl", 2, 0.01, True)
    didr, dmd2 = load_config("sdxl_didr"), load_config("sdxl_dmd2")
    assert didr.model == dmd2.model and didr.reward == dmd2.reward and didr.ray == dmd2.ray
    assert didr.train.model_copy(update={"out_dir": "x"}) == dmd2.train.model_copy(update={"out_dir": "x"})


def test_didr_step_on_tiny_sdxl_trains_only_generator_and_fake(pipeline_dirs, tmp_path, one_thread):
    b = build("sdxl", pipeline_dirs["sdxl"], guidance_scale=3.0)
    aes = resolve(REWARDS, "aesthetic", "reward")(str(tiny_sd.save_aesthetic_dir(tmp_path / "aes")), "cpu")
    reward = WeightedReward([("aesthetic", 1.0, aes)])
    state = TrainState(bundle=b, generator=b.generator, fake_score=b.fake_score,
                       generator_opt=build_optimizer(b.generator, 1e-3, (0.9, 0.999), 0.01),
                       fake_opt=build_optimizer(b.fake_score, 1e-3, (0.9, 0.999), 0.01), ema=EMA(b.generator, 0.9))
    frozen = list(b.frozen_modules()) + [reward]
    before = [p.detach().clone() for m in frozen for p in m.parameters()]
    loss_cfg = load_config("sdxl_didr", ["loss.t_min=300", "loss.t_max=700"]).loss   # K = 2, checkpointed
    m = train_step(state, ["a photo of a cat", "a red house on a hill"], loss_cfg, fake_steps=1, grad_clip=10.0,
                   reward=LocalRewardClient(reward), rng=torch.Generator().manual_seed(0))
    for k in ("gen/div_loss", "gen/target_gap", "reward/drp_total", "reward/drp_aesthetic", "gen/grad_norm"):
        assert torch.isfinite(m[k]).all(), k
    assert m["reward/drp_score_norm"] > 0 and m["gen/grad_norm"] > 0 and "reward/total" not in m
    assert all(p.grad is None for mod in frozen for p in mod.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, [p.detach() for mod in frozen for p in mod.parameters()]))


def test_released_didr_unet_stand_in_loads_through_generator_file(pipeline_dirs, tmp_path):
    """A bare SDXL UNet state dict (fp16 safetensors), as DMD2's: what `model.generator_file` loads for evaluation
    and serving. The stand-in has the tiny SDXL UNet's keys; the real Junyi-W/DIDR file cannot be fetched here."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    sd = {k: v.half().contiguous() for k, v in tiny_sd.tiny_unet(True).state_dict().items()}
    save_file(sd, str(tmp_path / "didr_sdxl_unet_fp16.safetensors"))
    cfg = load_config("sdxl_didr", [f"model.reference={pipeline_dirs['sdxl']}", f"model.generator={tmp_path}",
                                    "model.generator_file=didr_sdxl_unet_fp16.safetensors", "model.dtype=float32",
                                    "model.resolution=null"])
    b = resolve(WORLDS, "sdxl", "world")(cfg.model, "cpu")             # as the loop, evaluation and serving build it
    got = b.generator.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], v.float()) for k, v in sd.items())
    assert not torch.equal(got["conv_in.weight"], b.fake_score.state_dict()["conv_in.weight"])  # not the reference
