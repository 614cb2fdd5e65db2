"""The cluster configs for SDXL (DMD2 init) and SD1.5 validate and carry the settings docs/algorithm.md reports."""
from __future__ import annotations

import pytest

from distar.config import ConfigError, StableDiffusionModel, load_config
from distar.registry import REWARDS


@pytest.mark.parametrize("name", ["sdxl_dmd2", "sdxl_dmd2_lora", "sd15"])
def test_sd_configs_validate(name):
    cfg = load_config(name)
    assert isinstance(cfg.model, StableDiffusionModel) and cfg.model.world == name[:4]
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert cfg.loss.alpha_rew == 100 and (cfg.loss.t_min, cfg.loss.t_max) == (20, 980)
    assert {t.name for t in cfg.reward.terms} == {"image_reward", "pickscore", "clip_score", "aesthetic"}
    assert all(t.name in REWARDS for t in cfg.reward.terms)
    assert cfg.train.grad_clip == 10


@pytest.mark.parametrize("name", ["sdxl_dmd2", "sdxl_dmd2_lora", "sd15", "sdxl_didr"])
def test_sd_configs_track_to_the_environments_mlflow_and_register(name, monkeypatch, tmp_path):
    from distar.tracking import tracking_uri

    mlf = load_config(name).mlflow
    assert mlf.enabled and mlf.tracking_uri is None and mlf.registered_model and mlf.alias == "champion"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://distar-mlflow:5000")
    assert tracking_uri(mlf) == "http://distar-mlflow:5000"


def test_sdxl_dmd2_settings():
    cfg = load_config("sdxl_dmd2")
    m = cfg.model
    assert (m.reference, m.generator, m.generator_file) == (
        "stabilityai/stable-diffusion-xl-base-1.0", "tianweiy/DMD2", "dmd2_sdxl_1step_unet_fp16.bin")
    assert m.guidance_scale == 7.5 and m.conditioning_timestep == 399 and m.lora_rank == 0
    for opt in (cfg.train.generator_optim, cfg.train.fake_optim):
        assert opt.lr == 5e-7 and opt.betas == (0.9, 0.999) and opt.weight_decay == 0.01
    assert cfg.train.fake_steps == 5 and cfg.train.batch_size == 2


def test_sdxl_cluster_settings():
    """FSDP full fine-tuning in bf16 with rewards on Serve at fractional GPUs, a fake warm-up, per_dim c with the
    score weighting (docs/algorithm.md); the LoRA config the same run as adapters under DDP."""
    cfg = load_config("sdxl_dmd2")
    assert (cfg.ray.strategy, cfg.train.mixed_precision, cfg.model.gradient_checkpointing) == ("fsdp", "bf16", True)
    assert cfg.reward.backend == "serve" and 0 < cfg.reward.replica_gpus < 1 and cfg.train.fake_warmup_steps > 0
    assert (cfg.loss.c_scale, cfg.loss.weighting, cfg.loss.c) == ("per_dim", "score", 0.25)
    need = cfg.ray.num_workers * cfg.ray.gpus_per_worker + len(cfg.reward.terms) * cfg.reward.replica_gpus
    assert need <= cfg.ray.num_workers  # workers and reward replicas share the 8 GPUs of the target
    lora = load_config("sdxl_dmd2_lora")
    assert lora.model.lora_rank > 0 and lora.ray.strategy == "ddp" and lora.ray.gpu_mem_gb < cfg.ray.gpu_mem_gb
    assert lora.loss == cfg.loss and lora.reward == cfg.reward


def test_parti_is_refused_as_training_prompts(tmp_path):
    for value in ("parti", str(tmp_path / "PartiPrompts.tsv")):
        with pytest.raises(ConfigError, match=r"prompts_file=.*evaluation set"):
            load_config("sdxl_dmd2", [f"prompts_file={value}"])
    assert load_config("sdxl_dmd2", [f"prompts_file={tmp_path / 'laion_aesthetic.txt'}"]).prompts_file


def test_overrides_and_bad_values():
    assert load_config("sdxl_dmd2", ["model.lora_rank=16"]).model.lora_rank == 16
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_config("sdxl_dmd2", ["model.dtype=int8"])
    with pytest.raises(ConfigError, match=r"model\.generator_flie"):
        load_config("sdxl_dmd2", ["model.generator_flie=x.bin"])
