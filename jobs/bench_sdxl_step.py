"""Time DI* training steps at SDXL size (random weights, bf16): images/s, s/step, peak memory, MFU.

Runs distar's own `train_step` (K_fake fake updates, one generator update, EMA) on a StableDiffusionBundle built
in memory from SDXL-base's public configs (no hub, no disk): UNet (2,567,463,684 params, checked on the meta
device) as frozen bf16 reference, generator and fake score; SDXL's VAE (scaling_factor 0.13025). No text
encoders: `encode_prompts` returns fixed random embeddings of SDXL's shapes ([B,77,2048], pooled [B,1280],
time ids; zero null prompt) -- encoding is no-grad, ~0.1% of a step. Reward: a small conv net on the decoded
image (far cheaper than ImageReward & co.); `--no-reward`: alpha_rew=0, no VAE decode, no reward.
On cuda: frozen nets bf16, bf16 autocast around the step (train.mixed_precision=bf16). `--lora-rank 0`: full
fine-tuning, fp32 masters (+AdamW, fp32 EMA: ~95 GB, H200 only); `--lora-rank R`: frozen bf16 bases + fp32 LoRA
(fits an H100); default 0 with >= 120 GiB of GPU memory, else 64. Else as configs/sdxl_dmd2.yaml: grad
checkpointing, batch 2 (halved on CUDA OOM), K_fake 5, CFG 7.5, tau 399, alpha_rew 100. F = UNet forward FLOPs
per image at the run's resolution (FlopCounterMode on a meta copy: 6.761 TFLOP at 1024 px; docs/algorithm.md 6.76);
model FLOP/image = 9F + 3F*K_fake (docs/algorithm.md), recompute not counted; VAE decode shown apart.

Here (CPU, tiny configs, meaningless numbers): OMP_NUM_THREADS=1 .venv/bin/python -m jobs.bench_sdxl_step --size tiny
GPU (later session; its image has torch, peft, transformers, pyyaml, not diffusers/pydantic). Once, here:
  .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.39.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
then the device tool's `run` with carry=[".whl"], timeout_s=480 and this command (one line, ~1-2 min per bench;
add `python3 -m jobs.bench_sdxl_step --fsdp ...` for the FSDP2 path on one rank):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit; export PYTHONUNBUFFERED=1; nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv; python3 -m jobs.bench_sdxl_step --json $OUT/ckpt.json 2>&1 | tee $OUT/ckpt.log; python3 -m jobs.bench_sdxl_step --no-grad-ckpt --batch 1 --json $OUT/nockpt.json 2>&1 | tee $OUT/nockpt.log
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distar.config import LossConfig  # noqa: E402
from distar.ema import EMA  # noqa: E402
from distar.rewards.base import LocalRewardClient, WeightedReward  # noqa: E402
from distar.train_step import TrainState, build_optimizer, train_step  # noqa: E402
from distar.worlds.sd.loading import ReferenceParts, add_lora  # noqa: E402
from distar.worlds.sd.bundle import SDCond, StableDiffusionBundle  # noqa: E402

# Non-default fields of stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the rest are diffusers'
# defaults, equal to the file's values); checked by the parameter count and F below.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=8, cross_attention_dim=32, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=8)
TINY_VAE = dict(SDXL_VAE, layers_per_block=1, norm_num_groups=4, block_out_channels=(8, 16), sample_size=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# (unet, vae, resolution, (text length, text dim, pooled dim), params expected, batch, K_fake, grad ckpt)
SIZES = {"sdxl": (SDXL_UNET, SDXL_VAE, 1024, (77, 2048, 1280), 2_567_463_684, 2, 5, True),
         "tiny": (TINY_UNET, TINY_VAE, 32, (77, 32, 16), None, 2, 1, False)}
MATMUL_CEILING = 790.0  # TFLOP/s, bf16 8192^3 matmul on random data, measured on H100/H200 here (KINDS.md)


class FixedTextBundle(StableDiffusionBundle):
    """A StableDiffusionBundle whose prompt encoding is fixed random SDXL-shaped embeddings (no encoders)."""

    def set_text(self, n: int, length: int, dim: int, pooled: int, seed: int) -> None:
        g, r = torch.Generator().manual_seed(seed), self.resolution
        self._cond = SDCond(text=torch.randn(n, length, dim, generator=g).to(self.device),
                            null_text=torch.zeros(n, length, dim, device=self.device),
                            pooled=torch.randn(n, pooled, generator=g).to(self.device),
                            null_pooled=torch.zeros(n, pooled, device=self.device),
                            time_ids=torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device).expand(n, -1))

    def encode_prompts(self, prompts) -> SDCond:
        n, c = len(prompts), self._cond
        return SDCond(c.text[:n], c.null_text[:n], c.pooled[:n], c.null_pooled[:n], c.time_ids[:n])


class ConvReward(nn.Module):
    """Stand-in differentiable reward: resize to 224 px (as CLIP-style rewards do), 4 strided convs, linear."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.net = nn.Sequential(*[m for a, b in zip(chans, chans[1:]) for m in (nn.Conv2d(a, b, 3, 2, 1), nn.SiLU())])
        self.head = nn.Linear(chans[-1], 1)

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
        return self.head(self.net(x).mean(dim=(2, 3))).squeeze(1)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="sdxl")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--resolution", type=int, default=None, help="pixels; default: the size's own (SDXL 1024)")
    p.add_argument("--batch", type=int, default=None, help="images per step (halved on CUDA OOM)")
    p.add_argument("--fake-steps", type=int, default=None, help="K_fake per generator step")
    p.add_argument("--lora-rank", type=int, default=None, help="0 = full fine-tuning (fp32 masters); default: auto")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--no-reward", action="store_true", help="alpha_rew=0: skip VAE decode and reward")
    p.add_argument("--fsdp", action="store_true",
                   help="shard reference, generator and fake score with FSDP2 on a one-rank process group (the "
                        "ray.strategy=fsdp path, distar.fsdp.shard_module; bf16 policy with float32 reduction "
                        "under --precision bf16)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM datasheet)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def count_flops(unet_cfg: dict, vae_cfg: dict, res: int, text: tuple, with_vae: bool) -> dict:
    """Parameters, F (UNet fwd, 1 image), UNet fwd+bwd and VAE decode FLOPs, on meta copies of the models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
        h = res // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        x = torch.randn(1, unet_cfg["in_channels"], h, h)
        kw = dict(encoder_hidden_states=torch.randn(1, text[0], text[1]),
                  added_cond_kwargs={"text_embeds": torch.randn(1, text[2]), "time_ids": torch.randn(1, 6)})
        out = {k: sum(p.numel() for p in m.parameters()) for k, m in (("unet_params", unet), ("vae_params", vae))}
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            unet(x, torch.tensor([500]), **kw)
        out["F"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            unet(x, torch.tensor([500]), **kw).sample.sum().backward()
        out["unet_fwd_bwd"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            _ = vae.decode(x) if with_vae else None
        out["vae_decode"] = fc.get_total_flops()
    return out


def build(args, unet_cfg, vae_cfg, text, device, frozen_dtype) -> FixedTextBundle:
    """The bundle as distar.worlds.sd.bundle.build_bundle assembles it, from random-init modules."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device (seconds, not minutes, at 2.6B params)
        base, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg).to(frozen_dtype)
    if args.lora_rank > 0:
        ref = base.to(frozen_dtype)
        gen, fake = add_lora(copy.deepcopy(ref), args.lora_rank), add_lora(copy.deepcopy(ref), args.lora_rank)
    else:  # float32 masters for both trained nets
        ref = copy.deepcopy(base).to(frozen_dtype)
        gen, fake = base.float().requires_grad_(True), copy.deepcopy(base).requires_grad_(True)
    for m in (ref, vae):
        m.requires_grad_(False).eval()
    for m in (gen, fake, ref, vae) if args.grad_ckpt else ():
        m.enable_gradient_checkpointing()
    gen.train(), fake.train()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SDXL's betas, DDPM
    parts = ReferenceParts(ref, vae, sched, dict(sched.config), None, None, None, None, True, {})
    bundle = FixedTextBundle("sdxl", parts, gen, fake, guidance_scale=7.5, conditioning_timestep=399,
                             resolution=args.resolution, device=device)
    bundle.set_text(args.batch, *text, seed=1)
    return bundle


def timed(fn, reps: int, warmup: int, device) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _free(*opts) -> None:
    for o in opts:
        o.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never initialised


def raw_unet_seconds(bundle, batch: int, reps: int, autocast, device) -> dict[str, float]:
    """Median seconds of the reference UNet alone: no-grad forward (F), forward + backward with weight grads (3F)."""
    ref, cond = bundle.reference, bundle.encode_prompts(["prompt"] * batch)
    x, t = torch.randn(batch, *bundle.latent_shape, device=device), torch.full((batch,), 500, device=device)
    out = {}
    for key in ("fwd", "fwd_bwd"):
        grad = key == "fwd_bwd"
        ref.requires_grad_(grad).train(grad)

        def fn():
            ref.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(grad), autocast:
                eps = bundle.unet_eps(ref, x, t, cond.text, cond.pooled, cond.time_ids)
                if grad:
                    eps.square().mean().backward()
        try:
            out[key] = statistics.median(timed(fn, reps, 1, device))
        except torch.cuda.OutOfMemoryError:
            out[key] = float("nan")
        ref.requires_grad_(False).eval().zero_grad(set_to_none=True)
        _free()
    return out


def _time_halving_on_oom(step, args, device, opts) -> list[float] | None:
    """Step times; on CUDA OOM halve args.batch and retry (a one-shot device run must return numbers)."""
    while True:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            return timed(step, args.steps, args.warmup, device)
        except torch.cuda.OutOfMemoryError:
            pass  # tensors held by the traceback are freed once the except block ends
        _free(*opts)
        print(f"CUDA OOM at batch {args.batch}" + (": does not fit" if args.batch == 1 else ", halving"), flush=True)
        if args.batch == 1:
            return None
        args.batch //= 2


def _one_rank_mesh(device: torch.device):
    """A one-rank process group (nccl on CUDA, gloo on CPU) and its 1-D mesh, for --fsdp."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="distar-bench-pg-")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                                world_size=1)
    return init_device_mesh(device.type, (1,))


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return _bench(args)
    finally:
        import torch.distributed as dist

        if args.fsdp and dist.is_initialized():
            dist.destroy_process_group()


def _bench(args) -> dict:
    device = torch.device(args.device)
    unet_cfg, vae_cfg, res, text, n_expected, batch, k_fake, ckpt = SIZES[args.size]
    args.resolution, args.batch, args.fake_steps = args.resolution or res, args.batch or batch, args.fake_steps or k_fake
    args.grad_ckpt = ckpt if args.grad_ckpt is None else args.grad_ckpt
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    if args.lora_rank is None:
        args.lora_rank = 64 if device.type == "cuda" and args.size == "sdxl" and gpu_gib < 120 else 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"[bench_sdxl_step] {name} ({gpu_gib:.0f} GiB) torch {torch.__version__} | {vars(args)}", flush=True)

    fl = count_flops(unet_cfg, vae_cfg, args.resolution, text, with_vae=not args.no_reward)
    F_ = fl["F"]
    print(f"UNet params {fl['unet_params']:,} (VAE {fl['vae_params']:,}); F = {F_ / 1e12:.4g} TFLOP/image at "
          f"{args.resolution}px (docs/algorithm.md: 6.76 at 1024); meta fwd+bwd = "
          f"{fl['unet_fwd_bwd'] / F_:.3f}F; VAE decode {fl['vae_decode'] / 1e12:.4g} TFLOP", flush=True)
    if n_expected is not None and abs(fl["unet_params"] - n_expected) > 1e-3 * n_expected:
        raise SystemExit(f"UNet has {fl['unet_params']:,} params, expected {n_expected:,}: config is wrong")

    bf16, t0 = args.precision == "bf16", time.perf_counter()
    bundle = build(args, unet_cfg, vae_cfg, text, device, torch.bfloat16 if bf16 else torch.float32)
    gen, fake = bundle.generator, bundle.fake_score
    if args.fsdp:  # before the optimizers and the EMA, which then hold the shards (as in distar.train_loop)
        from distar.fsdp import mixed_precision_policy, shard_module

        mesh, policy = _one_rank_mesh(device), mixed_precision_policy("bf16" if bf16 else "no")
        for net in (bundle.reference, gen, fake):
            shard_module(net, mesh, mp_policy=policy)
    opt_g, opt_f = (build_optimizer(m, 5e-7, (0.9, 0.999), 0.01) for m in (gen, fake))
    state = TrainState(bundle, gen, fake, opt_g, opt_f, ema=EMA(gen, 0.999))
    loss_cfg = LossConfig(alpha_rew=0.0 if args.no_reward else 100.0)
    reward = None if args.no_reward else LocalRewardClient(WeightedReward([("conv", 1.0, ConvReward())]).to(device))
    print(f"built in {time.perf_counter() - t0:.1f} s; trained params per net "
          f"{sum(p.numel() for p in gen.parameters() if p.requires_grad):,}", flush=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    rng, metrics = torch.Generator().manual_seed(2), {}

    def step():
        with autocast:
            metrics.update(train_step(state, ["prompt"] * args.batch, loss_cfg, fake_steps=args.fake_steps,
                                      grad_clip=10.0, reward=reward, rng=rng))

    step_s = _time_halving_on_oom(step, args, device, (opt_g, opt_f))
    if step_s is None:
        return {"oom": True, **vars(args)}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    values = {k: float(v) for k, v in metrics.items()}
    _free(opt_g, opt_f)
    raw = raw_unet_seconds(bundle, args.batch, max(2, args.steps), autocast, device)

    t_step, k, b = statistics.median(step_s), args.fake_steps, args.batch
    model = (9 + 3 * k) * F_                               # docs/algorithm.md cost model, per image
    vae = 0.0 if args.no_reward else 2 * fl["vae_decode"]  # decode forward + gradient to its input
    tflops, raw_tflops = model * b / t_step / 1e12, 3 * F_ * b / raw["fwd_bwd"] / 1e12
    r = dict(vars(args), device_name=name, gpu_gib=gpu_gib, F_tflop=F_ / 1e12, unet_params=fl["unet_params"],
             seconds_per_step=t_step, step_times=step_s, images_per_s=b / t_step, peak_mem_gib=peak,
             model_tflop_per_image=model / 1e12, vae_tflop_per_image=vae / 1e12, achieved_tflops=tflops,
             frac_peak=tflops / args.peak_tflops, frac_matmul_ceiling=tflops / MATMUL_CEILING,
             raw_fwd_tflops=F_ * b / raw["fwd"] / 1e12, raw_fwd_bwd_tflops=raw_tflops,
             step_vs_raw_fwd_bwd=tflops / raw_tflops, metrics=values)
    print(f"\n=== DI* step: {args.size} {args.resolution}px batch {b} K_fake {k} lora_rank {args.lora_rank} grad_ckpt "
          f"{args.grad_ckpt} {args.precision} {'FSDP2 (1 rank)' if args.fsdp else 'unsharded'} reward "
          f"{'off' if args.no_reward else 'conv stand-in'} on {name} ===")
    print(f"step     : {t_step:.4f} s/step (median of {len(step_s)}, min {min(step_s):.4f}) = {b / t_step:.3f} images/s; "
          f"peak memory {peak:.1f} GiB of {gpu_gib:.0f}")
    print(f"FLOP     : (9+3K)F = {model / 1e12:.4g} TFLOP/image, F = {F_ / 1e12:.4g} (docs/algorithm.md 6.76 at 1024)"
          + (f"; LoRA needs only (8+2K)F = {(8 + 2 * k) * F_ / 1e12:.4g}" if args.lora_rank else "")
          + (f"; VAE decode fwd+grad +{vae / 1e12:.4g}" if vae else ""))
    print(f"achieved : {tflops:.4g} TFLOP/s = {100 * r['frac_peak']:.1f}% of {args.peak_tflops:.0f} peak, "
          f"{100 * r['frac_matmul_ceiling']:.1f}% of the {MATMUL_CEILING:.0f} matmul ceiling"
          + (f"; with VAE {(model + vae) * b / t_step / 1e12:.4g} TFLOP/s" if vae else ""))
    print(f"raw UNet : fwd {r['raw_fwd_tflops']:.4g} TFLOP/s, fwd+bwd {r['raw_fwd_bwd_tflops']:.4g} TFLOP/s "
          f"({raw['fwd_bwd']:.4f} s, batch {b}); step / raw fwd+bwd = {r['step_vs_raw_fwd_bwd']:.2f}")
    print("metrics  : " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
