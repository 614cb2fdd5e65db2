"""Training on Ray Train: the loop entry (`run_on_ray`) and the per-worker function around `run_training`.

    summary = run_on_ray(load_config("digits_ray"))

The driver (this process, or a Ray Job's entrypoint) connects to Ray ($RAY_ADDRESS, else a private local
cluster), has the reward models deployed as Serve applications when `reward.backend == 'serve'` (the
caller passes `services.reward_service.deploy_rewards`: this layer sits below services/), opens the MLflow
run, runs a `TorchTrainer` whose workers call the shared `run_training` with DDP (or FSDP2) hooks, then
registers the EMA generator from the run's own `final/` directory. Checkpoints go through
`ray.train.report`; re-running with the same `ray.run_name` resumes from the newest, and
`ray.max_failures` restarts dead workers from it: the newest complete checkpoint on the run's storage
(`train.out_dir`), or the one Ray recorded when that is newer (`_resume_point`).

Output: the workers' log lines stay in Ray's log files (`ray.log_to_driver`, default off), and the driver
prints each logged step once, read from the run's metrics.jsonl, so Ray's own chatter does not bury it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import ConfigError, RewardConfig, RunConfig, config_from_dict, dump_config
from .stopping import StopSignals, TrainingStopped

log = logging.getLogger(__name__)
STOP_REQUEST = ".stop_requested"  # in train.out_dir: the driver got SIGINT/SIGTERM; workers save and return
DeployRewards = Callable[[RewardConfig], list[str]]


def _absolute(cfg: RunConfig) -> RunConfig:
    """Workers may run in another directory: make every path the driver means absolute."""
    name = cfg.ray.run_name or cfg.name
    storage = cfg.ray.storage_path or str(Path(cfg.train.out_dir).parent / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"out_dir": str(Path(cfg.train.out_dir).resolve())}),
        "ray": cfg.ray.model_copy(update={"run_name": name, "storage_path": storage})})


def connect(log_to_driver: bool = False) -> bool:
    """Use the Ray already initialised or $RAY_ADDRESS; else start a private local cluster. True if we started it.

    Ray's own driver-side logging is turned down to WARNING; `log_to_driver` forwards worker output."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in ("ray", "ray.serve", "mlflow"):  # their INFO lines would bury the run's own progress
        logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    kwargs = dict(log_to_driver=log_to_driver, logging_level=logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        return False
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "MLFLOW_TRACKING_URI") if k in os.environ}
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env} if env else None, **kwargs)
    return True


def _check_capacity(cfg: RunConfig) -> None:
    """Fail now, with numbers, rather than wait forever for resources the cluster does not have."""
    import ray

    if os.environ.get("DISTAR_SKIP_CAPACITY_CHECK") == "1":  # autoscaling clusters grow on demand
        return
    res = ray.cluster_resources()
    serve = cfg.reward.backend == "serve" and cfg.loss.uses_reward
    replicas = len(cfg.reward.terms) * (cfg.reward.max_replicas or cfg.reward.num_replicas) if serve else 0
    for kind, per_worker, per_replica in (("CPU", cfg.ray.cpus_per_worker, cfg.reward.replica_cpus),
                                          ("GPU", cfg.ray.gpus_per_worker, cfg.reward.replica_gpus)):
        need = cfg.ray.num_workers * per_worker + replicas * per_replica
        if need > res.get(kind, 0.0) + 1e-9:
            raise ConfigError(
                f"the Ray cluster has {res.get(kind, 0.0):g} {kind}s but this run needs {need:g} "
                f"(ray.num_workers={cfg.ray.num_workers} x {per_worker:g} + {replicas} reward replicas x "
                f"{per_replica:g}); lower ray.cpus_per_worker / reward.replica_cpus, or set "
                f"DISTAR_SKIP_CAPACITY_CHECK=1 on an autoscaling cluster")


def reward_client(cfg: RunConfig):
    """The one reward-client factory: Serve deployments (reward.backend=serve), else None (the loop builds
    the rewards in process)."""
    if cfg.reward.backend != "serve" or not cfg.loss.uses_reward:
        return None
    from .remote_reward import RemoteRewardClient

    return RemoteRewardClient.from_config(cfg.reward)


def _train_worker(config: dict) -> None:
    """Runs in every Ray Train worker; torch.distributed is already initialised by TorchTrainer."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from . import checkpoint as ckpt
    from .device import pick_device
    from .train_loop import LoopHooks, run_training

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)

    logger = None
    if config.get("mlflow_run_id") and rank == 0:
        from .tracking import RunLogger

        logger = RunLogger(config["mlflow_uri"], config["mlflow_run_id"])

    def wrap(net: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(net, device_ids=[device] if device.type == "cuda" else None)

    strategy: dict = {"wrap": wrap}
    if cfg.ray.strategy == "fsdp":  # shards generator, fake score and the big frozen modules (distar.fsdp)
        from torch.distributed.device_mesh import init_device_mesh

        from .fsdp import fsdp_hooks

        strategy = fsdp_hooks(init_device_mesh(device.type, (world,)), rank,
                              mixed_precision=cfg.train.mixed_precision)

    def reduce_metrics(ms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        keys = sorted(ms)  # FSDP's gradient norms are replicated DTensors
        ms = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in ms.items()}
        v = torch.stack([ms[k].detach().float().reshape(()).to(device) for k in keys])
        dist.all_reduce(v)
        v = (v / world).cpu()
        return dict(zip(keys, v))

    def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t, device=device) for _ in range(world)]
        dist.all_gather(out, t.to(device))
        return [o.cpu() for o in out]

    stop_file = Path(cfg.train.out_dir) / STOP_REQUEST
    ray_ckpt = ray.train.get_checkpoint()
    with (ray_ckpt.as_directory() if ray_ckpt is not None else nullcontext(None)) as ray_dir:
        resumed, resume_dir = _resume_point(ray_dir, Path(cfg.train.out_dir), device)

        def on_checkpoint(step: int, path: Path | None, metrics: dict[str, float]) -> None:
            m = {k: float(v) for k, v in metrics.items()} | {"step": step, "resumed_from_step": resumed}
            if rank == 0:
                ray.train.report(m, checkpoint=Checkpoint.from_directory(str(path)))
            else:
                ray.train.report(m)

        # with FSDP every rank joins the image grid's forward, so every rank needs the hook (a no-op on rank > 0)
        images = bool(config.get("mlflow_run_id")) and (logger is not None or cfg.ray.strategy == "fsdp")
        hooks = LoopHooks(rank=rank, world_size=world, reduce_metrics=reduce_metrics, **strategy,
                          reduce_signal=lambda v: reduce_metrics({"signal": v})["signal"], all_gather=all_gather,
                          on_log=(lambda s, m: logger.metrics(s, m)) if logger else None,
                          on_images=(lambda s, im: logger and logger.images(s, im)) if images else None,
                          on_checkpoint=on_checkpoint, barrier=dist.barrier, progress=False,
                          resume_from_out_dir=False, should_stop=lambda: float(reduce_metrics(
                              {"stop": torch.tensor(float(stop_file.exists()))})["stop"]) > 0)
        try:
            run_training(cfg, device=device, hooks=hooks, reward_client=reward_client(cfg),
                         resume_dir=Path(resume_dir) if resume_dir is not None else None)
        except TrainingStopped:
            return  # the step's checkpoint is written and reported; the driver says so


def _resume_point(ray_dir: str | None, out_dir: Path, device: torch.device) -> tuple[int, Path | None]:
    """(step, directory) to resume from: the newer of the checkpoint Ray's controller hands back and the newest
    complete one on the run's own storage (out_dir/checkpoints). A checkpoint whose files are complete is a
    checkpoint even when the worker died before the controller recorded its report (that window opens at
    every checkpoint). The ranks agree on the smallest of their newest steps, so a rank that cannot see
    out_dir (another node, no shared storage) makes them all take Ray's. (-1, None): start from scratch."""
    import torch.distributed as dist

    from . import checkpoint as ckpt

    options: dict[int, Path] = {}
    for cand in ckpt.resume_candidates(out_dir):
        try:
            options[int(ckpt.check_complete(cand)["step"])] = cand
            break
        except ckpt.CheckpointError as err:
            log.warning("not resuming from %s: %s", cand, err)
    if ray_dir is not None:
        options.setdefault(int(json.loads((Path(ray_dir) / ckpt.META_FILE).read_text())["step"]), Path(ray_dir))
    newest = torch.tensor([max(options, default=-1)], device=device)
    dist.all_reduce(newest, op=dist.ReduceOp.MIN)
    step = int(newest.item())
    return step, options.get(step)


def run_on_ray(cfg: RunConfig, *, deploy_rewards: DeployRewards | None = None,
               stop: StopSignals | None = None) -> dict:
    """Train per `cfg` on Ray (Train workers, Serve rewards, MLflow); returns a summary dict.

    With reward.backend=serve, `deploy_rewards(cfg.reward)` starts the apps that are not running and
    returns their names (deleted again at the end); None means they were deployed beforehand. `stop`
    (installed here, after Ray's own SIGTERM handler): on a signal every rank saves the current step and
    returns; the summary then has `stopped_by` and nothing is registered."""
    cfg = _absolute(cfg)
    started_ray = connect(cfg.ray.log_to_driver)
    stop_file = Path(cfg.train.out_dir) / STOP_REQUEST
    stop_file.unlink(missing_ok=True)  # a request left by an earlier, killed driver
    if stop is not None:
        stop.on_stop = lambda: stop_file.parent.mkdir(parents=True, exist_ok=True) or stop_file.touch()
        stop.__enter__()
    t0 = time.perf_counter()
    deployed: list[str] = []
    uri = run_id = None
    ok = False
    try:
        _check_capacity(cfg)
        if cfg.mlflow.enabled:
            from . import tracking

            uri = tracking.tracking_uri(cfg.mlflow)
            run_id = tracking.start_run(uri, cfg, dump_config(cfg), cfg.ray.run_name)
        if cfg.reward.backend == "serve" and cfg.loss.uses_reward and deploy_rewards is not None:
            deployed = deploy_rewards(cfg.reward)
        with _echo_progress(cfg):
            summary = _fit(cfg, uri, run_id) if cfg.ray.num_workers > 0 else _in_driver(cfg, uri, run_id, stop)
        if stop is not None and stop():
            summary["stopped_by"] = stop.name
        elif run_id is not None:
            summary["mlflow_run_id"] = run_id
            summary.update(_register(cfg, uri, run_id, Path(summary["final_dir"])))
        ok = True
    finally:
        if stop is not None:
            stop.__exit__(None, None, None)
            stop_file.unlink(missing_ok=True)
        if run_id is not None:
            try:
                tracking.finish_run(uri, run_id, ok)
            except Exception as err:  # the tracking server is gone: the run's outcome is already decided
                log.warning("could not mark MLflow run %s %s at %s: %s", run_id, "finished" if ok else "failed", uri, err)
        if deployed:
            from ray import serve

            for name in deployed:
                serve.delete(name)
        if started_ray:
            import ray

            ray.shutdown()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _register(cfg: RunConfig, uri: str, run_id: str, final_dir: Path) -> dict:
    """The one registration path: the run's own final/ directory (already on storage), never a Ray download.
    When MLflow cannot take it, the model stays in final/ and the error gives the command for later."""
    if not cfg.mlflow.registered_model:
        return {}
    from .tracking import RegistrationError, register_command, register_generator

    try:
        return register_generator(uri, run_id, final_dir, cfg.mlflow.registered_model, cfg.mlflow.alias)
    except Exception as err:  # the server is gone, the store is full, ...: training itself is done
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise RegistrationError(f"training finished and the model is in {final_dir}, but registering it as "
                                f"{cfg.mlflow.registered_model!r} in MLflow at {uri} failed ({type(err).__name__}: "
                                f"{reason}). Register it later with: {register_command(cfg.train.out_dir, uri)}") from err


@contextmanager
def _echo_progress(cfg: RunConfig, every_s: float = 0.5) -> Iterator[None]:
    """Print each line rank 0 appends to metrics.jsonl, once, while the run is going (workers' own output
    stays in Ray's logs unless ray.log_to_driver)."""
    path = Path(cfg.train.out_dir) / "metrics.jsonl"
    seen = len(path.read_text().splitlines()) if path.is_file() else 0
    stop = threading.Event()

    def echo() -> None:
        nonlocal seen
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines[seen:]:
            try:
                m = json.loads(line)
            except json.JSONDecodeError:  # a line being written: read it next time
                break
            from .train_loop import progress_line

            log.info("step %d/%d: %s", int(m["step"]), cfg.train.steps, progress_line(m))
            seen += 1

    def loop() -> None:
        while not stop.wait(every_s):
            echo()

    thread = threading.Thread(target=loop, daemon=True)
    if cfg.ray.num_workers > 0:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
            echo()


def _fit(cfg: RunConfig, uri: str | None, run_id: str | None) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = cfg.ray.gpus_per_worker
    scaling = ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpus > 0,
                            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": gpus} if gpus else {})})
    run_config = RayRunConfig(
        name=cfg.ray.run_name, storage_path=cfg.ray.storage_path,
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures, controller_failure_limit=0),
        checkpoint_config=CheckpointConfig(num_to_keep=2))
    loop_config = {"cfg": cfg.model_dump(mode="json"), "mlflow_uri": uri, "mlflow_run_id": run_id}
    result = TorchTrainer(_train_worker, train_loop_config=loop_config, scaling_config=scaling,
                          run_config=run_config).fit()
    if result.error is not None:
        raise result.error
    return {"run_name": cfg.ray.run_name, "workers": cfg.ray.num_workers, "strategy": cfg.ray.strategy,
            "final_dir": str(Path(cfg.train.out_dir) / "final"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None, **(result.metrics or {})}


def _in_driver(cfg: RunConfig, uri: str | None, run_id: str | None, stop: StopSignals | None = None) -> dict:
    """ray.num_workers=0: the loop runs here, still with Serve rewards and MLflow when configured."""
    from .train_loop import LoopHooks, run_training

    logger = None
    if run_id is not None:
        from .tracking import RunLogger

        logger = RunLogger(uri, run_id)
    hooks = LoopHooks(on_log=(lambda s, m: logger.metrics(s, m)) if logger else None,
                      on_images=(lambda s, im: logger.images(s, im)) if logger else None, should_stop=stop)
    try:
        result = run_training(cfg, hooks=hooks, reward_client=reward_client(cfg))
    except TrainingStopped as done:
        return {"run_name": cfg.ray.run_name, "workers": 0, "step": done.step,
                "checkpoint": str(done.checkpoint) if done.checkpoint else None}
    return {"run_name": cfg.ray.run_name, "workers": 0, "final_dir": str(result.final_dir),
            **(result.history[-1] if result.history else {})}
