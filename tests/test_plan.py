"""`distar plan`: its byte counts equal what a tiny SDXL bundle really allocates after one optimizer step, its
activation measurement on the meta device equals the same measurement on real tensors, and the CLI and the
pre-start check of `distar train` say fit / does not fit with the documented exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distar.cli import main
from distar.config import ConfigError, load_config
from distar.ema import EMA
from distar.memory_plan import EXIT_DOES_NOT_FIT, GIB, memory_plan, require_fit
from distar.train_step import build_optimizer
from distar.worlds.sd.plan import ARCH_DIR, _meta_parts, saved_bytes
from tests import tiny_sd

pipeline_dirs = tiny_sd.pipeline_dirs  # fixture


def _cfg(ref: Path, *overrides: str):
    base = {"model": {"world": "sdxl", "reference": str(ref), "dtype": "bfloat16", "resolution": 16,
                      "guidance_scale": 7.5},
            "train": {"batch_size": 2, "device": "cpu"}, "ray": {"num_workers": 1}}
    return load_config(None, list(overrides), base=base)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_real_step(bundle) -> dict[str, int]:
    """One AdamW step on generator and fake score (the real optimizer), then the bytes each row counts."""
    nets = (bundle.generator, bundle.fake_score)
    opts = [build_optimizer(n, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01) for n in nets]
    cond = bundle.encode_prompts(["a fox", "a cat"])
    z = bundle.sample_noise(2, torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    losses = [bundle.generate(nets[0], z, cond).square().mean(), bundle.eps_fake(nets[1], z, t, cond).square().mean()]
    for loss, opt in zip(losses, opts):
        loss.backward()
        opt.step()
    ema = EMA(bundle.generator, 0.99)
    trained = [p for n in nets for p in n.parameters() if p.requires_grad]
    state = [v for opt in opts for s in opt.state.values() for k, v in s.items() if k != "step"]
    steps = [s["step"] for opt in opts for s in opt.state.values()]
    assert all(s.ndim == 0 and s.device.type == "cpu" for s in steps)  # host counters, not counted by the plan
    te = [bundle.parts.text_encoder, bundle.parts.text_encoder_2]
    return {"trained parameters": _nbytes(trained), "gradients": _nbytes(p.grad for p in trained),
            "optimizer states": _nbytes(state), "EMA": _nbytes(ema.shadow.values()),
            "frozen reference": _nbytes(bundle.reference.parameters()),
            "VAE": _nbytes(bundle.vae.parameters()), "text encoders": _nbytes(p for m in te for p in m.parameters()),
            "frozen LoRA bases": _nbytes(p for n in nets for p in n.parameters() if not p.requires_grad)}


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_plan_rows_equal_the_bytes_a_tiny_sdxl_bundle_allocates(pipeline_dirs, lora_rank):
    ref = pipeline_dirs["sdxl"]
    bundle = tiny_sd.build("sdxl", ref, dtype="bfloat16", lora_rank=lora_rank)
    real = _one_real_step(bundle)
    plan = memory_plan(_cfg(ref, f"model.lora_rank={lora_rank}"), gpu_mem_gb=80)
    rows = {what: b for what, b, _ in plan.rows}
    if lora_rank == 0:
        assert real.pop("frozen LoRA bases") == 0 and "frozen LoRA bases" not in rows
    for what, nbytes in real.items():
        assert rows[what] == nbytes, what  # exact: same parameters, dtypes and optimizer state
    assert plan.total > sum(real.values()) and plan.fits


def test_fsdp_rows_are_one_nth_of_ddp_rounded_up(pipeline_dirs):
    ref = pipeline_dirs["sdxl"]
    ddp = {w: b for w, b, _ in memory_plan(_cfg(ref, "ray.num_workers=4"), 80).rows}
    fsdp = {w: b for w, b, _ in memory_plan(_cfg(ref, "ray.num_workers=4", "ray.strategy=fsdp"), 80).rows}
    for what in ("trained parameters", "gradients", "optimizer states", "EMA", "frozen reference"):
        assert ddp[what] / 4 <= fsdp[what] < ddp[what] / 4 * 1.1, what
    assert fsdp["VAE"] == ddp["VAE"]  # small frozen modules stay replicated, as distar.fsdp does
    assert "FSDP units in flight" in fsdp and "FSDP units in flight" not in ddp



def test_bf16_under_fsdp_has_no_autocast_copies_and_gathers_units_in_bf16(pipeline_dirs):
    """FSDP's bf16 mixed-precision policy (distar.fsdp.mixed_precision_policy) all-gathers bf16 weights: autocast
    caches no copies, and the units in flight weigh half their float32 size; DDP keeps the autocast row."""
    ref, fsdp = pipeline_dirs["sdxl"], ("ray.num_workers=4", "ray.strategy=fsdp")
    rows = {mp: {w: b for w, b, _ in memory_plan(_cfg(ref, *fsdp, f"train.mixed_precision='{mp}'"), 80).rows}
            for mp in ("no", "bf16")}
    ddp = {w: b for w, b, _ in memory_plan(_cfg(ref, "ray.num_workers=4", "train.mixed_precision=bf16"), 80).rows}
    assert ddp["autocast bf16 weight copies"] > 0
    assert "autocast bf16 weight copies" not in rows["bf16"] and "autocast bf16 weight copies" not in rows["no"]
    assert rows["bf16"]["FSDP units in flight"] * 2 == rows["no"]["FSDP units in flight"]  # float32 trained nets
    one = {w for w, _, _ in memory_plan(_cfg(ref, "ray.strategy=fsdp", "train.mixed_precision=bf16"), 80).rows}
    assert "FSDP units in flight" in one  # one rank still gathers bf16 copies under the policy

def test_meta_activation_measurement_equals_the_same_on_real_tensors():
    from diffusers import UNet2DConditionModel

    unet = tiny_sd.tiny_unet(True).train()
    c = unet.config
    cfg = dict(c)
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(cfg).train()

    def measure(net, device, checkpointing):
        net.enable_gradient_checkpointing() if checkpointing else net.disable_gradient_checkpointing()
        kw = dict(device=device)
        x = torch.zeros(2, 4, 8, 8, requires_grad=True, **kw)
        added = {"text_embeds": torch.zeros(2, 16, **kw), "time_ids": torch.zeros(2, 6, **kw)}
        text = torch.zeros(2, 77, c.cross_attention_dim, **kw)
        params = {p.untyped_storage()._cdata for p in net.parameters()}
        return saved_bytes(lambda: net(x, torch.zeros(2, dtype=torch.long, **kw), encoder_hidden_states=text,
                                       added_cond_kwargs=added).sample, params, ("ResnetBlock2D",), net)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # meta tensors take SDPA's math path (it saves the attention probabilities)
        for ckpt in (False, True):
            assert measure(meta, "meta", ckpt) == measure(unet, "cpu", ckpt)
    full, unit = measure(unet, "cpu", False)
    kept, _ = measure(unet, "cpu", True)
    assert 0 < unit < full and 0 < kept < full  # checkpointing keeps less; one unit is part of the whole


def test_shipped_architectures_have_the_public_parameter_counts():
    cfgs = {c: json.loads((ARCH_DIR / f"sdxl_{c}.json").read_text())
            for c in ("unet", "vae", "text_encoder", "text_encoder_2")}
    parts = _meta_parts("sdxl", cfgs)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    assert all(p.device.type == "meta" for m in parts.values() for p in m.parameters())


def _write(tmp_path, ref, *lines) -> str:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("\n".join([f"model: {{world: sdxl, reference: {ref}, dtype: bfloat16, resolution: 16}}",
                              "train: {batch_size: 2}", *lines]) + "\n")
    return str(cfg)


def test_cli_exit_codes_and_suggestions(pipeline_dirs, tmp_path, capsys):
    cfg = _write(tmp_path, pipeline_dirs["sdxl"])
    assert main(["plan", "--config", cfg, "--gpus", "2", "--gpu-mem-gb", "80"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "--config", cfg, "--gpus", "2", "--gpu-mem-gb", "0.001"]) == EXIT_DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "ray.strategy=fsdp:" in out and "model.lora_rank=64:" in out
    assert main(["plan", "--config", cfg, "--gpus", "0", "--gpu-mem-gb", "80"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert main(["plan", "--config", cfg, "--gpu-mem-gb", "-1"]) == 2
    assert "--gpu-mem-gb" in capsys.readouterr().err


def test_train_check_refuses_gpu_runs_that_do_not_fit_and_leaves_cpu_runs_alone(pipeline_dirs):
    ref = pipeline_dirs["sdxl"]
    assert require_fit(load_config("digits_ray")) is None  # CPU workers: never checked
    gpu = ["ray.num_workers=2", "ray.gpus_per_worker=1"]
    assert require_fit(_cfg(ref, *gpu, "ray.gpu_mem_gb=80")).fits
    with pytest.raises(ConfigError, match=r"does not fit on 0\.001 GiB.*ray\.plan_check=false(.|\n)*total \(peak\)"):
        require_fit(_cfg(ref, *gpu, "ray.gpu_mem_gb=0.001"))
    assert require_fit(_cfg(ref, *gpu, "ray.gpu_mem_gb=0.001", "ray.plan_check=false")) is None
