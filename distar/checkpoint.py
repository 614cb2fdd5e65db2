"""Training checkpoints, written atomically, and the exportable generator directory.

Layout of a checkpoint directory (also what `distar generate --model DIR` and serving load):
    config.yaml              the resolved RunConfig
    generator.safetensors    the EMA generator's full state dict (what gets served and registered)
    meta.json                step, metrics at save time, the size of each other file (written last)
    train_state.pt           everything needed to resume: raw generator, fake score, both optimizers,
                             EMA shadow, step, RNG state (absent in export-only directories); only
                             tensors and plain python values, so it loads with `weights_only=True`

A directory is written under a temporary name and renamed into place, so a crash mid-write never leaves
a half checkpoint where a resume would find it. `latest` (a one-line file) names the newest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .bundle import unwrap
from .ema import EMA
from .errors import UserError

if TYPE_CHECKING:
    from .train_step import TrainState

GENERATOR_FILE = "generator.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be read (truncated, corrupted, not distar's) or written (disk full)."""


def _contiguous_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def write_atomic_dir(final: Path, write: callable) -> Path:
    """Call `write(tmpdir)` then rename tmpdir to `final` (replacing an older one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_generator_dir(out: Path, generator_state: dict[str, torch.Tensor], config_yaml: str,
                       meta: dict[str, Any], train_state: dict[str, Any] | None = None) -> Path:
    def write(tmp: Path) -> None:
        save_file(_contiguous_cpu(generator_state), str(tmp / GENERATOR_FILE))
        (tmp / CONFIG_FILE).write_text(config_yaml)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        (tmp / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2, default=float))

    return write_atomic_dir(Path(out), write)


def save_step_checkpoint(run_dir: Path, step: int, **kwargs) -> Path:
    """checkpoints/step_XXXXXXX under `run_dir`, then point `latest` at it. A failed write (a full disk)
    leaves the earlier checkpoints as they were and raises a CheckpointError that says so."""
    ckpt_root = Path(run_dir) / "checkpoints"
    try:
        path = save_generator_dir(ckpt_root / f"step_{step:07d}", **kwargs)
        write_text_atomic(ckpt_root / "latest", path.name + "\n")
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        before = resume_candidates(run_dir)
        kept = f"the newest complete checkpoint {before[0]} is intact: free space and run the same command again to " \
               f"resume from it" if before else "there is no earlier checkpoint"
        free = f"{shutil.disk_usage(ckpt_root).free / 2**20:.1f} MiB free there" if ckpt_root.is_dir() else "no directory"
        raise CheckpointError(f"could not write the step-{step} checkpoint under {ckpt_root} ({free}; "
                              f"{type(err).__name__}: {str(err).strip()[:300]}); {kept}") from err
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under `run_dir`, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def resume_candidates(run_dir: Path) -> list[Path]:
    """Checkpoint directories under `run_dir`/checkpoints that hold every file, newest first."""
    root = Path(run_dir) / "checkpoints"
    names = (STATE_FILE, GENERATOR_FILE, CONFIG_FILE, META_FILE)
    found = [p for p in root.glob("step_*") if all((p / n).is_file() for n in names)] if root.is_dir() else []
    return sorted(found, reverse=True)


def check_complete(ckpt_dir: Path) -> dict[str, Any]:
    """meta.json of `ckpt_dir` once every file is at the size meta.json recorded and its header reads; else
    a CheckpointError naming the checkpoint and what is wrong (truncation shows here; a flipped bit inside
    the tensors does not: that would need a hash of every file on every save)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / META_FILE).read_text())
        for name, size in meta.get("files", {}).items():
            if (ckpt_dir / name).stat().st_size != size:
                raise ValueError(f"{name} has {(ckpt_dir / name).stat().st_size} bytes, meta.json says {size}")
        with safe_open(str(ckpt_dir / GENERATOR_FILE), "pt") as f:
            f.keys()
    except Exception as err:  # JSONDecodeError, OSError, SafetensorError, the size check
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete or corrupted ({type(err).__name__}: "
                              f"{str(err).strip()[:300]})") from None
    return meta


def is_model_dir(path: str | Path) -> bool:
    """A directory `distar generate/serve/eval` can load: config.yaml + generator.safetensors."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / GENERATOR_FILE).is_file()


def load_generator_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(model_dir) / GENERATOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model directory {str(model_dir)!r}: no {GENERATOR_FILE} (expected a directory "
                                f"written by `distar train`)")
    return load_file(str(path))


def load_train_state(ckpt_dir: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The resume state of a checkpoint. `weights_only=True`: tensors and plain values only, so a file from
    someone else cannot run code; anything else is refused with a CheckpointError naming the file."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except Exception as err:  # UnpicklingError (refused object), RuntimeError/EOFError (truncated zip), ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a loadable training state ({type(err).__name__}: {reason[:300]}); it is "
                              f"truncated, corrupted or not written by distar (it is loaded with weights_only=True, "
                              f"so no pickled code in it was run)") from None


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Load a full state dict into `module`, cast to the module's dtypes; a key mismatch names `source`."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not fit {type(module).__name__} "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return module


# ------------------------------------------------------------------------------------ resume state
class StateIO:
    """Trained state in and out of the loop when every rank holds whole modules (one process, DDP).

    `distar.fsdp.FSDPStateIO` is the counterpart for sharded modules; its methods are collectives, which
    it says with `collective = True`: the loop then calls `gather`, `averaged_generator` (evaluation) and
    image grids on every rank, and only rank 0 writes and logs.
    """

    collective = False

    def gather(self, state: "TrainState") -> tuple[dict, dict]:
        """(EMA generator state dict, resume state) as full tensors; what rank 0 gets is written."""
        return ema_generator_state(state), state_dict_for_resume(state)

    def load(self, state: "TrainState", ckpt_dir: Path) -> dict | None:
        """Resume from a checkpoint directory written from `gather`; returns the saved loop RNG (`restore_progress`)."""
        return load_resume_state(state, load_train_state(ckpt_dir, map_location=state.bundle.device))

    def load_weights(self, net: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
        net.load_state_dict(full_state)

    @contextmanager
    def averaged_generator(self, state: "TrainState") -> Iterator[nn.Module]:
        """The generator with the EMA weights, for evaluation."""
        yield state.ema.averaged(unwrap(state.generator)).eval()


def resume_dict(state: "TrainState", generator: dict, fake_score: dict, generator_opt: dict, fake_opt: dict,
                ema: dict) -> dict:
    """The resume state (train_state.pt) from full state dicts of each part."""
    return {"generator": generator, "fake_score": fake_score, "generator_opt": generator_opt,
            "fake_opt": fake_opt, "ema": ema, "step": state.step,
            "fake_warmup_done": state.fake_warmup_done,
            "alpha_controller": state.alpha_controller.state_dict() if state.alpha_controller is not None else None}


def restore_progress(state: "TrainState", saved: dict) -> dict | None:
    """Step, warm-up flag and controller into `state`; returns the loop's saved RNG states (None in older
    checkpoints), which the loop restores: the step's generator and torch's global one."""
    state.step = int(saved["step"])
    state.fake_warmup_done = bool(saved.get("fake_warmup_done", True))
    if state.alpha_controller is not None and saved.get("alpha_controller") is not None:
        state.alpha_controller.load_state_dict(saved["alpha_controller"])
        state.alpha_rew = state.alpha_controller.value
    return saved.get("rng")


def state_dict_for_resume(state: "TrainState") -> dict:
    return resume_dict(state, unwrap(state.generator).state_dict(), unwrap(state.fake_score).state_dict(),
                       state.generator_opt.state_dict(), state.fake_opt.state_dict(), state.ema.state_dict())


def load_resume_state(state: "TrainState", saved: dict) -> dict | None:
    unwrap(state.generator).load_state_dict(saved["generator"])
    unwrap(state.fake_score).load_state_dict(saved["fake_score"])
    state.generator_opt.load_state_dict(saved["generator_opt"])
    state.fake_opt.load_state_dict(saved["fake_opt"])
    state.ema.load_state_dict(saved["ema"])
    return restore_progress(state, saved)


def ema_generator_state(state: "TrainState") -> dict[str, torch.Tensor]:
    net = unwrap(state.generator)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    params = dict(net.named_parameters())
    for k, s in state.ema.shadow.items():
        sd[k] = s.to(dtype=params[k].dtype)
    return sd


def init_from_checkpoint(state: "TrainState", src: Path, ema_decay: float, state_io: StateIO | None = None) -> None:
    """Start from a finished run: its (EMA) generator, and its fake score when the directory has one."""
    io = state_io or StateIO()
    gen = unwrap(state.generator)
    io.load_weights(gen, load_generator_state(src))
    state.ema = EMA(gen, ema_decay)
    if (src / STATE_FILE).is_file():
        io.load_weights(unwrap(state.fake_score), load_train_state(src)["fake_score"])
        state.fake_warmup_done = True  # the fake score already tracks this generator
