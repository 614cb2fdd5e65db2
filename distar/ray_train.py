"""Training on Ray Train: the loop entry (`run_on_ray`) and the per-worker function around `run_training`.

    summary = run_on_ray(load_config("digits_ray"))

The driver (this process, or a Ray Job's entrypoint) connects to Ray ($RAY_ADDRESS, else a private local
cluster), deploys the reward models as Serve applications when `reward.backend == 'serve'`, opens the
MLflow run, runs a `TorchTrainer` whose workers call the shared `run_training` with DDP (or FSDP2) hooks,
then registers the EMA generator. Checkpoints go through `ray.train.report`; re-running with the same
`ray.run_name` resumes from the newest, and `ray.max_failures` restarts dead workers from it.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, config_from_dict, dump_config

REPO_ROOT = Path(__file__).resolve().parents[1]  # holds services/ (not part of the installed package)


def _absolute(cfg: RunConfig) -> RunConfig:
    """Workers may run in another directory: make every path the driver means absolute."""
    name = cfg.ray.run_name or cfg.name
    storage = cfg.ray.storage_path or str(Path(cfg.train.out_dir).parent / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"out_dir": str(Path(cfg.train.out_dir).resolve())}),
        "ray": cfg.ray.model_copy(update={"run_name": name, "storage_path": storage})})


def _connect() -> bool:
    """Use the Ray already initialised or $RAY_ADDRESS; else start a private local cluster. True if we started it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if str(REPO_ROOT) not in sys.path and (REPO_ROOT / "services").is_dir():
        sys.path.append(str(REPO_ROOT))
    if ray.is_initialized():
        return False
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"env_vars": {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=True)
    return True


def _check_capacity(cfg: RunConfig) -> None:
    """Fail now, with numbers, rather than wait forever for resources the cluster does not have."""
    import ray

    if os.environ.get("DISTAR_SKIP_CAPACITY_CHECK") == "1":  # autoscaling clusters grow on demand
        return
    res = ray.cluster_resources()
    serve = cfg.reward.backend == "serve" and cfg.loss.alpha_rew > 0
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


def deploy_rewards(cfg: RunConfig) -> list[str]:
    """Start one Serve application per reward term (reusing any already running); returns those started."""
    from ray import serve

    from services.reward_service import app_name, reward_app

    serve.start(proxy_location="Disabled")
    running = serve.status().applications
    started = []
    for term in cfg.reward.terms:
        name = app_name(term.name)
        if name in running and str(running[name].status).endswith("RUNNING"):
            print(f"[distar] reward {term.name!r}: using the running Serve app {name!r}", flush=True)
            continue
        serve.run(reward_app(term, cfg.reward), name=name, route_prefix=None, logging_config={"log_level": "WARNING"})
        started.append(name)
    return started


def _train_worker(config: dict) -> None:
    """Runs in every Ray Train worker; torch.distributed is already initialised by TorchTrainer."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from . import checkpoint as ckpt
    from .train_loop import LoopHooks, resolve_device, run_training

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = resolve_device(cfg.train.device)
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

        strategy = fsdp_hooks(init_device_mesh(device.type, (world,)), rank)

    def reduce_metrics(ms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        keys = sorted(ms)  # FSDP's gradient norms are replicated DTensors
        ms = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in ms.items()}
        v = torch.stack([ms[k].detach().float().reshape(()).to(device) for k in keys])
        dist.all_reduce(v)
        v = (v / world).cpu()
        _maybe_fail(config.get("fault"), rank, seen)
        return dict(zip(keys, v))

    seen = {"checkpoint_step": -1}
    ray_ckpt = ray.train.get_checkpoint()
    with (ray_ckpt.as_directory() if ray_ckpt is not None else nullcontext(None)) as resume_dir:
        resumed = -1
        if resume_dir is not None:
            import json

            resumed = int(json.loads((Path(resume_dir) / ckpt.META_FILE).read_text())["step"])

        def on_checkpoint(step: int, path: Path | None, metrics: dict[str, float]) -> None:
            m = {k: float(v) for k, v in metrics.items()} | {"step": step, "resumed_from_step": resumed}
            if rank == 0:
                ray.train.report(m, checkpoint=Checkpoint.from_directory(str(path)))
            else:
                ray.train.report(m)
            seen["checkpoint_step"] = step

        # with FSDP every rank joins the image grid's forward, so every rank needs the hook (a no-op on rank > 0)
        images = bool(config.get("mlflow_run_id")) and (logger is not None or cfg.ray.strategy == "fsdp")
        hooks = LoopHooks(rank=rank, world_size=world, reduce_metrics=reduce_metrics, **strategy,
                          on_log=(lambda s, m: logger.metrics(s, m)) if logger else None,
                          on_images=(lambda s, im: logger and logger.images(s, im)) if images else None,
                          on_checkpoint=on_checkpoint, barrier=dist.barrier, progress=False,
                          resume_from_out_dir=False)
        reward = None
        if cfg.reward.backend == "serve" and cfg.loss.alpha_rew > 0:
            from .remote_reward import RemoteRewardClient

            reward = RemoteRewardClient.from_config(cfg.reward)
        run_training(cfg, device=device, hooks=hooks, reward_client=reward,
                     resume_dir=Path(resume_dir) if resume_dir is not None else None)


def _maybe_fail(fault: dict | None, rank: int, seen: dict) -> None:
    """Test hook: kill this worker once, after a checkpoint at or beyond fault['after_step'] was reported."""
    if not fault or rank != fault["rank"] or seen["checkpoint_step"] < fault["after_step"]:
        return
    marker = Path(fault["marker"])
    if not marker.exists():
        marker.write_text(str(seen["checkpoint_step"]))
        # Ray Train's controller registers a reported checkpoint when it next polls the workers; a worker
        # that dies before that poll restarts the group from the previous one. Give it time to poll, as a
        # real failure (not milliseconds after a report) would. Rank 0 waits in the next all-reduce meanwhile.
        time.sleep(float(fault.get("delay_s", 3.0)))
        os._exit(1)


def run_on_ray(cfg: RunConfig, *, _fault: dict | None = None) -> dict:
    """Train per `cfg` on Ray (Train workers, Serve rewards, MLflow); returns a summary dict."""
    cfg = _absolute(cfg)
    started_ray = _connect()
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
        if cfg.reward.backend == "serve" and cfg.loss.alpha_rew > 0:
            deployed = deploy_rewards(cfg)
        summary = _fit(cfg, uri, run_id, _fault) if cfg.ray.num_workers > 0 else _in_driver(cfg, uri, run_id)
        ok = True
    finally:
        if run_id is not None:
            tracking.finish_run(uri, run_id, ok)
        if deployed:
            from ray import serve

            for name in deployed:
                serve.delete(name)
        if started_ray:
            import ray

            ray.shutdown()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _fit(cfg: RunConfig, uri: str | None, run_id: str | None, fault: dict | None) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = cfg.ray.gpus_per_worker
    scaling = ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpus > 0,
                            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": gpus} if gpus else {})})
    run_config = RayRunConfig(
        name=cfg.ray.run_name, storage_path=cfg.ray.storage_path,
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures, controller_failure_limit=0),
        checkpoint_config=CheckpointConfig(num_to_keep=2))
    loop_config = {"cfg": cfg.model_dump(mode="json"), "mlflow_uri": uri, "mlflow_run_id": run_id, "fault": fault}
    result = TorchTrainer(_train_worker, train_loop_config=loop_config, scaling_config=scaling,
                          run_config=run_config).fit()
    if result.error is not None:
        raise result.error
    summary = {"run_name": cfg.ray.run_name, "workers": cfg.ray.num_workers, "strategy": cfg.ray.strategy,
               "final_dir": str(Path(cfg.train.out_dir) / "final"), "checkpoint": result.checkpoint.path,
               **(result.metrics or {})}
    if run_id is not None:
        summary["mlflow_run_id"] = run_id
        if cfg.mlflow.registered_model:
            from .tracking import register_generator

            with result.checkpoint.as_directory() as d:
                summary.update(register_generator(uri, run_id, Path(d), cfg.mlflow.registered_model, cfg.mlflow.alias))
    return summary


def _in_driver(cfg: RunConfig, uri: str | None, run_id: str | None) -> dict:
    """ray.num_workers=0: the loop runs here, still with Serve rewards and MLflow when configured."""
    from .train_loop import LoopHooks, run_training

    logger = None
    if run_id is not None:
        from .tracking import RunLogger

        logger = RunLogger(uri, run_id)
    reward = None
    if cfg.reward.backend == "serve" and cfg.loss.alpha_rew > 0:
        from .remote_reward import RemoteRewardClient

        reward = RemoteRewardClient.from_config(cfg.reward)
    hooks = LoopHooks(on_log=(lambda s, m: logger.metrics(s, m)) if logger else None,
                      on_images=(lambda s, im: logger.images(s, im)) if logger else None)
    result = run_training(cfg, hooks=hooks, reward_client=reward)
    summary = {"run_name": cfg.ray.run_name, "workers": 0, "final_dir": str(result.final_dir),
               **(result.history[-1] if result.history else {})}
    if run_id is not None:
        summary["mlflow_run_id"] = run_id
        if cfg.mlflow.registered_model:
            from .tracking import register_generator

            summary.update(register_generator(uri, run_id, result.final_dir, cfg.mlflow.registered_model,
                                              cfg.mlflow.alias))
    return summary
