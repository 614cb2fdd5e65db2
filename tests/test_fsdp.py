"""FSDP2 without Ray: two gloo processes on the CPU shard the 2-D world and must match unsharded training
(generator step, fake-score step, EMA), pass input gradients through a sharded frozen reference, and write
checkpoints that load both ways (sharded <-> whole modules). The sharding policy is checked on SDXL's UNet
built on the meta device."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distar import checkpoint as ckpt
from distar.config import load_config
from distar.fsdp import FSDPStateIO, _numel, fsdp_hooks, shard_frozen, shard_units
from distar.rewards.base import LocalRewardClient, WeightedReward
from distar.checkpoint import StateIO
from distar.train_loop import LoopHooks, build_state
from distar.train_step import fake_update, generator_loss, generator_update
from distar.worlds.gaussian2d import Generator2D, RegionReward

from .gloo import run_group

WORLD = 2
PROMPTS = ["class 0", "class 1", "class 2", "class 3"] * 8
CPU = torch.device("cpu")


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (what, (a - b).abs().max().item())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _states(cfg, mesh, rank, seed=0):
    torch.manual_seed(seed)
    plain = build_state(cfg, CPU, LoopHooks())
    torch.manual_seed(seed)
    sharded = build_state(cfg, CPU, LoopHooks(rank=rank, world_size=WORLD, **fsdp_hooks(mesh, rank)))
    return plain, sharded


def _check_steps_match_unsharded(cfg, mesh, rank) -> None:
    from torch.distributed.tensor import DTensor

    plain, sh = _states(cfg, mesh, rank)
    assert all(isinstance(p, DTensor) for p in sh.generator.parameters())
    reward = LocalRewardClient(WeightedReward([("region", 1.0, RegionReward())]))
    cond = sh.bundle.encode_prompts(PROMPTS)

    # fake-score step, same data on both ranks: FSDP's averaged gradient is the single-process one
    fake_update(sh, cond, len(PROMPTS), cfg.loss, 1e9, torch.Generator().manual_seed(7))
    fake_update(plain, cond, len(PROMPTS), cfg.loss, 1e9, torch.Generator().manual_seed(7))
    for (k, p), q in zip(sh.fake_score.named_parameters(), plain.fake_score.parameters()):
        _close(_full(p), q, f"fake {k}")

    # generator step, different data per rank: the gradient is the mean of both ranks' gradients
    sh.fake_opt.zero_grad(set_to_none=True)
    m = generator_update(sh, cond, PROMPTS, cfg.loss, 1e9, reward, torch.Generator().manual_seed(100 + rank))
    plain.fake_score.requires_grad_(False)
    plain.generator_opt.zero_grad(set_to_none=True)
    for r in range(WORLD):
        loss, _ = generator_loss(plain.bundle, plain.generator, plain.fake_score, cond, PROMPTS, cfg.loss, reward,
                                 torch.Generator().manual_seed(100 + r))
        (loss / WORLD).backward()
    norm = torch.nn.utils.clip_grad_norm_(list(plain.generator.parameters()), 1e9)
    plain.generator_opt.step()
    plain.ema.update(plain.generator)
    _close(_full(m["gen/grad_norm"]), norm, "grad norm")
    for (k, p), q in zip(sh.generator.named_parameters(), plain.generator.parameters()):
        _close(_full(p.grad), q.grad, f"grad {k}")
        _close(_full(p), q, f"param {k}")
        _close(_full(sh.ema.shadow[k]), plain.ema.shadow[k], f"ema {k}")
        assert isinstance(sh.ema.shadow[k], DTensor)                    # the EMA stays sharded
    # the frozen pass through the fake score gave it no gradient, and its requires_grad came back
    assert all(p.grad is None and p.requires_grad for p in sh.fake_score.parameters())

    # evaluation swaps the EMA into the sharded generator and back
    z, cls = torch.randn(16, 2, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 4
    want = plain.ema.averaged(plain.generator).eval()
    with torch.no_grad():
        with FSDPStateIO(rank).averaged_generator(sh) as net:
            _close(net(z, cls), want(z, cls), "EMA generator output")
        _close(sh.generator(z, cls), plain.generator(z, cls), "raw generator output after the swap")


def _check_frozen_reference(mesh, rank) -> None:
    """A sharded frozen module: no-grad calls, then input gradients through it, twice (FSDP's state machine)."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(3)
    ref = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
    small = nn.Linear(2, 2)
    for m in (ref, small):
        m.requires_grad_(False)
    want = copy.deepcopy(ref)
    bundle = SimpleNamespace(reference=ref, frozen_modules=lambda: [ref, small])
    assert shard_frozen(bundle, mesh, frozen_min_params=100, max_params=2000) == [ref]
    assert all(isinstance(p, DTensor) for p in ref.parameters())
    assert not any(isinstance(p, DTensor) for p in small.parameters())
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        with torch.no_grad():
            _close(ref(x), want(x), "no-grad output")
        xs, xw = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (ref(xs) ** 2).sum().backward()
        (want(xw) ** 2).sum().backward()
        _close(xs.grad, xw.grad, "input gradient")
    assert all(p.grad is None for p in ref.parameters())


def _check_state_round_trip(cfg, mesh, rank, tmp: Path) -> None:
    import torch.distributed as dist

    plain, sh = _states(cfg, mesh, rank)
    reward = LocalRewardClient(WeightedReward([("region", 1.0, RegionReward())]))
    for st in (plain, sh):  # some optimizer and EMA state to carry (same data on every rank)
        for seed in (0, 1):
            cond = st.bundle.encode_prompts(PROMPTS)
            fake_update(st, cond, len(PROMPTS), cfg.loss, 10.0, torch.Generator().manual_seed(seed))
            generator_update(st, cond, PROMPTS, cfg.loss, 10.0, reward, torch.Generator().manual_seed(seed))
    io = FSDPStateIO(rank)
    gen_sd, train_sd = io.gather(sh)
    want_gen, want_train = StateIO().gather(plain)
    if rank == 0:
        assert gen_sd.keys() == want_gen.keys()
        for k in want_gen:
            assert type(gen_sd[k]) is torch.Tensor and gen_sd[k].shape == want_gen[k].shape, k
            _close(gen_sd[k], want_gen[k], f"EMA generator {k}")
        for part in ("generator", "fake_score"):
            for k in want_train[part]:
                _close(train_sd[part][k], want_train[part][k], f"{part} {k}")
        for part in ("generator_opt", "fake_opt"):  # integer keys, as Optimizer.state_dict() has them
            assert train_sd[part]["state"].keys() == want_train[part]["state"].keys()
            for i, s in want_train[part]["state"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    _close(train_sd[part]["state"][i][key], s[key], f"{part} {i} {key}")
        assert train_sd["step"] == 2 and train_sd["fake_warmup_done"] == want_train["fake_warmup_done"]
        ckpt.save_generator_dir(tmp / "fsdp", gen_sd, "", {"step": 2}, train_sd)
        ckpt.save_generator_dir(tmp / "plain", want_gen, "", {"step": 2}, want_train)
        loaded = ckpt.load_generator_state(tmp / "fsdp")
        Generator2D(cfg.model.hidden).load_state_dict(loaded)           # full tensors, exportable as-is
    else:
        assert gen_sd == {} and train_sd == {}                          # only rank 0 holds the full state
    dist.barrier()

    # an FSDP checkpoint and a whole-module checkpoint both resume a sharded run, to the same state
    for src in ("fsdp", "plain"):
        _, fresh = _states(cfg, mesh, rank, seed=11)
        io.load(fresh, tmp / src)
        assert fresh.step == 2
        got_gen, got_train = io.gather(fresh)
        if rank == 0:
            for k in want_gen:
                _close(got_gen[k], want_gen[k], f"{src}: EMA generator {k}")
            for i, s in want_train["generator_opt"]["state"].items():
                _close(got_train["generator_opt"]["state"][i]["exp_avg"], s["exp_avg"], f"{src}: exp_avg {i}")
            for k in want_train["fake_score"]:
                _close(got_train["fake_score"][k], want_train["fake_score"][k], f"{src}: fake {k}")
    if rank == 0:  # and the FSDP checkpoint resumes an unsharded run
        torch.manual_seed(11)
        whole = build_state(cfg, CPU, LoopHooks())
        StateIO().load(whole, tmp / "fsdp")
        for (k, p), q in zip(whole.generator.named_parameters(), plain.generator.parameters()):
            _close(p, q, f"whole {k}")


def _worker(rank: int, mesh, tmp: str) -> None:
    cfg = load_config("gaussian2d", ["model.init=narrow", "loss.alpha_rew=0.5", "reward.terms=[{name: region}]",
                                     "model.hidden=32"])
    _check_steps_match_unsharded(cfg, mesh, rank)
    _check_frozen_reference(mesh, rank)
    _check_state_round_trip(cfg, mesh, rank, Path(tmp))


@pytest.mark.timeout(120)
def test_two_process_fsdp_matches_unsharded_training_and_round_trips_state(tmp_path):
    run_group(_worker, WORLD, tmp_path, str(tmp_path))


def test_sdxl_unet_units_are_transformer_and_resnet_blocks():
    """The size policy on SDXL's real UNet shape (meta device, no memory): one unit per transformer block."""
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
               addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**cfg)
    assert 2.5e9 < _numel(unet) < 2.7e9
    units = shard_units(unet)
    ids = {id(u) for u in units}
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 70 and all(any(b is m for u in units for m in u.modules()) for b in blocks)
    assert sum(id(b) in ids for b in blocks) == 60  # the 10 at 640 channels: two per Transformer2DModel unit
    assert all(id(m) in ids for m in unet.modules() if type(m).__name__ == "ResnetBlock2D" and _numel(m) > 25e6)
    owned = _owned(unet, units)  # parameters each FSDP group all-gathers at once
    assert max(owned.values()) <= 50e6 and owned[id(unet)] < 50e6, sorted(owned.values())[-3:]
    assert sum(owned.values()) == _numel(unet)


def _owned(root: nn.Module, units: list[nn.Module]) -> dict[int, int]:
    """Parameter count of each FSDP group (a unit's parameters not in a unit inside it; the root gets the rest)."""
    seen: set[int] = set()
    owned = {}
    for u in units + [root]:  # units come innermost first
        ps = [p for p in u.parameters() if id(p) not in seen]
        seen |= {id(p) for p in ps}
        owned[id(u)] = sum(p.numel() for p in ps)
    return owned


def _sdxl_worker(rank: int, mesh, reference: str) -> None:
    """One DI* step (fake + generator, CFG reference, reward through the VAE) on a tiny SDXL with everything
    sharded: per-block units in the trained UNets, the frozen reference, VAE (decode) and text encoders."""
    from torch.distributed.tensor import DTensor

    try:
        from . import tiny_sd
    except ImportError:
        import tiny_sd
    from distar.config import LossConfig
    from distar.ema import EMA
    from distar.fsdp import shard_module
    from distar.train_step import TrainState, build_optimizer, train_step

    bundles = [tiny_sd.build("sdxl", Path(reference), guidance_scale=3.0) for _ in range(2)]
    sh, plain = bundles
    plain.generator.load_state_dict(sh.generator.state_dict())
    plain.fake_score.load_state_dict(sh.fake_score.state_dict())
    assert len(shard_frozen(sh, mesh, frozen_min_params=0, max_params=3000)) == 4
    n_units = len(shard_units(sh.generator, 3000))
    for net in (sh.generator, sh.fake_score):
        shard_module(net, mesh, max_params=3000)
    assert n_units > 10 and all(isinstance(p, DTensor) for m in sh.frozen_modules() for p in m.parameters())

    class MeanBrightness(nn.Module):
        def forward(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    reward = LocalRewardClient(WeightedReward([("brightness", 1.0, MeanBrightness())]))
    states = [TrainState(bundle=b, generator=b.generator, fake_score=b.fake_score,
                         generator_opt=build_optimizer(b.generator, 1e-3, (0.9, 0.999), 0.01),
                         fake_opt=build_optimizer(b.fake_score, 1e-3, (0.9, 0.999), 0.01),
                         ema=EMA(b.generator, 0.9)) for b in bundles]
    for st in states:  # same data on both ranks: the averaged gradient is the single-process one
        train_step(st, ["a photo of a cat", "a red house"], LossConfig(alpha_rew=10.0, c=1.0), fake_steps=1,
                   grad_clip=1e9, reward=reward, rng=torch.Generator().manual_seed(0))
    for (k, p), q in zip(sh.generator.named_parameters(), plain.generator.parameters()):
        scale = q.grad.abs().max() + 1e-12
        assert (_full(p.grad) - q.grad).abs().max() <= 1e-4 * scale, k
    assert all(p.grad is None for m in sh.frozen_modules() for p in m.parameters())
    assert all(isinstance(p.grad, DTensor) for p in sh.fake_score.parameters())


@pytest.mark.timeout(120)
def test_two_process_fsdp_sdxl_step_matches_unsharded(tmp_path):
    pytest.importorskip("diffusers")
    try:
        from . import tiny_sd
    except ImportError:
        import tiny_sd
    run_group(_sdxl_worker, WORLD, tmp_path, str(tiny_sd.save_sdxl(tmp_path)))
