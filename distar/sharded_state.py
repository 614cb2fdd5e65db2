"""Trained state as a torch.distributed.checkpoint (DCP) directory: every rank writes its own shards.

    save(state, path, collective=True)   # all ranks: shards of generator, fake score, both optimizers, EMA
    load(state, path, collective=True)   # all ranks, any world size: DCP reshards to this run's sharding

What is saved (one DCP state dict, keys `generator`, `generator_opt`, `fake_score`, `fake_opt`, `ema`): the
trained parameters only (`ignore_frozen_params`: a LoRA run saves its adapters, never the frozen base, which
the run rebuilds from its config), both optimizers keyed by parameter name (`get_state_dict`), and the EMA
shadow. Sharded modules (FSDP2 DTensors) give each rank's shards; whole modules give full tensors, so a
checkpoint from N ranks loads into M ranks, or into one process (`collective=False`: no process group used).

Loading is as safe as `torch.load(weights_only=True)`: DCP's reader unpickles `.metadata` with plain `pickle`
and its planner loads non-tensor values with `weights_only=False`; `_SafeReader` and `_SafePlanner` allow
only DCP's own metadata classes and plain values, and refuse anything else with `UnsafeCheckpoint`.
"""
from __future__ import annotations

import io
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from .bundle import unwrap
from .errors import CheckpointError

__all__ = ["CheckpointException", "UnsafeCheckpoint", "load", "load_weights", "save", "state_dict"]

if TYPE_CHECKING:
    from .train_step import TrainState

_OPTIONS = StateDictOptions(ignore_frozen_params=True)
_SAFE_MODULES = ("torch.distributed.checkpoint.",)
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "dtype"), ("torch", "layout"),
                 ("torch", "memory_format"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
                 ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class UnsafeCheckpoint(RuntimeError):
    """A DCP directory whose metadata or values would run code when loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_SAFE_MODULES) or (module, name) in _SAFE_GLOBALS or \
                (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f".metadata refers to {module}.{name}, which a distar checkpoint never holds")


class _SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` unpickling admits DCP's metadata classes only."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyper-parameters) load with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def state_dict(state: "TrainState") -> dict[str, Any]:
    """The DCP state dict of `state`'s trained parts (references to the live tensors, sharded or whole)."""
    out: dict[str, Any] = {}
    for key, net, opt in (("generator", state.generator, state.generator_opt),
                          ("fake_score", state.fake_score, state.fake_opt)):
        out[key], out[f"{key}_opt"] = get_state_dict(unwrap(net), opt, options=_OPTIONS)
    out["ema"] = dict(state.ema.shadow)
    return out


def save(state: "TrainState", path: Path, collective: bool) -> None:
    """Write `state`'s shards under `path` (a collective over the default group when `collective`)."""
    dcp.save(state_dict(state), checkpoint_id=str(path), no_dist=not collective)


def load(state: "TrainState", path: Path, collective: bool) -> None:
    """Read a `save`d directory into `state`, whatever world size wrote it; the step and RNG are not here."""
    with _failures_as_checkpoint_error(path, "not loadable sharded training state"):
        target = state_dict(state)  # fresh optimizers get their state tensors here (a zero step at lr 0)
        _dcp_load(target, path, collective)
        for key, net, opt in (("generator", state.generator, state.generator_opt),
                              ("fake_score", state.fake_score, state.fake_opt)):
            set_state_dict(unwrap(net), opt, model_state_dict=target[key], optim_state_dict=target[f"{key}_opt"],
                           options=_OPTIONS)
        with torch.no_grad():
            for k, v in target["ema"].items():
                if state.ema.shadow[k] is not v:
                    state.ema.shadow[k].copy_(v)


def load_weights(state: "TrainState", path: Path, collective: bool) -> None:
    """`train.init_from` a sharded checkpoint: its EMA generator into `state.generator` and its fake score into
    `state.fake_score` (this run's sharding, any world size wrote it); optimizers, step and RNG start fresh.
    The caller rebuilds the EMA from the loaded generator."""
    gen, fake = unwrap(state.generator), unwrap(state.fake_score)
    with _failures_as_checkpoint_error(path, "train.init_from: its sharded state does not load into this run's "
                                             "model"):
        target = {"ema": {k: v.detach().clone() for k, v in state.ema.shadow.items()},
                  "fake_score": get_model_state_dict(fake, options=_OPTIONS)}
        _dcp_load(target, path, collective)
        set_model_state_dict(fake, target["fake_score"], options=_OPTIONS)
        params = dict(gen.named_parameters())
        with torch.no_grad():
            for k, v in target["ema"].items():  # float32 shadow -> the parameter's dtype (same sharding)
                params[k].copy_(v.to(params[k].dtype))


def _dcp_load(target: dict[str, Any], path: Path, collective: bool) -> None:
    dcp.load(target, storage_reader=_SafeReader(str(path)), planner=_SafePlanner(), no_dist=not collective)


@contextmanager
def _failures_as_checkpoint_error(path: Path, what: str) -> Iterator[None]:
    """Any failure inside (reading, or fitting what was read into the run's modules) is a CheckpointError naming
    `path` and each rank's distinct cause (DCP raises a BaseException subclass, with {rank: (exception, trace)})."""
    try:
        yield
    except (Exception, CheckpointException) as err:
        causes = [f[0] for f in getattr(err, "failures", {}).values()] or [err]
        reason = "; ".join(dict.fromkeys((str(e).strip() or type(e).__name__).splitlines()[0][:300] for e in causes))
        raise CheckpointError(f"{path}: {what} ({type(err).__name__}: {reason})") from None
