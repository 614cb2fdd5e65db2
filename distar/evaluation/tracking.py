"""Log a finished evaluation to MLflow: one run with the settings as params, `LABEL/METRIC` metrics and the
output files as artifacts (the grids and the plot also as MLflow images). The URI defaults as for training
(sqlite:///./mlflow.db)."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image


def _key(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", s)


def log_eval(uri: str | None, experiment: str, result: dict, out: Path) -> str:
    from ..tracking import experiment_id, mlflow_client, tracking_uri

    uri = uri or tracking_uri()
    client = mlflow_client(uri)
    run = client.create_run(experiment_id(client, uri, experiment), run_name=f"eval-{Path(out).name}")
    rid = run.info.run_id
    for k in ("prompts", "n_prompts", "images_per_prompt", "seed", "rewards_backend", "reference"):
        client.log_param(rid, k, str(result[k]))
    for row in result["rows"]:
        for col, v in row.items():
            if col != "model" and isinstance(v, (int, float)):
                client.log_metric(rid, _key(f"{row['model']}/{col}"), float(v))
    for name in ("results.md", "results.json", "scores.json", "reward_vs_divergence.png"):
        if (Path(out) / name).is_file():
            client.log_artifact(rid, str(Path(out) / name))
    client.log_artifacts(rid, str(Path(out) / "grids"), "grids")  # where results.md's links point
    # and through MLflow's image API too (the UI's image view shows them), grids and the plot alike
    pngs = sorted((Path(out) / "grids").glob("*.png")) + [p for p in [Path(out) / "reward_vs_divergence.png"]
                                                           if p.is_file()]
    for png in pngs:
        with Image.open(png) as im:
            client.log_image(rid, im.convert("RGB"), key=_key(png.stem), step=0)
    client.set_terminated(rid, "FINISHED")
    return rid
