"""MLflow tracking and registry for training runs: one MLflow run per training run, logged from rank 0.

    uri = tracking_uri(cfg.mlflow)                         # cfg, else $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    run_id = start_run(uri, cfg)                           # in the driver, before workers start (creates the DB)
    log = RunLogger(uri, run_id); log.metrics(step, {...}); log.images(step, images)      # rank 0
    finish_run(uri, run_id, ok=True)
    register_generator(uri, run_id, checkpoint_dir, "distar-digits", "champion")  # -> models:/distar-digits@champion
    register_run(run_dir)                                  # later, from a finished run's final/ (`distar register`)

A tracking server that goes away mid-run costs one warning and at most `RunLogger.wait_s` of training time:
`RunLogger` then stops sending (the numbers stay in the run's metrics.jsonl) and training goes on. A
registration that fails leaves the model in final/ and raises a RegistrationError that gives the
`distar register` command for later.

A re-run with the same run name continues the same MLflow run (found by the tag `distar.run_name`). The
registered model is a pyfunc (models-from-code, distar.serving.pyfunc) whose artifact is the generator's
diffusers pipeline (distar.export), so `DiffusionPipeline.from_pretrained`, `mlflow.pyfunc.load_model`,
`distar generate --model models:/NAME@ALIAS` and serving all load the same files (distar.model_registry).
"""
from __future__ import annotations

import json
import logging
import queue
import shlex
import tempfile
import threading
import time
from pathlib import Path

import torch

from .checkpoint import ADAPTER_FILE, CONFIG_FILE, GENERATOR_FILE, is_model_dir
from .errors import UserError
from .images import grid, save_grid_png
from .model_registry import tracking_uri  # noqa: F401 - the URI rule lives with the registry

RUN_NAME_TAG = "distar.run_name"
MODEL_ARTIFACT = "generator"
LORA_ARTIFACT = "lora_adapters"
log = logging.getLogger(__name__)


class RegistrationError(UserError):
    """The generator could not be registered; the message says where it is and how to register it later."""


def mlflow_client(uri: str):
    """An MlflowClient for tracking and registry at `uri`."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment `name`, created (artifacts beside a SQLite database) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in whatever the cwd of a worker is
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(uri: str, cfg, config_yaml: str, run_name: str) -> str:
    """Create (or find, for a resumed run) the MLflow run of `run_name`; logs the resolved config once."""
    from mlflow.entities import Param

    client = mlflow_client(uri)
    exp_id = experiment_id(client, uri, cfg.mlflow.experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, "distar.world": cfg.model.world})
    import yaml

    params = [Param(k, v[:6000]) for k, v in _flatten(yaml.safe_load(config_yaml)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.log_text(run.info.run_id, config_yaml, "config.yaml")
    return run.info.run_id


def finish_run(uri: str, run_id: str, ok: bool) -> None:
    mlflow_client(uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


class RunLogger:
    """Metrics and image grids of one run (use on rank 0 only), sent by one background thread. Each call waits
    until it is sent, at most `wait_s`: a server that answers is synchronous; one that hangs or is gone costs
    training at most `wait_s` once. The first failure or overlong wait is one warning; after a failure nothing
    more is sent (the numbers stay in the run's metrics.jsonl). Tracking never stops training."""

    def __init__(self, uri: str, run_id: str, wait_s: float = 30.0):
        self.client, self.run_id, self.uri, self.wait_s = mlflow_client(uri), run_id, uri, wait_s
        self.gone = self._slow = self._warned = False
        self._queue: queue.Queue = queue.Queue(maxsize=1000)
        threading.Thread(target=self._sender, name="mlflow-run-logger", daemon=True).start()

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("MLflow at %s %s; training continues (metrics stay in the run's metrics.jsonl)", self.uri, message)

    def _sender(self) -> None:
        while True:
            step, send = self._queue.get()
            try:
                if not self.gone:
                    send()
            except Exception as err:  # MlflowException, requests' errors, OSError: the server is not there
                self.gone = True
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                self._warn(f"failed at step {step} ({type(err).__name__}: {reason}): nothing more is sent to it")
            finally:
                self._queue.task_done()

    def _submit(self, step: int, send) -> None:
        if self.gone:
            return
        try:
            self._queue.put_nowait((step, send))
        except queue.Full:
            self._warn(f"has fallen {self._queue.maxsize} calls behind at step {step}: dropping what does not fit")
            return
        if self._slow:
            return
        with self._queue.all_tasks_done:
            sent = self._queue.all_tasks_done.wait_for(lambda: self._queue.unfinished_tasks == 0, self.wait_s)
        if not sent and not self.gone:
            self._slow = True
            self._warn(f"has not answered for {self.wait_s:g} s at step {step}: sending in the background from now on")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(step)) for k, v in values.items() if k != "step"]
        for i in range(0, len(ms), 200):
            self._submit(step, lambda batch=ms[i:i + 200]: self.client.log_batch(self.run_id, metrics=batch))

    def images(self, step: int, images: torch.Tensor) -> None:
        self._submit(step, lambda: self._images(step, images))

    def _images(self, step: int, images: torch.Tensor) -> None:
        """A grid of `images` as MLflow's step-indexed image (the UI shows it per step); 2-D points as a plot."""
        if images.dim() == 2:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_grid_png(images, Path(tmp) / f"step_{step:07d}.png")
                self.client.log_artifact(self.run_id, str(path), artifact_path="images")
            return
        self.client.log_image(self.run_id, grid(images), key="samples", step=int(step))


def pipeline_of(model_dir: Path, workdir: Path) -> Path:
    """The diffusers pipeline to register for `model_dir`: the directory itself (or its pipeline/) when the run
    already wrote one, else an export of its generator into `workdir` (distar.export); for a world without a
    pipeline form (the 2-D world) the checkpoint directory itself, which distar's loader reads."""
    from .export import NotExportable, export_model
    from .loading import is_pipeline_dir

    for candidate in (Path(model_dir), Path(model_dir) / "pipeline"):
        if is_pipeline_dir(candidate):
            return candidate
    try:
        return export_model(str(model_dir), Path(workdir) / "pipeline")
    except NotExportable as err:
        log.info("registering %s as distar's checkpoint format: %s", model_dir, err)
        return Path(model_dir)


def register_generator(uri: str, run_id: str, checkpoint_dir: Path, name: str, alias: str) -> dict[str, str]:
    """Log the EMA generator of `checkpoint_dir` (a run's final/, on the run's storage) as a pyfunc whose
    artifact is its diffusers pipeline (distar.serving.pyfunc), register a version, set `alias`. A LoRA run's
    adapters (final/pytorch_lora_weights.safetensors) are logged beside it as `lora_adapters/`, and the version's
    tag `distar.lora_adapters` gives their runs:/ URI (download it, then `pipe.load_lora_weights(dir)` on a
    pipeline whose UNet is the one the run started from, e.g. DMD2's: megabytes instead of a UNet)."""
    import mlflow

    from .serving.pyfunc import log_pyfunc

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    adapters = Path(checkpoint_dir) / ADAPTER_FILE
    tags = {"distar.run_id": run_id}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = pipeline_of(Path(checkpoint_dir), Path(tmp))
        with mlflow.start_run(run_id=run_id):
            info = log_pyfunc(pipeline, tmp, MODEL_ARTIFACT)
            if adapters.is_file():  # a LoRA run: its adapters too (load_lora_weights onto its starting UNet)
                mlflow.log_artifact(str(adapters), LORA_ARTIFACT)
                tags["distar.lora_adapters"] = f"runs:/{run_id}/{LORA_ARTIFACT}"
    client = mlflow_client(uri)
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return {"registered_model": name, "version": str(version.version), "alias": alias,
            "model_uri": f"models:/{name}@{alias}"}


def register_command(run_dir: str | Path, uri: str) -> str:
    """The shell command that registers a finished run's final/ later."""
    return f"distar register --run-dir {shlex.quote(str(run_dir))} --tracking-uri {shlex.quote(uri)}"


def register_run(run_dir: str | Path, uri: str | None = None, name: str | None = None,
                 alias: str | None = None) -> dict[str, str]:
    """Register `run_dir`/final (a finished `distar train` run) under its MLflow run (found by run name, or
    created), with the name and alias of the run's config unless given."""
    from .config import dump_config, load_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file() or not is_model_dir(run_dir / "final"):
        raise RegistrationError(f"{run_dir}: not a finished run (expected its train.out_dir, holding {CONFIG_FILE} "
                                f"and final/ with {GENERATOR_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE)
    uri = uri or tracking_uri(cfg.mlflow)
    name, alias = name or cfg.mlflow.registered_model, alias or cfg.mlflow.alias
    if not name:
        raise RegistrationError(f"{run_dir}: its config sets no mlflow.registered_model; pass --name")
    run_id = start_run(uri, cfg, dump_config(cfg), cfg.ray.run_name or cfg.name)
    out = register_generator(uri, run_id, run_dir / "final", name, alias)
    finish_run(uri, run_id, ok=True)
    return {"run_dir": str(run_dir), "mlflow_run_id": run_id, **out}
