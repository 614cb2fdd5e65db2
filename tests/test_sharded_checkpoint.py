"""Sharded checkpoints (torch.distributed.checkpoint): two gloo processes train the 2-D world and a tiny SDXL
with FSDP2 and write a step checkpoint in which each rank wrote its own shards; three processes, one process
(FSDP over one rank) and a plain single-process run each resume it with every trained tensor, optimizer
moment and EMA weight equal to the saved ones, bit for bit; `train.init_from` it starts a new run at its EMA
generator and fake score. The DCP metadata is unpickled safely."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from distar import checkpoint as ckpt
from distar.config import LossConfig, load_config
from distar.train_loop import LoopHooks, build_state

from . import tiny_sd
from .gloo import run_group

CPU = torch.device("cpu")
G2D = ["model.init=narrow", "model.hidden=32"]
RNG = {"loop": [torch.zeros(3)], "torch": [torch.zeros(3)]}


def _g2d_state(hooks: LoopHooks, seed: int):
    torch.manual_seed(seed)
    return build_state(load_config("gaussian2d", G2D), CPU, hooks)


def _sdxl_state(reference: Path, mesh, seed: int):
    from distar.ema import EMA
    from distar.fsdp import shard_module
    from distar.train_step import TrainState, build_optimizer

    torch.manual_seed(seed)
    b = tiny_sd.build("sdxl", reference, guidance_scale=3.0)
    with torch.no_grad():  # another seed, other weights: a load that did nothing cannot pass
        for p in list(b.generator.parameters()) + list(b.fake_score.parameters()):
            p.add_(torch.randn_like(p) * 0.01)
    if mesh is not None:
        for net in (b.generator, b.fake_score):
            shard_module(net, mesh, max_params=20_000)
    return TrainState(bundle=b, generator=b.generator, fake_score=b.fake_score,
                      generator_opt=build_optimizer(b.generator, 1e-3, (0.9, 0.999), 0.01),
                      fake_opt=build_optimizer(b.fake_score, 1e-3, (0.9, 0.999), 0.01), ema=EMA(b.generator, 0.9))


def _train(state, world: str) -> None:
    from distar.train_step import train_step

    prompts = ["class 0", "class 1"] * 8 if world == "g2d" else ["a photo of a cat", "a red house"]
    for seed in (0, 1) if world == "g2d" else (0,):
        train_step(state, prompts, LossConfig(c=1.0), fake_steps=1, grad_clip=10.0, reward=None,
                   rng=torch.Generator().manual_seed(seed))


def _full(state, io) -> dict[str, torch.Tensor]:
    """Every trained tensor as full tensors (on rank 0), flat: parameters, Adam moments, EMA."""
    _, train = io.gather(state)
    if not train:
        return {}
    flat = {f"{part}/{k}": v for part in ("generator", "fake_score") for k, v in train[part].items()}
    flat |= {f"ema/{k}": v for k, v in train["ema"]["shadow"].items()}
    for part in ("generator_opt", "fake_opt"):
        for i, s in train[part]["state"].items():
            flat |= {f"{part}/{i}/{key}": s[key] for key in ("exp_avg", "exp_avg_sq", "step")}
    return {k: v.clone() for k, v in flat.items()}   # whole modules' state dicts alias the live parameters


def _fsdp_parts(rank: int, world: int, mesh, reference: Path, seed: int):
    from distar.fsdp import FSDPStateIO, fsdp_hooks

    hooks = LoopHooks(rank=rank, world_size=world, **fsdp_hooks(mesh, rank))
    return FSDPStateIO(rank), {"g2d": _g2d_state(hooks, seed), "sdxl": _sdxl_state(reference, mesh, seed)}


def _save_worker(rank: int, mesh, world: int, tmp: str, reference: str) -> None:
    import torch.distributed as dist

    io, states = _fsdp_parts(rank, world, mesh, Path(reference), seed=0)
    for name, state in states.items():
        _train(state, name)
        path = io.save_step(state, Path(tmp) / name, RNG, "name: x\n", {"step": state.step})
        want = _full(state, io)
        if rank == 0:
            torch.save(want, Path(tmp) / f"{name}_want.pt")
            assert path == ckpt.step_dir(Path(tmp) / name, state.step)
            shards = sorted(p.name for p in (path / ckpt.SHARDS_DIR).glob("*.distcp"))
            assert len(shards) == world, shards          # each rank wrote its own file
            assert not (path / ckpt.STATE_FILE).exists() and not (path / ckpt.GENERATOR_FILE).exists()
    dist.barrier()


def _load_worker(rank: int, mesh, world: int, tmp: str, reference: str) -> None:
    io, states = _fsdp_parts(rank, world, mesh, Path(reference), seed=5)
    for name, state in states.items():
        before = _full(state, io)
        rng = io.load(state, ckpt.latest_checkpoint(Path(tmp) / name))
        assert state.step == (2 if name == "g2d" else 1) and torch.equal(rng["loop"][0], RNG["loop"][0])
        got = _full(state, io)
        if rank == 0:
            _check_equal(got, torch.load(Path(tmp) / f"{name}_want.pt", weights_only=True), before, name)
    if world == 1:  # FSDP over one rank: the collective path of init_from (no process group: the test's end)
        _, fresh = _fsdp_parts(rank, world, mesh, Path(reference), seed=9)
        for name, state in fresh.items():
            _check_init_from(state, io, Path(tmp), name, rank)


def _check_init_from(state, io, tmp: Path, name: str, rank: int) -> None:
    """train.init_from the sharded checkpoint: the generator starts at its EMA weights, the fake score at its
    fake score; the optimizers and the step start fresh."""
    ckpt.init_from_checkpoint(state, ckpt.latest_checkpoint(tmp / name), 0.9, io)
    assert state.fake_warmup_done and not state.generator_opt.state and not state.fake_opt.state
    got = _full(state, io)
    if rank == 0:
        want = torch.load(tmp / f"{name}_want.pt", weights_only=True)
        for k, v in want.items():
            part, key = k.split("/", 1)
            if part == "ema":     # the generator and its fresh EMA both hold the saved EMA weights
                assert torch.equal(got[f"generator/{key}"].float(), v) and torch.equal(got[k], v), (name, k)
            elif part == "fake_score":
                assert torch.equal(got[k], v), (name, k)
        assert any(not torch.equal(got[f"generator/{k.split('/', 1)[1]}"].float(), want[f"generator/{k.split('/', 1)[1]}"])
                   for k in want if k.startswith("ema/")), name   # the EMA, not the raw generator


def _check_equal(got: dict, want: dict, before: dict, what: str) -> None:
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want))[:5])
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, (what, bad[:5])
    assert any(not torch.equal(before[k], want[k]) for k in want if k in before), what  # the load changed them


@pytest.mark.timeout(300)
def test_sharded_checkpoint_from_two_ranks_resumes_on_three_one_and_no_process_group(tmp_path, one_thread):
    pytest.importorskip("diffusers")
    reference = tiny_sd.save_sdxl(tmp_path / "pipe")
    for worker, world in ((_save_worker, 2), (_load_worker, 3), (_load_worker, 1)):
        run_group(worker, world, tmp_path, world, str(tmp_path), str(reference))
    # whole modules in this process (no process group): the same checkpoint, the same tensors
    states = {"g2d": _g2d_state(LoopHooks(), seed=5), "sdxl": _sdxl_state(reference, None, seed=5)}
    for name, state in states.items():
        before = _full(state, ckpt.StateIO())
        ckpt.StateIO().load(state, ckpt.latest_checkpoint(tmp_path / name))
        assert state.step == (2 if name == "g2d" else 1)
        _check_equal(_full(state, ckpt.StateIO()), torch.load(tmp_path / f"{name}_want.pt", weights_only=True),
                     before, name)
        _check_init_from(_g2d_state(LoopHooks(), seed=9) if name == "g2d" else _sdxl_state(reference, None, seed=9),
                         ckpt.StateIO(), tmp_path, name, rank=0)
    _check_metadata_is_unpickled_safely(tmp_path / "g2d", states["g2d"])


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _check_metadata_is_unpickled_safely(run: Path, state) -> None:
    """A .metadata that would run code (DCP's own reader unpickles it with plain pickle) is refused, unrun."""
    from distar.sharded_state import _SafeReader

    cand = ckpt.latest_checkpoint(run)
    ckpt.check_complete(cand)
    meta_file = cand / ckpt.SHARDS_DIR / ".metadata"
    assert _SafeReader(str(meta_file.parent)).read_metadata().state_dict_metadata  # the real one reads
    marker = run / "pwned"
    meta_file.write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata refers to (io|builtins)\.open"):
        ckpt.StateIO().load(state, cand)
    assert not marker.exists()
