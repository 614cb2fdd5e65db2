"""The sharded build of the SD worlds (distar/worlds/sd/sharded_build.py, what `ray.strategy=fsdp` uses): UNets made
on the meta device, sharded, then filled slice by slice from the weights files must hold exactly the state that
`build_bundle` followed by sharding holds, on two gloo ranks, and train the same."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd

from distar.worlds.sd.loading import SDLoadError
from distar.worlds.sd.sharded_build import build_sharded_bundle

from .gloo import run_group

WORLD = 2
CPU = torch.device("cpu")
PARTS = ("reference", "generator", "fake_score")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Tiny SD1.5 and SDXL pipelines, the SDXL one again with its UNet in the sharded safetensors form, and a
    DMD2-style generator file (another SDXL UNet's state dict in fp16, torch.save'd)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("meta_build")
    out = {"sd15": tiny_sd.save_sd15(root), "sdxl": tiny_sd.save_sdxl(root)}
    out["sdxl_index"] = root / "sdxl_index"
    shutil.copytree(out["sdxl"], out["sdxl_index"])
    shutil.rmtree(out["sdxl_index"] / "unet")
    UNet2DConditionModel.from_pretrained(out["sdxl"] / "unet").save_pretrained(out["sdxl_index"] / "unet",
                                                                              max_shard_size="100KB")
    assert len(list((out["sdxl_index"] / "unet").glob("*.safetensors"))) > 2
    torch.manual_seed(7)
    out["dmd2"] = root / "dmd2_tiny_unet_fp16.bin"
    torch.save({k: v.half() for k, v in tiny_sd.tiny_unet(True).state_dict().items()}, out["dmd2"])
    return {k: str(v) for k, v in out.items()}


def _config(sources: dict[str, str], world: str, ref: str, mixed_precision: str = "no", generator=None, **model):
    from distar.config import LossConfig, RunConfig, StableDiffusionModel, TrainConfig

    m = StableDiffusionModel(world=world, reference=sources[ref], generator=generator and sources[generator],
                             guidance_scale=3.0, **model)
    return RunConfig(model=m, loss=LossConfig(alpha_rew=0.0),
                     train=TrainConfig(batch_size=2, fake_steps=1, mixed_precision=mixed_precision))


CASES = {  # float32 and bfloat16 model.dtype; generator None (a copy) and a DMD2 file; full fine-tuning and LoRA
    "sdxl_fp32_copy_full": dict(world="sdxl", ref="sdxl"),
    "sdxl_bf16_dmd2_full": dict(world="sdxl", ref="sdxl", dtype="bfloat16", generator="dmd2", mixed_precision="bf16"),
    # LoRA ranks 3 and 1 over 2 ranks: lora_A's rows split unevenly (2 + 1), and rank 1 holds none of a rank-1 A
    "sd15_bf16_copy_lora": dict(world="sd15", ref="sd15", dtype="bfloat16", lora_rank=3),
    "sdxl_index_fp32_dmd2_lora_ckpt": dict(world="sdxl", ref="sdxl_index", generator="dmd2", lora_rank=1,
                                           gradient_checkpointing=True),
}
GATHERED = "sdxl_bf16_dmd2_full"              # full tensors gathered, as a checkpoint would, in this case
STEPPED = ("sdxl_bf16_dmd2_full", "sd15_bf16_copy_lora")  # a training step on both builds in these


def _full(net) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what) -> None:
    assert a.keys() == b.keys(), what
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, (what, len(bad), bad[:3])


def _local(net) -> dict[str, torch.Tensor]:
    return {k: p.to_local() for k, p in net.named_parameters()}


def _check_same_state(old, new, name: str) -> None:
    """Every rank checks its own shards: with the same units and placements (asserted), equal shards on every
    rank are equal full tensors. In the GATHERED case the full tensors are compared as well."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for part in PARTS:
        a, b = getattr(old.bundle, part), getattr(new.bundle, part)
        assert all(isinstance(p, DTensor) for p in b.parameters()), (name, part)  # never whole on a rank
        units = lambda net: [n for n, m in net.named_modules() if isinstance(m, FSDPModule)]  # noqa: E731
        assert units(a) == units(b), (name, part)                              # the same FSDP units
        flags = lambda net: [(n, p.shape, p.placements, p.dtype, p.requires_grad)  # noqa: E731
                             for n, p in net.named_parameters()]
        assert flags(a) == flags(b), (name, part)
        assert a.is_gradient_checkpointing == b.is_gradient_checkpointing and a.training == b.training
        _same(_local(a), _local(b), (name, part))
        if name == GATHERED:
            _same(_full(a), _full(b), (name, part, "full"))
    lora_b = [p for k, p in _local(new.bundle.generator).items() if "lora_B" in k]
    assert all(torch.count_nonzero(t) == 0 for t in lora_b)                    # LoRA starts at the base
    lora_a = [p for k, p in _local(new.bundle.generator).items() if "lora_A" in k]
    assert all(torch.count_nonzero(t) == t.numel() for t in lora_a)            # every slice held was filled


def _check_same_step(old, new, cfg, name: str) -> None:
    from distar.train_step import train_step

    start = {part: {k: t.clone() for k, t in _local(getattr(new.bundle, part)).items()} for part in ("generator", "fake_score")}
    for st in (old, new):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"):
            m = train_step(st, ["a photo of a cat", "a red house"], cfg.loss, fake_steps=1, grad_clip=1e9,
                           reward=None, rng=torch.Generator().manual_seed(5))
        assert all(torch.isfinite(v.full_tensor() if hasattr(v, "full_tensor") else v).all() for v in m.values())
    for part in ("generator", "fake_score"):
        now = _local(getattr(new.bundle, part))
        assert any(not torch.equal(now[k], t) for k, t in start[part].items()), (name, part, "did not train")
        _same(_local(getattr(old.bundle, part)), now, (name, part, "after a step"))


def _worker(rank: int, mesh, sources: dict[str, str]) -> None:
    from distar.fsdp import fsdp_hooks
    from distar.train_loop import LoopHooks, build_state

    for name, case in CASES.items():
        case = dict(case)
        cfg = _config(sources, case.pop("world"), case.pop("ref"), **case)
        hooks = fsdp_hooks(mesh, rank, mixed_precision=cfg.train.mixed_precision)
        torch.manual_seed(11 + rank)  # as the loop seeds each rank; LoRA adapters are drawn per rank
        old = build_state(cfg, CPU, LoopHooks(rank=rank, world_size=WORLD, **{**hooks, "shard": None}))
        torch.manual_seed(11 + rank)
        new = build_state(cfg, CPU, LoopHooks(rank=rank, world_size=WORLD, **hooks))
        _check_same_state(old, new, name)
        if name in STEPPED:
            _check_same_step(old, new, cfg, name)


@pytest.mark.timeout(180)
def test_two_rank_sharded_build_equals_build_then_shard_and_trains_the_same(sources, tmp_path):
    run_group(_worker, WORLD, tmp_path, sources)


def _no_shard(net):
    return net


def test_sharded_build_keeps_the_loading_errors(sources, tmp_path):
    f = tmp_path / "other_unet.bin"
    torch.save(tiny_sd.tiny_unet(True, block_out_channels=(16, 48)).state_dict(), f)
    cfg = tiny_sd.sd_config("sdxl", sources["sdxl"], generator=str(f))
    with pytest.raises(SDLoadError, match=r"model\.generator=.*do not match the reference UNet.*shape mismatches"):
        build_sharded_bundle(cfg, CPU, _no_shard)
    cfg = tiny_sd.sd_config("sdxl", sources["sdxl"], generator=str(tmp_path), generator_file="nope.bin")
    with pytest.raises(SDLoadError, match=r"model\.generator_file='nope\.bin': no such file"):
        build_sharded_bundle(cfg, CPU, _no_shard)
    broken = tmp_path / "no_unet_weights"
    shutil.copytree(sources["sd15"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SDLoadError, match=r"model\.reference=.*no reference UNet weights"):
        build_sharded_bundle(tiny_sd.sd_config("sd15", broken), CPU, _no_shard)
    with pytest.raises(SDLoadError, match=r"model\.reference=.*missing component 'unet'"):
        shutil.rmtree(broken / "unet")
        build_sharded_bundle(tiny_sd.sd_config("sd15", broken), CPU, _no_shard)


@pytest.mark.parametrize("subfolder", ["unet", None])
def test_generator_from_a_unet_folder_in_one_process(sources, tmp_path, subfolder):
    """A diffusers UNet folder as the generator, in a subfolder or at the top of the given directory (no process
    group: `shard` may be any in-place function)."""
    torch.manual_seed(13)
    tiny_sd.tiny_unet(True).save_pretrained(tmp_path / "gen" / (subfolder or ""))
    kw = dict(generator=str(tmp_path / "gen"), generator_subfolder=subfolder, dtype="bfloat16")
    old = tiny_sd.build("sdxl", sources["sdxl"], **kw)
    new = build_sharded_bundle(tiny_sd.sd_config("sdxl", sources["sdxl"], **kw), CPU, _no_shard)
    for part in PARTS:
        a, b = getattr(old, part).state_dict(), getattr(new, part).state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), part
    assert not torch.equal(new.generator.conv_in.weight, new.reference.conv_in.weight.float())
