"""Clear errors for wrong paths, missing components and mismatched architectures (no hub access)."""
from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd
build, pipeline_dirs = tiny_sd.build, tiny_sd.pipeline_dirs  # pipeline_dirs: a fixture

from distar.worlds.sd.loading import SDLoadError


def test_wrong_reference_path(tmp_path):
    with pytest.raises(SDLoadError, match=r"model\.reference=.*no_such_dir.*not a diffusers pipeline"):
        build("sd15", tmp_path / "no_such_dir")


def test_missing_component(pipeline_dirs, tmp_path):
    broken = tmp_path / "sd15_no_vae"
    shutil.copytree(pipeline_dirs["sd15"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(SDLoadError, match=r"model\.reference=.*missing component 'vae'"):
        build("sd15", broken)


def test_world_does_not_match_pipeline(pipeline_dirs):
    with pytest.raises(SDLoadError, match=r"world='sdxl'.*no text_encoder_2"):
        build("sdxl", pipeline_dirs["sd15"])
    with pytest.raises(SDLoadError, match=r"world='sd15'.*has text_encoder_2"):
        build("sd15", pipeline_dirs["sdxl"])


def test_state_dict_of_another_unet(pipeline_dirs, tmp_path):
    f = tmp_path / "other_unet.bin"
    torch.save(tiny_sd.tiny_unet(True, block_out_channels=(16, 48)).state_dict(), f)
    with pytest.raises(SDLoadError, match=r"model\.generator=.*do not match the reference UNet.*shape mismatches"):
        build("sdxl", pipeline_dirs["sdxl"], generator=str(f))
    torch.save(tiny_sd.tiny_unet(False).state_dict(), f)  # an SD1.5-style UNet for an SDXL reference
    with pytest.raises(SDLoadError, match=r"missing keys.*add_embedding"):
        build("sdxl", pipeline_dirs["sdxl"], generator=str(f))


def test_generator_folder_of_another_architecture(pipeline_dirs, tmp_path):
    tiny_sd.tiny_unet(False, cross_attention_dim=24).save_pretrained(tmp_path / "unet")
    with pytest.raises(SDLoadError, match=r"model\.generator=.*do not match"):
        build("sd15", pipeline_dirs["sd15"], generator=str(tmp_path / "unet"))


def test_missing_generator_file_and_path(pipeline_dirs, tmp_path):
    with pytest.raises(SDLoadError, match=r"model\.generator_file='nope\.bin': no such file"):
        build("sd15", pipeline_dirs["sd15"], generator=str(tmp_path), generator_file="nope.bin")
    with pytest.raises(SDLoadError, match=r"model\.generator=.*missing\.safetensors.*no such file"):
        build("sd15", pipeline_dirs["sd15"], generator=str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(SDLoadError, match=r"not a readable torch state dict"):
        build("sd15", pipeline_dirs["sd15"], generator=str(tmp_path / "junk.bin"))
