"""The training loop around `train_step`: batching prompts, logging, evaluation, checkpoints, resume.

It runs as-is in one process (`distar train` with ray.num_workers=0) and inside each Ray Train worker,
which passes `LoopHooks` for the parts that differ (DDP wrapping or FSDP sharding, cross-rank metric
averaging, reporting checkpoints to Ray, MLflow). How trained state is read and written is a `StateIO`:
whole modules here, sharded ones in `distar.fsdp`. Nothing here imports Ray or torch.distributed, or reads
the environment.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from . import checkpoint as ckpt
from .bundle import ModelBundle, unwrap
from .config import RunConfig, dump_config
from .ema import EMA
from .prompts import load_prompts
from .rewards import LocalRewardClient, build_weighted_reward
from .rewards.base import RewardClient
from .train_step import TrainState, build_optimizer, fake_update, train_step
from .worlds import build_bundle


def _identity(x):
    return x


class StateIO:
    """Trained state in and out of the loop when every rank holds whole modules (one process, DDP).

    `distar.fsdp.FSDPStateIO` is the counterpart for sharded modules; its methods are collectives, which
    it says with `collective = True`: the loop then calls `gather`, `averaged_generator` (evaluation) and
    image grids on every rank, and only rank 0 writes and logs.
    """

    collective = False

    def gather(self, state: TrainState) -> tuple[dict, dict]:
        """(EMA generator state dict, resume state) as full tensors; what rank 0 gets is written."""
        return ema_generator_state(state), state_dict_for_resume(state)

    def load(self, state: TrainState, ckpt_dir: Path) -> None:
        """Resume from a checkpoint directory written from `gather`."""
        load_resume_state(state, ckpt.load_train_state(ckpt_dir, map_location=state.bundle.device))

    def load_weights(self, net: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
        net.load_state_dict(full_state)

    @contextmanager
    def averaged_generator(self, state: TrainState) -> Iterator[nn.Module]:
        """The generator with the EMA weights, for evaluation."""
        yield state.ema.averaged(unwrap(state.generator)).eval()


@dataclass
class LoopHooks:
    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] = _identity                     # e.g. DDP, or FSDP2 sharding
    prepare_bundle: Callable[[ModelBundle], None] = lambda bundle: None    # before wrap, e.g. shard the reference
    state_io: StateIO = field(default_factory=StateIO)
    reduce_metrics: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = _identity
    on_log: Callable[[int, dict[str, float]], None] | None = None         # rank 0 only
    on_checkpoint: Callable[[int, Path, dict[str, float]], None] | None = None  # every rank, after rank 0 wrote
    on_images: Callable[[int, torch.Tensor], None] | None = None  # rank 0; every rank if state_io.collective
    barrier: Callable[[], None] = lambda: None
    progress: bool = True
    resume_from_out_dir: bool = True  # False under Ray Train: resume only from the checkpoint Ray hands back

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainResult:
    final_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def _seeded(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)


def build_state(cfg: RunConfig, device: torch.device, hooks: LoopHooks) -> TrainState:
    bundle = build_bundle(cfg.model, device)
    hooks.prepare_bundle(bundle)
    g, f = cfg.train.generator_optim, cfg.train.fake_optim
    return TrainState(
        bundle=bundle,
        generator=hooks.wrap(bundle.generator),
        fake_score=hooks.wrap(bundle.fake_score),
        generator_opt=build_optimizer(bundle.generator, g.lr, g.betas, g.weight_decay, g.eps),
        fake_opt=build_optimizer(bundle.fake_score, f.lr, f.betas, f.weight_decay, f.eps),
        ema=EMA(bundle.generator, cfg.train.ema_decay),
    )


def resume_dict(state: TrainState, generator: dict, fake_score: dict, generator_opt: dict, fake_opt: dict,
                ema: dict) -> dict:
    """The resume state (train_state.pt) from full state dicts of each part."""
    return {"generator": generator, "fake_score": fake_score, "generator_opt": generator_opt,
            "fake_opt": fake_opt, "ema": ema, "step": state.step,
            "fake_warmup_done": state.fake_warmup_done}


def restore_progress(state: TrainState, saved: dict) -> None:
    state.step = int(saved["step"])
    state.fake_warmup_done = bool(saved.get("fake_warmup_done", True))


def state_dict_for_resume(state: TrainState) -> dict:
    return resume_dict(state, unwrap(state.generator).state_dict(), unwrap(state.fake_score).state_dict(),
                       state.generator_opt.state_dict(), state.fake_opt.state_dict(), state.ema.state_dict())


def load_resume_state(state: TrainState, saved: dict) -> None:
    unwrap(state.generator).load_state_dict(saved["generator"])
    unwrap(state.fake_score).load_state_dict(saved["fake_score"])
    state.generator_opt.load_state_dict(saved["generator_opt"])
    state.fake_opt.load_state_dict(saved["fake_opt"])
    state.ema.load_state_dict(saved["ema"])
    restore_progress(state, saved)


def ema_generator_state(state: TrainState) -> dict[str, torch.Tensor]:
    net = unwrap(state.generator)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    params = dict(net.named_parameters())
    for k, s in state.ema.shadow.items():
        sd[k] = s.to(dtype=params[k].dtype)
    return sd


def init_from_checkpoint(state: TrainState, src: Path, ema_decay: float, state_io: StateIO | None = None) -> None:
    """Start from a finished run: its (EMA) generator, and its fake score when the directory has one."""
    io = state_io or StateIO()
    gen = unwrap(state.generator)
    io.load_weights(gen, ckpt.load_generator_state(src))
    state.ema = EMA(gen, ema_decay)
    if (src / ckpt.STATE_FILE).is_file():
        io.load_weights(unwrap(state.fake_score), ckpt.load_train_state(src)["fake_score"])
        state.fake_warmup_done = True  # the fake score already tracks this generator


def _check_resumable(cfg: RunConfig, ckpt_dir: Path) -> None:
    """Refuse to resume a run whose model or loss differ from this config (a different experiment)."""
    import yaml

    from .config import ConfigError

    saved_file = ckpt_dir / ckpt.CONFIG_FILE
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text())
    now = yaml.safe_load(dump_config(cfg))
    for section in ("model", "loss"):
        if saved.get(section) != now.get(section):
            keys = sorted(k for k in set(saved.get(section, {})) | set(now.get(section, {}))
                          if saved.get(section, {}).get(k) != now.get(section, {}).get(k))
            raise ConfigError(f"train.out_dir {str(cfg.train.out_dir)!r} holds a run with different {section} settings "
                              f"({', '.join(f'{section}.{k}' for k in keys)}); resume it with the same config or "
                              f"choose a new train.out_dir")


def _evaluate(state: TrainState, rng_seed: int, state_io: StateIO) -> dict[str, float]:
    bundle = state.bundle
    if not hasattr(bundle, "evaluate"):
        return {}
    with state_io.averaged_generator(state) as net:
        return {f"eval/{k}": v for k, v in bundle.evaluate(net, torch.Generator().manual_seed(rng_seed)).items()}


def run_training(cfg: RunConfig, *, device: torch.device | None = None, hooks: LoopHooks | None = None,
                 reward_client: RewardClient | None = None, resume_dir: Path | None = None) -> TrainResult:
    """Train per `cfg`; resumes from the newest checkpoint under `cfg.train.out_dir` (or `resume_dir`)."""
    hooks = hooks or LoopHooks()
    device = device or resolve_device(cfg.train.device)
    out_dir = Path(cfg.train.out_dir)
    torch.manual_seed(cfg.train.seed + hooks.rank)
    state = build_state(cfg, device, hooks)
    io = hooks.state_io
    joins = hooks.is_main or io.collective  # ranks that take part in evaluation, image grids and gathering state
    if reward_client is None and cfg.reward.terms and cfg.loss.alpha_rew > 0:
        reward_client = LocalRewardClient(build_weighted_reward(cfg.reward, device))

    resume_dir = resume_dir or (ckpt.latest_checkpoint(out_dir) if hooks.resume_from_out_dir else None)
    if resume_dir is not None:
        _check_resumable(cfg, Path(resume_dir))
        io.load(state, Path(resume_dir))
        if hooks.is_main:
            print(f"[distar] resumed from {resume_dir} at step {state.step}", flush=True)
    elif cfg.train.init_from is not None:
        init_from_checkpoint(state, Path(cfg.train.init_from), cfg.train.ema_decay, io)
    rng = _seeded(cfg.train.seed, hooks.rank, state.step)

    prompts = list(cfg.prompts) or (
        [p.text for p in load_prompts(cfg.prompts_file)] if cfg.prompts_file else list(state.bundle.training_prompts()))
    bs = cfg.train.batch_size
    config_yaml = dump_config(cfg)
    if hooks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)
        print(f"[distar] {cfg.name}: world={cfg.model.world} divergence={cfg.loss.divergence} "
              f"distance={cfg.loss.distance} c={cfg.loss.c} lambda(t)={cfg.loss.weighting} "
              f"alpha_rew={cfg.loss.alpha_rew} device={device} workers={hooks.world_size}", flush=True)

    def batch_prompts() -> list[str]:
        idx = torch.randint(len(prompts), (bs,), generator=rng)
        return [prompts[i] for i in idx.tolist()]

    if not state.fake_warmup_done:
        for _ in range(cfg.train.fake_warmup_steps):
            p = batch_prompts()
            fake_update(state, state.bundle.encode_prompts(p), bs, cfg.loss, cfg.train.grad_clip, rng)
        state.fake_warmup_done = True

    history: list[dict[str, float]] = []
    sums: dict[str, torch.Tensor] = {}
    count, t_interval, t0 = 0, time.perf_counter(), time.perf_counter()
    bar = None
    if hooks.is_main and hooks.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=state.step, desc=cfg.name, dynamic_ncols=True, mininterval=2.0)

    def save(final: bool, metrics: dict[str, float]) -> Path | None:
        path = None
        if joins:
            generator_state, train_state = io.gather(state)
        if hooks.is_main:
            kwargs = dict(generator_state=generator_state, config_yaml=config_yaml,
                          meta={"step": state.step, "metrics": metrics}, train_state=train_state)
            path = ckpt.save_step_checkpoint(out_dir, state.step, **kwargs)
            if final:
                kwargs["train_state"] = None
                ckpt.save_generator_dir(out_dir / "final", **kwargs)
        hooks.barrier()
        if hooks.on_checkpoint is not None:
            hooks.on_checkpoint(state.step, path, metrics)
        return path

    last: dict[str, float] = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    while state.step < cfg.train.steps:
        with autocast:
            m = train_step(state, batch_prompts(), cfg.loss, fake_steps=cfg.train.fake_steps,
                           grad_clip=cfg.train.grad_clip, reward=reward_client, rng=rng)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count += 1
        if bar is not None:
            bar.update(1)
        log_now = state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps
        if log_now:
            dt = time.perf_counter() - t_interval
            reduced = hooks.reduce_metrics({k: v / count for k, v in sums.items()})
            last = {k: float(v) for k, v in reduced.items()}
            last["perf/images_per_s"] = count * bs * hooks.world_size / max(dt, 1e-9)
            last["step"] = state.step
            if joins:
                evaluation = _evaluate(state, cfg.train.seed + 7, io)
            if hooks.is_main:
                last.update(evaluation)
                history.append(last)
                with open(out_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(last) + "\n")
                if bar is not None:
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in last.items()
                                     if k in ("gen/loss", "fake/loss", "reward/total", "eval/energy_distance")})
                else:
                    print(f"[distar] step {state.step}: " + json.dumps({k: round(v, 5) for k, v in last.items()}),
                          flush=True)
                if hooks.on_log is not None:
                    hooks.on_log(state.step, last)
            sums, count, t_interval = {}, 0, time.perf_counter()
        if cfg.train.sample_every and state.step % cfg.train.sample_every == 0 and joins:
            _emit_images(state, prompts, hooks, cfg.train.seed)
        if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0 \
                and state.step < cfg.train.steps:
            save(False, last)
    if bar is not None:
        bar.close()
    if joins:
        _emit_images(state, prompts, hooks, cfg.train.seed)
    save(True, last)
    return TrainResult(final_dir=(out_dir / "final") if hooks.is_main else None, history=history,
                       seconds=time.perf_counter() - t0)


@torch.no_grad()
def _emit_images(state: TrainState, prompts: list[str], hooks: LoopHooks, seed: int) -> None:
    if hooks.on_images is None or not hasattr(state.bundle, "sample_grid"):
        return
    grid_prompts = [prompts[i % len(prompts)] for i in range(16)]
    net = unwrap(state.generator)
    hooks.on_images(state.step, state.bundle.sample_grid(net, grid_prompts, torch.Generator().manual_seed(seed)))
