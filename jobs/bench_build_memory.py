"""Host memory of starting an FSDP run of an SD world: whole UNets built then sharded (old) vs the sharded build (new).

    python -m jobs.bench_build_memory --width 128 --world 2

Writes a tiny-SDXL pipeline whose UNet is widened with --width so that its weights dominate (VAE and text encoders
stay tiny), and a DMD2-style fp16 generator state dict (.bin), to a temporary directory; the run is sdxl_dmd2's
shape: model.dtype bfloat16, generator from that file, full fine-tuning. Then, in a fresh group of --world forked
gloo processes on the CPU for each path, every rank runs `build_state` with the FSDP hooks: with
`LoopHooks.shard=None` the bundle is built whole and sharded afterwards (the old path), with the hooks as they are
it is built sharded (`distar.worlds.sd.sharded_build`). Every library is imported before the processes fork, so
the numbers are the build's. A thread samples each rank's RSS and its anonymous part (RssAnon: the memory the
build allocated; the rest is mapped pages of the weights files, which the kernel can drop) every 5 ms during
`build_state`, and reads the kernel's exact RSS peak (VmHWM, reset through /proc/self/clear_refs just before);
printed per rank: the peaks above the values just before it and the RssAnon left when it returns
(the built state: shards, EMA), and the ratios old/new of the largest per-rank peaks. Never asserted anywhere: a measurement, on whatever else the machine is doing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from datetime import timedelta
from pathlib import Path

from jobs.host_memory import peaks_during


def _tokenizer(out: Path):
    """A byte-level CLIP tokenizer (no merges): enough to load and build; nothing here encodes text."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)


def _unet(width: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16)


def write_sources(root: Path, width: int) -> dict:
    """The pipeline directory and the generator file; returns their paths and the UNet's size."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                          bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32)
    unet = _unet(width)
    tok = _tokenizer(root / "_tok")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text),
                                     text_encoder_2=CLIPTextModelWithProjection(text), tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(root / "sdxl")
    torch.save({k: v.half() for k, v in _unet(width).state_dict().items()}, root / "generator_fp16.bin")
    n = sum(p.numel() for p in unet.parameters())
    return {"reference": str(root / "sdxl"), "generator": str(root / "generator_fp16.bin"), "unet_params": n}


def _worker(rank: int, world: int, init_file: str, out: str, sources: dict, path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from distar.config import LossConfig, RunConfig, StableDiffusionModel
    from distar.fsdp import fsdp_hooks
    from distar.train_loop import LoopHooks, build_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        cfg = RunConfig(model=StableDiffusionModel(world="sdxl", reference=sources["reference"], dtype="bfloat16",
                                                   generator=sources["generator"]), loss=LossConfig(alpha_rew=0.0))
        hooks = fsdp_hooks(init_device_mesh("cpu", (world,)), rank)
        if path == "old":
            hooks["shard"] = None
        dist.barrier()
        peaks = peaks_during(lambda: build_state(cfg, torch.device("cpu"), LoopHooks(rank=rank, world_size=world,
                                                                                      **hooks)))
        (Path(out) / f"{path}_{rank}.json").write_text(json.dumps(peaks))
    finally:
        dist.destroy_process_group()


def _import_everything() -> None:
    """What a build imports, imported once here: the forked ranks then start with it (imports are not the build)."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    import distar.fsdp  # noqa: F401
    import distar.train_loop  # noqa: F401
    import distar.worlds.sd.bundle  # noqa: F401
    import distar.worlds.sd.sharded_build  # noqa: F401


def main(argv: list[str] | None = None) -> dict:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128, help="the UNet's first block width, a multiple of 32 (size ~ width^2)")
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
    if args.width <= 0 or args.width % 32:
        p.error(f"--width {args.width}: must be a positive multiple of 32 (the UNet's norm_num_groups)")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="distar-bench-build-") as out:
        ctx = mp.get_context("fork")  # the pipeline is written in a child: this process stays small for the forks
        writer = ctx.Process(target=lambda: (Path(out) / "sources.json").write_text(
            json.dumps(write_sources(Path(out), args.width))))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit(f"writing the tiny pipeline failed (exit code {writer.exitcode})")
        sources = json.loads((Path(out) / "sources.json").read_text())
        _import_everything()
        for path in ("old", "new"):
            init = tempfile.mktemp(prefix="init-", dir=out)
            mp.start_processes(_worker, args=(args.world, init, out, sources, path), nprocs=args.world, join=True,
                               start_method="fork")
            rows[path] = [json.loads((Path(out) / f"{path}_{r}.json").read_text()) for r in range(args.world)]
    summary = {"unet_params": sources["unet_params"],
               "unet_fp32_mib_computed": round(sources["unet_params"] * 4 / 2**20, 1), "world": args.world}
    kinds = ("rss", "anon") + (("rss_hwm",) if all(r["rss_hwm"] is not None for v in rows.values() for r in v) else ())
    for path in rows:
        for kind in kinds:
            summary[f"{path}_peak_{kind}_mib_per_rank"] = [round(r[kind], 1) for r in rows[path]]
        summary[f"{path}_anon_after_build_mib_per_rank"] = [round(r["anon_after"], 1) for r in rows[path]]
    for kind in kinds:
        worst = {path: max(r[kind] for r in rows[path]) for path in rows}
        summary[f"ratio_old_over_new_{kind}"] = round(worst["old"] / worst["new"], 2) if worst["new"] > 1 else None
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
