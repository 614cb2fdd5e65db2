"""FSDP2 for DI*: which modules are sharded, and full (unsharded) state out of and into sharded modules.

`ray.strategy=fsdp` uses this through `LoopHooks` (`fsdp_hooks`, wired in `distar.ray_train`); the loop and
the step never import it. FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters in place as
DTensors (dim 0 over the ranks), so the modules the step calls are the sharded ones and `unwrap` returns them.

What is sharded
  generator, fake score  `shard_module`: size-based units (`shard_units`: for a diffusers UNet each transformer
                         block and large ResNet block, small down/up blocks whole), then the root for the rest.
  frozen modules         `bundle.reference` when it is a module, and any other `frozen_modules()` entry with at
                         least `frozen_min_params` parameters (SDXL's second text encoder; not the VAE, not
                         CLIP-L). Their forward all-gathers like any FSDP module. With no parameter requiring
                         grad, backward through them all-gathers again to give the input gradient DI* needs
                         (d eps_ref / d x_t) and reduce-scatters nothing; no-grad calls just all-gather.
  built sharded          with `LoopHooks.shard` (which `fsdp_hooks` sets) the SD worlds make the reference,
                         generator and fake score on the meta device, shard them with `shard_module` (the units
                         and policy above) and fill each rank's shards from the weights files
                         (`distar.worlds.sd.sharded_build`): no rank ever holds a whole UNet, and `shard_module`
                         leaves them as they are when `wrap` / `prepare_bundle` come to them. Other worlds build
                         whole, then `wrap` and `prepare_bundle` shard them.
  Every unit, roots included, reshards after forward: a no-grad pass (the fake-score update's generator
  samples, evaluation) then never leaves stale unsharded weights behind for the next pass.
  Mixed precision (train.mixed_precision=bf16, `mixed_precision_policy`): every sharded module all-gathers its
  parameters in bf16 and computes in bf16, gradients are reduce-scattered in float32 into the float32 sharded
  parameters (the master weights the optimizer and the EMA see). Autocast then finds bf16 weights and caches no
  bf16 copy of whole unsharded float32 weights. Reference and fake score share the policy, so a fake equal
  to the reference computes exactly what the reference does (no rounding in the score gap, as without FSDP).
The generator step freezes the fake score with `requires_grad_(False)` on its sharded parameters; FSDP2 copies
requires_grad onto the unsharded parameters at each all-gather (`FSDPParam.to_unsharded`), so that pass builds
no graph for them and no gradient of theirs is reduce-scattered.

State (`FSDPStateIO`; every method is a collective that all ranks call in the same order)
  save_step  a sharded checkpoint: every rank writes its own shards with torch.distributed.checkpoint
          (`distar.sharded_state`) into one temporary directory; rank 0 then writes progress.pt, config.yaml and
          meta.json (last) and renames it into place. No rank gathers full tensors. It resumes on any number
          of ranks (DCP reshards), or in one process.
  export  the EMA generator (and a LoRA run's adapters) as full tensors on rank 0, for final/ and best/.
  gather  full tensors are gathered one at a time; rank 0 keeps them on the CPU, the others drop them
          (`get_model_state_dict` / `get_optimizer_state_dict` with full_state_dict and cpu_offload). The
          optimizer state is renamed to `Optimizer.state_dict()`'s integer keys, so a checkpoint has one format
          whatever the strategy: DDP can resume an FSDP checkpoint and the reverse.
  EMA     the shadow stays sharded (it is built from the sharded parameters: 1/N of a float32 copy per rank)
          and is gathered at save; for evaluation it is swapped into the sharded generator and swapped back
          (`averaged_generator`), since FSDP modules cannot be deep-copied.
  load    a sharded checkpoint through DCP; a train_state.pt one: each rank memory-maps it (the ranks of a
          node share the page cache) and keeps its shard.

Memory, SDXL full fine-tuning (2.6B parameters per UNet = 10.3 GB in float32, AdamW), N ranks:
  per GPU   generator + fake score: parameters, gradients and two Adam moments = 4 x 2 x 10.3 GB = 82 GB / N;
            EMA 10.3 GB / N; fp16 reference 5.1 GB / N; plus the unsharded units in flight (a unit holds at
            most `DEFAULT_UNIT_PARAMS` = 50M parameters, 0.2 GB in float32, half under the bf16 policy) and
            activations. DDP needs all ~98 GB on
            every GPU, which no 80 GB card holds. Gathering for a checkpoint adds one full tensor at a time.
  host at startup: built whole, every rank held the three UNets before sharding (bf16 reference 5.1 GB, float32
            generator and fake score 2 x 10.3 GB: ~26 GB, plus the copies made on the way). Built sharded, a rank
            allocates only its shards, on its device (the GPU under CUDA), and the host holds one tensor's slice in
            flight and the file pages read for one module; the small frozen parts still load whole (SDXL's text
            encoders 1.6 GB in bf16 until `prepare_bundle` shards the second; the VAE). Measured on a tiny SDXL:
            docs/checkpoints.md.
  host at a checkpoint: each rank stages its own shards (~72 GB / N); gathering the full resume state on
            rank 0 (`gather`, the old format) would take ~72 GB there. final/ gathers the EMA generator alone.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import checkpoint as ckpt
from . import sharded_state
from .bundle import ModelBundle, unwrap
from .checkpoint import StateIO, restore_progress, resume_dict
from .train_step import TrainState

DEFAULT_UNIT_PARAMS = 50_000_000    # ~ one SDXL transformer block (35M) or 1280-channel ResNet block (31M)
FROZEN_MIN_PARAMS = 500_000_000     # frozen modules below this are replicated (VAE 84M, CLIP-L 123M)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # never called, so never a unit: their items are


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def shard_units(module: nn.Module, max_params: int = DEFAULT_UNIT_PARAMS,
                min_params: int | None = None) -> list[nn.Module]:
    """Submodules to shard as their own FSDP units, innermost first (`fully_shard` goes bottom-up).

    Walking down from `module`: a child with at most `max_params` parameters is one unit; a larger child is
    split into its own children's units and is a unit itself only if what is left of it has at least
    `min_params` (default max_params / 8); anything smaller stays with its parent (in the end, the root).
    """
    min_params = max(1, max_params // 8) if min_params is None else min_params
    units: list[nn.Module] = []

    def visit(parent: nn.Module) -> int:  # parameters of `parent` left outside the units found below it
        left = sum(p.numel() for p in parent.parameters(recurse=False))
        for child in parent.children():
            n = _numel(child)
            if isinstance(child, _CONTAINERS):
                left += visit(child)
            elif n < min_params:
                left += n
            elif n <= max_params:
                units.append(child)
            else:
                rest = visit(child)
                if rest >= min_params:
                    units.append(child)
                else:
                    left += rest
        return left

    visit(module)
    return units


def mixed_precision_policy(mixed_precision: str):
    """FSDP2's policy for `train.mixed_precision`: 'bf16' -> bf16 all-gather and compute, float32 gradient
    reduction (sharded parameters stay float32); 'no' -> None (FSDP's default: everything in the parameters' dtype)."""
    if mixed_precision == "no":
        return None
    if mixed_precision != "bf16":
        raise ValueError(f"train.mixed_precision={mixed_precision!r}: expected 'no' or 'bf16'")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_module(module: nn.Module, mesh, max_params: int = DEFAULT_UNIT_PARAMS, mp_policy=None) -> nn.Module:
    """Shard `module` in place: each of `shard_units`, then the root. Returns `module` (now an FSDPModule).
    mp_policy: a `MixedPrecisionPolicy` (`mixed_precision_policy`), None = none. A module that is already an
    FSDPModule (built sharded: `distar.worlds.build_sharded_bundle`) is returned as it is."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(module, FSDPModule):
        return module
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for unit in shard_units(module, max_params):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, **kw)
    fully_shard(module, mesh=mesh, reshard_after_forward=True, **kw)
    for name in ("encode", "decode"):  # entry points besides forward (a VAE's) must all-gather too
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return module


def shard_frozen(bundle: ModelBundle, mesh, frozen_min_params: int = FROZEN_MIN_PARAMS,
                 max_params: int = DEFAULT_UNIT_PARAMS, mp_policy=None) -> list[nn.Module]:
    """Shard the bundle's module reference and its big frozen modules; returns those sharded."""
    chosen: list[nn.Module] = []
    ref = getattr(bundle, "reference", None)
    if isinstance(ref, nn.Module):
        chosen.append(ref)
    for m in bundle.frozen_modules():
        if _numel(m) >= frozen_min_params and all(m is not c for c in chosen):
            chosen.append(m)
    for m in chosen:
        if any(p.requires_grad for p in m.parameters()):
            raise ValueError(f"shard_frozen: {type(m).__name__} has parameters that require grad")
        shard_module(m, mesh, max_params, mp_policy)
    return chosen


def _reshard_all(net: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _int_keyed(osd: dict) -> dict:
    """A full optimizer state dict keyed by parameter name -> `Optimizer.state_dict()`'s integer keys."""
    index: dict[str, int] = {}
    groups = []
    for g in osd["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def _name_keyed(osd: dict, net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The inverse of `_int_keyed` for `opt` over `net`'s parameters."""
    names = {id(p): n for n, p in net.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {order[int(i)]: v for i, v in osd["state"].items()}, "param_groups": groups}


class FSDPStateIO(StateIO):
    """`StateIO` for modules sharded with FSDP2 (see the module docstring)."""

    collective = True

    def __init__(self, rank: int):
        self.rank = rank

    def _gather_ema(self, state: TrainState) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out = {}
        for k, s in state.ema.shadow.items():  # same order on every rank: built from named_parameters
            full = s.full_tensor() if isinstance(s, DTensor) else s
            if self.rank == 0:
                out[k] = full.detach().to("cpu", copy=True)
            del full
        return out

    def gather(self, state: TrainState) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        gen, fake = unwrap(state.generator), unwrap(state.fake_score)
        parts = dict(generator=get_model_state_dict(gen, options=opts),
                     fake_score=get_model_state_dict(fake, options=opts),
                     generator_opt=get_optimizer_state_dict(gen, state.generator_opt, options=opts),
                     fake_opt=get_optimizer_state_dict(fake, state.fake_opt, options=opts))
        shadow = self._gather_ema(state)
        if self.rank != 0:
            return {}, {}
        generator_state = dict(parts["generator"])
        for k, s in shadow.items():
            generator_state[k] = s.to(generator_state[k].dtype)  # the same tensor when float32
        parts["generator_opt"], parts["fake_opt"] = _int_keyed(parts["generator_opt"]), _int_keyed(parts["fake_opt"])
        return generator_state, resume_dict(state, ema={"decay": state.ema.decay, "shadow": shadow}, **parts)

    def export(self, state: TrainState) -> tuple[dict | None, tuple | None]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        gen = get_model_state_dict(unwrap(state.generator), options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
        shadow = self._gather_ema(state)
        if self.rank != 0:
            return None, None
        for k, s in shadow.items():
            gen[k] = s.to(gen[k].dtype)
        return gen, ckpt.adapters_of(state, shadow)

    def save_step(self, state: TrainState, run_dir: Path, rng: dict, config_yaml: str, meta: dict) -> Path | None:
        """A sharded checkpoint (module docstring); every rank returns the same outcome: the path, or the error."""
        import torch.distributed as dist

        final = ckpt.step_dir(run_dir, state.step)
        tmp = final.with_name(f".{final.name}.tmp-sharded")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
            tmp.mkdir(parents=True)
        dist.barrier()
        ok, error = torch.ones(1, device=state.bundle.device), None
        try:
            with ckpt.write_errors(run_dir, state.step):
                sharded_state.save(state, tmp / ckpt.SHARDS_DIR, collective=True)
                if self.rank == 0:
                    torch.save(ckpt.progress_dict(state, rng), tmp / ckpt.PROGRESS_FILE)
                    (tmp / ckpt.CONFIG_FILE).write_text(config_yaml)
                    ckpt.write_meta_last(tmp, meta)
                    ckpt.rename_into_place(tmp, final)
                    ckpt.point_latest(final)
        except ckpt.CheckpointError as err:
            ok.zero_()
            error = err
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # rank 0 alone may fail in its part: no rank waits forever
        if self.rank == 0 and not ok.item():
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok.item():
            raise error or ckpt.CheckpointError(f"the step-{state.step} checkpoint failed on rank 0; see its log")
        return final if self.rank == 0 else None

    def load(self, state: TrainState, ckpt_dir: Path) -> dict | None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        if ckpt.is_sharded(ckpt_dir):
            return ckpt.load_sharded(state, Path(ckpt_dir), collective=True)
        saved = ckpt.load_train_state(ckpt_dir, map_location="cpu", mmap=True)
        opts = StateDictOptions(full_state_dict=True)
        for net, opt, key, opt_key in ((state.generator, state.generator_opt, "generator", "generator_opt"),
                                       (state.fake_score, state.fake_opt, "fake_score", "fake_opt")):
            net = unwrap(net)
            set_model_state_dict(net, saved[key], options=opts)
            set_optimizer_state_dict(net, opt, _name_keyed(saved[opt_key], net, opt), options=opts)
        self._load_ema(state, saved["ema"])
        return restore_progress(state, saved)

    def _load_ema(self, state: TrainState, saved: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = dict(unwrap(state.generator).named_parameters())
        shadow = {}
        for k, full in saved["shadow"].items():
            p = params[k]
            if isinstance(p, DTensor):  # this rank's chunk, cut locally (src_data_rank=None: no communication)
                shadow[k] = distribute_tensor(full.float().to(p.device), p.device_mesh, p.placements,
                                              src_data_rank=None)
            else:
                shadow[k] = full.float().to(p.device, copy=True)
        state.ema.decay = float(saved["decay"])
        state.ema.shadow = shadow

    def load_weights(self, net: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(net, full_state, options=StateDictOptions(full_state_dict=True))

    @contextmanager
    def averaged_generator(self, state: TrainState) -> Iterator[nn.Module]:
        """The sharded generator itself with the EMA weights swapped in (this rank's shards), swapped back after."""
        net = unwrap(state.generator)
        params = dict(net.named_parameters())
        raw = {k: params[k].detach().clone() for k in state.ema.shadow}
        was_training = net.training
        _reshard_all(net)
        state.ema.copy_to(net)
        try:
            yield net.eval()
        finally:
            _reshard_all(net)
            with torch.no_grad():
                for k, v in raw.items():
                    params[k].copy_(v)
            net.train(was_training)


def fsdp_hooks(mesh, rank: int, max_params: int = DEFAULT_UNIT_PARAMS,
               frozen_min_params: int = FROZEN_MIN_PARAMS, mixed_precision: str = "no") -> dict:
    """The `LoopHooks` fields for FSDP2 on `mesh`: shard, wrap, prepare_bundle, state_io.
    With `shard` the loop builds the SD worlds' UNets already sharded (`distar.worlds.build_sharded_bundle`); wrap
    and prepare_bundle then shard what is not yet (other worlds' modules, big frozen text encoders).
    mixed_precision: train.mixed_precision, applied to every sharded module (`mixed_precision_policy`)."""
    policy = mixed_precision_policy(mixed_precision)

    def shard(net: nn.Module) -> nn.Module:
        return shard_module(net, mesh, max_params, policy)

    return dict(shard=shard, wrap=shard,
                prepare_bundle=lambda bundle: shard_frozen(bundle, mesh, frozen_min_params, max_params, policy),
                state_io=FSDPStateIO(rank))
