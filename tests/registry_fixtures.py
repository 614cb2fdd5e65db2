"""A "trained" digits run for registry tests: the shipped one-step generator nudged (so it differs from the
built-in), saved as a run's final/ and started as an MLflow run in the store `uri`."""
from __future__ import annotations

from pathlib import Path

import torch


def digits_run(tmp: Path, uri: str, name: str) -> tuple[Path, str]:
    """(final/ checkpoint dir, MLflow run id) of a digits run named `name`."""
    from distar import tracking
    from distar.checkpoint import save_generator_dir
    from distar.config import dump_config, load_config
    from distar.worlds import build_bundle

    cfg = load_config("digits", [f"name={name}"])
    bundle = build_bundle(cfg.model, "cpu")
    with torch.no_grad():
        for p in bundle.generator.parameters():
            p.add_(0.01)                                  # distinct from the shipped one-step generator
    ckpt = save_generator_dir(tmp / "final", bundle.generator.state_dict(), dump_config(cfg), {"step": 1},
                              train_state={"step": 1})
    return ckpt, tracking.start_run(uri, cfg, dump_config(cfg), name)
