"""The MLflow tracking URI rule, and `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) -> a local model
directory, from the MLflow registry.

The registered artifact is the diffusers pipeline that `distar export` writes (see distar.tracking; versions
registered before that hold a checkpoint directory), so anything that loads a model directory loads a
registered model too. Downloads are cached per tracking
URI, name and version under $XDG_CACHE_HOME/distar/registry (default ~/.cache).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from .checkpoint import GENERATOR_FILE

PIPELINE_META = "distar_one_step.json"  # marks an exported one-step pipeline (beside its model_index.json)

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class RegistryError(ValueError):
    """The URI names no registered model version that can be loaded; the message says why."""


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distar" / "registry"


def default_tracking_uri(mlflow_cfg=None, cwd: str | Path | None = None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory (absolute)."""
    uri = (mlflow_cfg.tracking_uri if mlflow_cfg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str((Path(cwd or os.getcwd()) / uri[len("sqlite:///"):]).resolve())
    return uri


tracking_uri = default_tracking_uri  # the name the rest of distar (and its users) call


def resolve_registry_uri(uri: str, tracking_uri: str | None = None) -> Path:
    """Download (once) the checkpoint directory of a registered model version and return its path."""
    m = _URI.match(uri)
    if m is None:
        raise RegistryError(f"--model {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    store = tracking_uri or default_tracking_uri()
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///"):]).is_file():
        raise RegistryError(f"--model {uri!r}: no MLflow database at {store[len('sqlite:///'):]} "
                            f"(run from the directory that holds mlflow.db, or set MLFLOW_TRACKING_URI)")
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = m["name"]
    try:
        mv = client.get_model_version_by_alias(name, m["alias"]) if m["alias"] else client.get_model_version(name, m["version"])
    except MlflowException as err:
        raise RegistryError(f"--model {uri!r}: not in the registry at {store} "
                            f"({str(err).splitlines()[0]})") from None
    key = hashlib.sha256(store.encode()).hexdigest()[:12]
    dest = _cache_root() / key / name / str(mv.version)
    found = _find_checkpoint(dest)
    if found is not None:
        return found
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    import mlflow

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp))
    if dest.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    found = _find_checkpoint(dest)
    if found is None:
        raise RegistryError(f"--model {uri!r}: version {mv.version} holds no exported pipeline ({PIPELINE_META}) "
                            f"and no {GENERATOR_FILE} (not registered by distar)")
    return found


def _find_checkpoint(root: Path) -> Path | None:
    """The exported pipeline inside a downloaded model version, else a checkpoint directory."""
    for marker in (PIPELINE_META, GENERATOR_FILE):
        hits = sorted(root.rglob(marker)) if root.is_dir() else []
        if hits:
            return hits[0].parent
    return None
