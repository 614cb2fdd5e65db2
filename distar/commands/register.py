"""`distar register --run-dir DIR [--tracking-uri URI] [--name NAME] [--alias ALIAS]`: register a finished
run's final/ generator in the MLflow model registry, as `distar train` does at its end (for when MLflow could
not be reached then; the failed run's message gives this command)."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("register", help="register a finished run's final/ generator in MLflow",
                       description="Register DIR/final (the EMA generator of a finished `distar train` run) as "
                                   "models:/NAME@ALIAS, under the run's MLflow run (found by run name, or created).")
    p.add_argument("--run-dir", required=True, help="the run's train.out_dir (holds config.yaml and final/)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking and registry URI (default: the run's mlflow.tracking_uri, else "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this directory)")
    p.add_argument("--name", default=None, help="registered model name (default: the run's mlflow.registered_model)")
    p.add_argument("--alias", default=None, help="alias to point at the new version (default: the run's mlflow.alias)")


def run(args: argparse.Namespace) -> int:
    from ..tracking import register_run

    print(json.dumps(register_run(args.run_dir, args.tracking_uri, args.name, args.alias), indent=2))
    return 0
