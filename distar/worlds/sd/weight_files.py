"""A UNet's weights read in pieces: which files hold them, their keys and shapes, and one rank's slice of a tensor.

    files = unet_weight_files("stabilityai/stable-diffusion-xl-base-1.0", "unet", None, "model.reference")
    weights = UNetWeights(files, "model.reference")
    weights.shapes                      # key -> shape, from the files' headers (no tensor is read)
    weights.read(key, (slice(0, 640),)) # rows 0..639 of one tensor, and nothing else

Files are found as diffusers finds them (`diffusion_pytorch_model[.variant].safetensors`, its sharded
`.safetensors.index[.variant].json` form, or the older `.bin` and its `.bin.index.json`), in a local folder or, for a hub id, through
huggingface_hub (the local cache when HF_HUB_OFFLINE=1). safetensors files are read with `safe_open(...).get_slice`,
torch files memory-mapped (`torch.load(mmap=True)`), so only the bytes of the requested slice are read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .loading import SDLoadError, _is_local, _read_state_dict


def _weight_names(variant: Optional[str]) -> list[str]:
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
    from diffusers.utils.hub_utils import _add_variant

    names = (SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    return [_add_variant(n, variant) for n in names]


def _shards(index: Path, fetch) -> list[Path]:
    """The files an index (`.safetensors.index.json`, `.bin.index.json`) names (each through `fetch(name)`)."""
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [fetch(n) for n in names]


def unet_weight_files(source: str, subfolder: Optional[str], variant: Optional[str], field: str,
                      what: str = "UNet") -> list[Path]:
    """The weights files of the diffusers UNet folder `source`/`subfolder` (local directory or hub id)."""
    names = _weight_names(variant)
    if _is_local(source):
        folder = Path(os.path.expanduser(source)) / (subfolder or "")
        for name in names:
            if (folder / name).is_file():
                if name.endswith(".json"):
                    return _shards(folder / name, lambda n: folder / n)
                return [folder / name]
        raise SDLoadError(f"{field}={source!r}: no {what} weights in {str(folder)!r} (expected one of {names})")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in names:
        try:
            path = Path(hf_hub_download(source, name, subfolder=subfolder))
        except Exception as err:  # not in the repo, not cached offline, no network: try the next form
            errors.append(f"{name}: {err}")
            continue
        if name.endswith(".json"):
            return _shards(path, lambda n: Path(hf_hub_download(source, n, subfolder=subfolder)))
        return [path]
    raise SDLoadError(f"{field}={source!r}: cannot find the {what} weights in subfolder {subfolder!r}: "
                      + "; ".join(errors))


class UNetWeights:
    """Key -> tensor of one UNet's weights files, read a slice at a time (module docstring)."""

    def __init__(self, files: list[Path], field: str):
        from safetensors import safe_open

        self.source = ", ".join(str(f) for f in files)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, object] = {}  # key -> safetensors handle, or a memory-mapped state dict
        for f in files:
            if f.suffix == ".safetensors":
                handle = safe_open(str(f), framework="pt")
                found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            else:
                handle = _read_state_dict(f, field, mmap=True)
                found = {k: tuple(v.shape) for k, v in handle.items()}
            twice = sorted(set(found) & set(self.shapes))
            if twice:
                raise SDLoadError(f"{field}={self.source!r}: key {twice[0]!r} is in more than one weights file")
            self.shapes.update(found)
            self._where.update(dict.fromkeys(found, handle))

    def close(self) -> None:
        """Drop the file handles and memory maps (their pages leave this process's RSS)."""
        self._where.clear()

    def __enter__(self) -> "UNetWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """`tensor[index]` of `key` in the file's dtype (a new tensor; only that slice is read)."""
        src = self._where[key]
        if isinstance(src, dict):
            return src[key][index].clone()
        if not index:  # a 0-d tensor
            return src.get_tensor(key)
        return src.get_slice(key)[index]


def local_index(p: torch.Tensor) -> tuple[slice, ...]:
    """The slice of the full tensor that this rank holds of `p` (a DTensor; a plain tensor: all of it)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return tuple(slice(0, n) for n in p.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # what DCP cuts with

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))
