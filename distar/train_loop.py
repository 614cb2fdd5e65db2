"""The training loop around `train_step`: batching prompts, logging, evaluation, checkpoints, resume.

It runs as-is in one process (`distar train` with ray.num_workers=0) and inside each Ray Train worker,
which passes `LoopHooks` for the parts that differ (DDP wrapping or FSDP sharding, cross-rank metric
averaging, reporting checkpoints to Ray, MLflow). How trained state is read and written is a `StateIO`:
whole modules (`distar.checkpoint.StateIO`), sharded ones in `distar.fsdp`. Nothing here imports Ray or torch.distributed, or reads
the environment.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .bundle import ModelBundle, unwrap
from .checkpoint import StateIO
from .config import ConfigError, RunConfig, dump_config
from .device import pick_device
from .ema import EMA
from .progress import progress
from .prompts import load_prompts
from .rewards import LocalRewardClient, build_weighted_reward
from .rewards.base import RewardClient
from .hacking_monitor import HackingMonitor
from .reward_weight import build_alpha_controller
from .stopping import TrainingStopped
from .train_step import TrainState, build_optimizer, fake_update, finalize_interval_metrics, train_step
from .worlds import build_bundle, build_sharded_bundle

log = logging.getLogger(__name__)


def _identity(x):
    return x


@dataclass
class LoopHooks:
    rank: int = 0
    world_size: int = 1
    shard: Callable[[nn.Module], nn.Module] | None = None  # FSDP: shards a module in place; the bundle is then
    # built with its big networks already sharded where the world can (distar.worlds.build_sharded_bundle)
    wrap: Callable[[nn.Module], nn.Module] = _identity                     # e.g. DDP, or FSDP2 sharding
    prepare_bundle: Callable[[ModelBundle], None] = lambda bundle: None    # before wrap, e.g. shard the reference
    state_io: StateIO = field(default_factory=StateIO)
    reduce_metrics: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = _identity
    on_log: Callable[[int, dict[str, float]], None] | None = None         # rank 0 only
    on_checkpoint: Callable[[int, Path, dict[str, float]], None] | None = None  # every rank, after rank 0 wrote
    on_images: Callable[[int, torch.Tensor], None] | None = None  # rank 0; every rank if state_io.collective
    barrier: Callable[[], None] = lambda: None
    reduce_signal: Callable[[torch.Tensor], torch.Tensor] | None = None  # the alpha controller's, across ranks
    all_gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # every rank's CPU tensor (RNG states)
    progress: bool = True
    should_stop: Callable[[], bool] | None = None  # polled after each step (a SIGINT/SIGTERM flag); True: save, stop
    resume_from_out_dir: bool = True  # False under Ray Train: resume only from the checkpoint Ray hands back

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainResult:
    final_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _seeded(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)


def build_state(cfg: RunConfig, device: torch.device, hooks: LoopHooks) -> TrainState:
    if hooks.shard is None:
        bundle = build_bundle(cfg.model, device)
    else:
        bundle = build_sharded_bundle(cfg.model, device, hooks.shard)
    hooks.prepare_bundle(bundle)
    g, f = cfg.train.generator_optim, cfg.train.fake_optim
    return TrainState(
        bundle=bundle,
        generator=hooks.wrap(bundle.generator),
        fake_score=hooks.wrap(bundle.fake_score),
        generator_opt=build_optimizer(bundle.generator, g.lr, g.betas, g.weight_decay, g.eps),
        fake_opt=build_optimizer(bundle.fake_score, f.lr, f.betas, f.weight_decay, f.eps),
        ema=EMA(bundle.generator, cfg.train.ema_decay),
        alpha_controller=build_alpha_controller(cfg.loss),
        fake_warmup_done=bool(getattr(bundle, "fake_score_matched", False)),
        signal_reduce=hooks.reduce_signal,
    )


def _check_resumable(cfg: RunConfig, ckpt_dir: Path) -> None:
    """Refuse to resume a run whose model or loss differ from this config (a different experiment). The saved
    config is validated first, so settings added since it was written compare at their defaults."""
    import yaml

    from .config import config_from_dict

    saved_file = ckpt_dir / ckpt.CONFIG_FILE
    if not saved_file.is_file():
        return
    raw = yaml.safe_load(saved_file.read_text())
    try:
        saved = yaml.safe_load(dump_config(config_from_dict(raw)))
    except ConfigError:
        saved = raw  # not valid any more: compare as written (and most likely refuse)
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


@dataclass
class _Session:
    """One run of the loop on one rank: its state, prompts, randomness and output directory."""
    cfg: RunConfig
    hooks: LoopHooks
    state: TrainState
    prompts: list[str]
    rng: torch.Generator
    out_dir: Path
    config_yaml: str
    reward: RewardClient | None
    history: list[dict[str, float]] = field(default_factory=list)
    monitor: HackingMonitor | None = None
    stopped_by_monitor: bool = False
    best_saved: bool = False

    @property
    def joins(self) -> bool:
        """Ranks that take part in evaluation, image grids and gathering state."""
        return self.hooks.is_main or self.hooks.state_io.collective

    def batch(self) -> list[str]:
        idx = torch.randint(len(self.prompts), (self.cfg.train.batch_size,), generator=self.rng)
        return [self.prompts[i] for i in idx.tolist()]

    def rng_states(self) -> dict:
        """Every rank's randomness (the step's generator: noise, timesteps, prompt order; torch's global one),
        so a resumed run draws what the uninterrupted one would have. A collective with `hooks.all_gather`."""
        loop = self.rng.get_state()
        mine = torch.cat([loop, torch.get_rng_state()])
        every = self.hooks.all_gather(mine) if self.hooks.all_gather is not None else [mine]
        return {"loop": [t[:loop.numel()].clone() for t in every], "torch": [t[loop.numel():].clone() for t in every]}

    def restore_rng(self, saved: dict | None) -> None:
        """This rank's states from `rng_states`, when the checkpoint has one per rank of this world (else the
        step-seeded generator stays: a checkpoint from before RNG states were saved, or another world size)."""
        if saved is not None and len(saved.get("loop", [])) == self.hooks.world_size:
            self.rng.set_state(saved["loop"][self.hooks.rank])
            torch.set_rng_state(saved["torch"][self.hooks.rank])

    def save_model_dir(self, name: str, metrics: dict[str, float]) -> None:
        """best/ or final/: the EMA generator (and a LoRA run's adapters, pytorch_lora_weights.safetensors)."""
        generator_state, adapters = self.hooks.state_io.export(self.state) if self.joins else (None, None)
        if self.hooks.is_main:
            ckpt.save_generator_dir(self.out_dir / name, generator_state, self.config_yaml,
                                    {"step": self.state.step, "metrics": metrics}, adapters=adapters)

    def save_best(self, metrics: dict[str, float]) -> None:
        self.save_model_dir("best", metrics)
        self.best_saved = True
        self.hooks.barrier()

    def save(self, final: bool, metrics: dict[str, float]) -> Path | None:
        """The step checkpoint (and final/), then prune to train.keep_checkpoints once it is complete."""
        path = None
        rng = self.rng_states()
        if self.joins:
            path = self.hooks.state_io.save_step(self.state, self.out_dir, rng, self.config_yaml,
                                                 {"step": self.state.step, "metrics": metrics})
        if self.hooks.is_main and self.cfg.train.keep_checkpoints is not None:
            ckpt.prune_checkpoints(self.out_dir, self.cfg.train.keep_checkpoints)
        if final and self.stopped_by_monitor and self.cfg.train.monitor.action == "keep_best" and self.best_saved:
            if self.hooks.is_main:
                ckpt.write_atomic_dir(self.out_dir / "final", lambda tmp: _copy_dir(self.out_dir / "best", tmp))
        elif final:
            self.save_model_dir("final", metrics)
        self.hooks.barrier()
        if self.hooks.on_checkpoint is not None:
            self.hooks.on_checkpoint(self.state.step, path, metrics)
        return path

    def stop_requested(self) -> bool:
        return self.hooks.should_stop is not None and self.hooks.should_stop()

    def save_and_stop(self, last: dict[str, float]) -> None:
        """On a stop request: this step's checkpoint (unless the regular one was just written), then raise."""
        every = self.cfg.train.checkpoint_every
        just_saved = every and self.state.step % every == 0
        path = ckpt.step_dir(self.out_dir, self.state.step) if just_saved else self.save(False, last)
        raise TrainingStopped(self.state.step, path)

    def log(self, sums: dict[str, torch.Tensor], count: int, seconds: float) -> dict[str, float]:
        """Reduce the interval's metrics across ranks, evaluate, and write/report them (rank 0)."""
        reduced = self.hooks.reduce_metrics({k: v / count for k, v in sums.items()})
        last = finalize_interval_metrics({k: float(v) for k, v in reduced.items()})
        last["perf/images_per_s"] = count * self.cfg.train.batch_size * self.hooks.world_size / max(seconds, 1e-9)
        last["step"] = self.state.step
        evaluation = _evaluate(self.state, self.cfg.train.seed + 7, self.hooks.state_io) if self.joins else {}
        if self.hooks.is_main:
            last.update(evaluation)
            self.history.append(last)
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(last) + "\n")
            log.info("step %d/%d: %s", self.state.step, self.cfg.train.steps, progress_line(last))
            if self.hooks.on_log is not None:
                self.hooks.on_log(self.state.step, last)
        return last

    def watch(self, metrics: dict[str, float]) -> bool:
        """The reward-hacking monitor on this evaluation (every rank sees the same reduced metrics); True = stop.
        A new best held-out value saves best/ (the EMA generator); keep_best makes it the run's final/."""
        if self.monitor is None:
            return False
        best = stop = False
        if self.hooks.is_main:  # rank 0 holds the evaluation; the decision is shared below
            decision = self.monitor.observe(self.state.step, metrics)
            best, stop = decision.best_step == self.state.step, decision.should_stop
            if decision.triggered:
                log.warning("reward-hacking monitor (step %d): %s", self.state.step, decision.reason)
        flags = self.hooks.reduce_metrics({"best": torch.tensor(float(best)), "stop": torch.tensor(float(stop))})
        if float(flags["best"]) > 0 and self.cfg.train.monitor.action == "keep_best":
            self.save_best(metrics)
        return float(flags["stop"]) > 0

    def images(self) -> None:
        if self.joins:
            _emit_images(self.state, self.prompts, self.hooks, self.cfg.train.seed)


def progress_line(metrics: dict[str, float]) -> str:
    """The few numbers a person watches, in one line (the full set goes to metrics.jsonl and MLflow)."""
    keys = ("gen/loss", "fake/loss", "reward/total", "gen/score_gap", "reward/alpha_rew",
            "eval/frechet", "eval/judge_accuracy", "eval/energy_distance", "perf/images_per_s")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def _start(cfg: RunConfig, device: torch.device, hooks: LoopHooks, reward_client: RewardClient | None,
           resume_dir: Path | None) -> _Session:
    """Build the state; resume (or init_from); pick prompts and the step's randomness; write config.yaml."""
    out_dir = Path(cfg.train.out_dir)
    torch.manual_seed(cfg.train.seed + hooks.rank)
    state = build_state(cfg, device, hooks)
    if reward_client is None and cfg.reward.terms and cfg.loss.uses_reward:
        reward_client = LocalRewardClient(build_weighted_reward(cfg.reward, device))
    candidates = [Path(resume_dir)] if resume_dir is not None else \
        ckpt.resume_candidates(out_dir) if hooks.resume_from_out_dir else []
    saved_rng = _resume(cfg, state, hooks, candidates) if candidates else None
    if not candidates and cfg.train.init_from is not None:
        ckpt.init_from_checkpoint(state, Path(cfg.train.init_from), cfg.train.ema_decay, hooks.state_io)
    session = _Session(cfg, hooks, state, training_prompts(cfg, state.bundle), _seeded(cfg.train.seed, hooks.rank, state.step), out_dir,
                       dump_config(cfg), reward_client,
                       monitor=HackingMonitor(cfg.train.monitor) if cfg.train.monitor is not None else None)
    session.restore_rng(saved_rng)
    if hooks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(session.config_yaml)
        control = f" (adaptive, target {cfg.loss.alpha_control.signal}={cfg.loss.alpha_control.target:g})" \
            if cfg.loss.alpha_control is not None else ""
        log.info("%s: world=%s divergence=%s distance=%s c=%g (%s) lambda(t)=%s alpha_rew=%g%s device=%s workers=%d",
                 cfg.name, cfg.model.world, cfg.loss.divergence, cfg.loss.distance, cfg.loss.c, cfg.loss.c_scale,
                 cfg.loss.weighting, cfg.loss.alpha_rew, control, device, hooks.world_size)
    return session


def _resume(cfg: RunConfig, state: TrainState, hooks: LoopHooks, candidates: list[Path]) -> dict | None:
    """Load the newest of `candidates` that is complete and readable (a truncated or corrupted one is skipped
    with a warning that names it); returns its saved RNG. None loads: a CheckpointError naming each."""
    bad = []
    for cand in candidates:
        try:
            ckpt.check_complete(cand)
            _check_resumable(cfg, cand)
            saved_rng = hooks.state_io.load(state, cand)
        except ckpt.CheckpointError as err:
            log.warning("cannot resume from %s, trying the previous checkpoint: %s", cand, err)
            bad.append(str(err))
            continue
        if hooks.is_main:
            log.info("resumed from %s at step %d", cand, state.step)
        return saved_rng
    raise ckpt.CheckpointError(f"no checkpoint of train.out_dir {str(cfg.train.out_dir)!r} can be resumed: "
                               + "; ".join(bad) + ". Move the bad ones away (or choose a new train.out_dir) "
                               "to start over")


def training_prompts(cfg: RunConfig, bundle: ModelBundle) -> list[str]:
    """cfg.prompts, else cfg.prompts_file, else the world's own prompt set."""
    if cfg.prompts:
        return list(cfg.prompts)
    if cfg.prompts_file:
        try:
            return [p.text for p in load_prompts(cfg.prompts_file)]
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"prompts_file: {err}") from None
    return list(bundle.training_prompts())


def _warm_up_fake(run: _Session) -> None:
    """Fake-score updates on the generator's samples before the first generator update (once per run)."""
    cfg, state = run.cfg, run.state
    if state.fake_warmup_done:
        return
    show = run.hooks.is_main and run.hooks.progress
    for _ in progress(range(cfg.train.fake_warmup_steps), desc="fake warm-up", enabled=show):
        if run.stop_requested():
            raise TrainingStopped(state.step, None)
        p = run.batch()
        fake_update(state, state.bundle.encode_prompts(p), len(p), cfg.loss, cfg.train.grad_clip, run.rng)
    state.fake_warmup_done = True


def run_training(cfg: RunConfig, *, device: torch.device | None = None, hooks: LoopHooks | None = None,
                 reward_client: RewardClient | None = None, resume_dir: Path | None = None) -> TrainResult:
    """Train per `cfg`; resumes from the newest checkpoint under `cfg.train.out_dir` (or `resume_dir`)."""
    hooks = hooks or LoopHooks()
    device = device or pick_device(cfg.train.device)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    run = _start(cfg, device, hooks, reward_client, resume_dir)
    _warm_up_fake(run)
    state, train = run.state, cfg.train
    sums: dict[str, torch.Tensor] = {}
    count, t_interval, last = 0, time.perf_counter(), {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.mixed_precision == "bf16")
    steps = progress(range(state.step, train.steps), desc=cfg.name, total=train.steps - state.step,
                     enabled=hooks.is_main and hooks.progress)
    for _ in steps:
        with autocast:
            m = train_step(state, run.batch(), cfg.loss, fake_steps=train.fake_steps, grad_clip=train.grad_clip,
                           reward=run.reward, rng=run.rng)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count += 1
        if state.step % train.log_every == 0 or state.step == train.steps:
            last = run.log(sums, count, time.perf_counter() - t_interval)
            sums, count, t_interval = {}, 0, time.perf_counter()
            if run.watch(last):
                run.stopped_by_monitor = True
                break
        if train.sample_every and state.step % train.sample_every == 0:
            run.images()
        if train.checkpoint_every and state.step % train.checkpoint_every == 0 and state.step < train.steps:
            run.save(False, last)
        if state.step < train.steps and run.stop_requested():
            run.save_and_stop(last)
    run.images()
    run.save(True, last)
    return TrainResult(final_dir=(run.out_dir / "final") if hooks.is_main else None, history=run.history,
                       seconds=time.perf_counter() - t0)


def _copy_dir(src: Path, dst: Path) -> None:
    import shutil

    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)


@torch.no_grad()
def _emit_images(state: TrainState, prompts: list[str], hooks: LoopHooks, seed: int) -> None:
    if hooks.on_images is None or not hasattr(state.bundle, "sample_grid"):
        return
    grid_prompts = [prompts[i % len(prompts)] for i in range(16)]
    net = unwrap(state.generator)
    hooks.on_images(state.step, state.bundle.sample_grid(net, grid_prompts, torch.Generator().manual_seed(seed)))
