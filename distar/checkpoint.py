"""Training checkpoints, written atomically, and the exportable generator directory.

Layout of a checkpoint directory (also what `distar generate --model DIR` and serving load):
    config.yaml              the resolved RunConfig
    generator.safetensors    the EMA generator's full state dict (what gets served and registered); not in
                             sharded checkpoints, nor in a LoRA run's step checkpoints
    pytorch_lora_weights.safetensors  LoRA runs: the EMA adapters in diffusers' format (`distar.lora_files`)
    meta.json                step, metrics at save time, the size of each other file (written last)
    train_state.pt           whole-module runs (one process, DDP): everything needed to resume: raw generator,
                             fake score (trained parameters only: a LoRA run's adapters), both optimizers,
                             EMA shadow, step, RNG state (absent in export-only directories); only tensors and
                             plain python values, so it loads with `weights_only=True`
    shards/, progress.pt     sharded runs (FSDP) instead of train_state.pt: each rank's shards of the same
                             trained state written by torch.distributed.checkpoint (`distar.sharded_state`),
                             and step, RNG states and controller (rank 0, `weights_only`). They load into any
                             number of ranks, or one process. docs/checkpoints.md has the whole story.

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

from . import lora_files, sharded_state
from .bundle import unwrap
from .ema import EMA
from .errors import CheckpointError, UserError  # noqa: F401  (CheckpointError: also imported from here)

if TYPE_CHECKING:
    from .train_step import TrainState

GENERATOR_FILE = "generator.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
SHARDS_DIR = "shards"
PROGRESS_FILE = "progress.pt"
ADAPTER_FILE = lora_files.ADAPTER_FILE


def _contiguous_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def write_atomic_dir(final: Path, write: callable) -> Path:
    """Call `write(tmpdir)` then rename tmpdir to `final` (replacing an older one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        rename_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def rename_into_place(tmp: Path, final: Path) -> None:
    """fsync every file under the written directory `tmp`, then rename it to `final` (replacing an older one)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_meta_last(tmp: Path, meta: dict[str, Any]) -> None:
    """meta.json with the size of every file written so far (relative paths): a resume trusts only this."""
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2, default=float))


def save_generator_dir(out: Path, generator_state: dict[str, torch.Tensor] | None, config_yaml: str,
                       meta: dict[str, Any], train_state: dict[str, Any] | None = None,
                       adapters: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
    """A model directory: `generator_state` (None: none), `adapters` (EMA adapter state, LoRA config) in
    diffusers' LoRA file, config.yaml, `train_state` when given, meta.json last."""
    def write(tmp: Path) -> None:
        if generator_state is not None:
            save_file(_contiguous_cpu(generator_state), str(tmp / GENERATOR_FILE))
        if adapters is not None:
            lora_files.save_adapters(tmp, *adapters)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        write_meta_last(tmp, meta)

    return write_atomic_dir(Path(out), write)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def point_latest(path: Path) -> None:
    write_text_atomic(path.parent / "latest", path.name + "\n")


def save_step_checkpoint(run_dir: Path, step: int, **kwargs) -> Path:
    """checkpoints/step_XXXXXXX under `run_dir`, then point `latest` at it. A failed write (a full disk)
    leaves the earlier checkpoints as they were and raises a CheckpointError that says so."""
    with write_errors(run_dir, step):
        path = save_generator_dir(step_dir(run_dir, step), **kwargs)
        point_latest(path)
    return path


@contextmanager
def write_errors(run_dir: Path, step: int) -> Iterator[None]:
    """A failed checkpoint write (OSError; torch.save's RuntimeError) as one CheckpointError line."""
    ckpt_root = Path(run_dir) / "checkpoints"
    try:
        yield
    except (OSError, RuntimeError, sharded_state.CheckpointException) as err:  # torch.save: RuntimeError
        before = resume_candidates(run_dir)
        kept = f"the newest complete checkpoint {before[0]} is intact: free space and run the same command again to " \
               f"resume from it" if before else "there is no earlier checkpoint"
        free = f"{shutil.disk_usage(ckpt_root).free / 2**20:.1f} MiB free there" if ckpt_root.is_dir() else "no directory"
        raise CheckpointError(f"could not write the step-{step} checkpoint under {ckpt_root} ({free}; "
                              f"{type(err).__name__}: {str(err).strip()[:300]}); {kept}") from err


def _resumable(p: Path) -> bool:
    return (p / STATE_FILE).is_file() or ((p / PROGRESS_FILE).is_file() and (p / SHARDS_DIR).is_dir())


def is_sharded(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / SHARDS_DIR).is_dir() and not (Path(ckpt_dir) / STATE_FILE).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under `run_dir`, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if _resumable(cand):
            return cand
    done = sorted(p for p in root.glob("step_*") if _resumable(p)) if root.is_dir() else []
    return done[-1] if done else None


def resume_candidates(run_dir: Path) -> list[Path]:
    """Checkpoint directories under `run_dir`/checkpoints that hold every file, newest first."""
    root = Path(run_dir) / "checkpoints"
    names = (CONFIG_FILE, META_FILE)
    found = [p for p in root.glob("step_*") if _resumable(p) and all((p / n).is_file() for n in names)] \
        if root.is_dir() else []
    return sorted(found, reverse=True)


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints (an incomplete one is never counted or touched:
    it is under a temporary name until meta.json is written); returns those deleted."""
    if keep < 1:
        raise ValueError(f"train.keep_checkpoints={keep}: keep at least the newest checkpoint (or None for all)")
    done = [p for p in resume_candidates(run_dir) if (p / META_FILE).is_file()]
    for old in done[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return done[keep:]


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
        for name in (GENERATOR_FILE, ADAPTER_FILE):
            if name in meta.get("files", {}):
                with safe_open(str(ckpt_dir / name), "pt") as f:
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


def load_train_state(ckpt_dir: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                     name: str = STATE_FILE) -> dict[str, Any]:
    """The resume state of a checkpoint. `weights_only=True`: tensors and plain values only, so a file from
    someone else cannot run code; anything else is refused with a CheckpointError naming the file."""
    path = Path(ckpt_dir) / name
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

    def export(self, state: "TrainState") -> tuple[dict | None, tuple | None]:
        """(EMA generator state, LoRA adapters or None) for a model directory; what rank 0 gets is written."""
        return ema_generator_state(state), adapters_of(state, state.ema.shadow)

    def save_step(self, state: "TrainState", run_dir: Path, rng: dict, config_yaml: str, meta: dict) -> Path | None:
        """The step checkpoint (train_state.pt format); returns its directory on the rank that wrote it."""
        generator_state, train_state = self.gather(state)
        adapters = adapters_of(state, state.ema.shadow)
        return save_step_checkpoint(run_dir, state.step, generator_state=None if adapters else generator_state,
                                    adapters=adapters, config_yaml=config_yaml, meta=meta,
                                    train_state={**train_state, "rng": rng})

    def load(self, state: "TrainState", ckpt_dir: Path) -> dict | None:
        """Resume from a checkpoint directory of either format; returns the saved loop RNG (`restore_progress`)."""
        if is_sharded(ckpt_dir):
            return load_sharded(state, Path(ckpt_dir), collective=self.collective)
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


def progress_dict(state: "TrainState", rng: dict) -> dict:
    """What a sharded checkpoint keeps beside its shards (progress.pt): step, flags, controller, RNG states."""
    full = resume_dict(state, {}, {}, {}, {}, {})
    return {k: full[k] for k in ("step", "fake_warmup_done", "alpha_controller")} | \
        {"rng": rng, "ema_decay": state.ema.decay}


def load_sharded(state: "TrainState", ckpt_dir: Path, collective: bool) -> dict | None:
    """Resume from a sharded checkpoint (any world size wrote it); returns the saved loop RNG."""
    saved = load_train_state(ckpt_dir, name=PROGRESS_FILE)
    sharded_state.load(state, ckpt_dir / SHARDS_DIR, collective)
    state.ema.decay = float(saved["ema_decay"])
    return restore_progress(state, saved)


def adapters_of(state: "TrainState", shadow: dict) -> tuple[dict, dict] | None:
    """(EMA adapter state, LoRA config) when the generator trains LoRA adapters, else None."""
    config = lora_files.lora_config(unwrap(state.generator))
    return (shadow, config) if config is not None and shadow else None


def trained(net: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` without `net`'s frozen parameters (a LoRA base is rebuilt from the config, never checkpointed)."""
    frozen = {k for k, p in net.named_parameters() if not p.requires_grad}
    return {k: v for k, v in sd.items() if k not in frozen}


def _load_trained(net: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    frozen = {k for k, p in net.named_parameters() if not p.requires_grad}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - frozen:
        raise CheckpointError(f"{what} in the checkpoint does not fit this run's model (missing "
                              f"{sorted(set(missing) - frozen)[:3]}, unexpected {sorted(unexpected)[:3]})")


def state_dict_for_resume(state: "TrainState") -> dict:
    gen, fake = unwrap(state.generator), unwrap(state.fake_score)
    return resume_dict(state, trained(gen, gen.state_dict()), trained(fake, fake.state_dict()),
                       state.generator_opt.state_dict(), state.fake_opt.state_dict(), state.ema.state_dict())


def load_resume_state(state: "TrainState", saved: dict) -> dict | None:
    _load_trained(unwrap(state.generator), saved["generator"], "the generator")
    _load_trained(unwrap(state.fake_score), saved["fake_score"], "the fake score")
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
    """Start from a finished run: its (EMA) generator, and its fake score when the directory has one (a model
    directory, a train_state.pt step checkpoint, or a sharded one written by any number of ranks)."""
    io = state_io or StateIO()
    gen = unwrap(state.generator)
    if is_sharded(src):
        sharded_state.load_weights(state, src / SHARDS_DIR, collective=io.collective)
        state.ema = EMA(gen, ema_decay)
        state.fake_warmup_done = True
        return
    io.load_weights(gen, load_generator_state(src))
    state.ema = EMA(gen, ema_decay)
    if (src / STATE_FILE).is_file():
        io.load_weights(unwrap(state.fake_score), load_train_state(src)["fake_score"])
        state.fake_warmup_done = True  # the fake score already tracks this generator
