"""A truncated or corrupted newest checkpoint: resume falls back to the previous complete one, with a
warning that names the bad one; when none is left, a CheckpointError names each."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from distar.checkpoint import CheckpointError, load_generator_state

from . import g2d

pytestmark = pytest.mark.faults

RUN = ["train.checkpoint_every=10", "train.log_every=10"]


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 20-step run (checkpoints at 10 and 20), and an uninterrupted 30-step one to compare with."""
    tmp = tmp_path_factory.mktemp("damaged")
    g2d.train(tmp / "src", "train.steps=20", *RUN)
    g2d.train(tmp / "whole", "train.steps=30", *RUN)
    return tmp


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["train_state.pt", "generator.safetensors", "config.yaml", "meta.json"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous(two_checkpoints, tmp_path, caplog, name):
    run = _copy(two_checkpoints / "src", tmp_path / "run")
    _truncate(run / "checkpoints" / "step_0000020" / name)
    with caplog.at_level(logging.INFO, logger="distar"):
        res = g2d.train(run, "train.steps=30", *RUN)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_0000020" in warnings[0], warnings
    assert any("resumed from" in r.getMessage() and "step_0000010" in r.getMessage() for r in caplog.records)
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [10, 20, 20, 30]   # steps 11-20 trained again: one checkpoint interval lost
    # and from step 10 the run is the uninterrupted one, bit for bit
    want, got = load_generator_state(two_checkpoints / "whole" / "final"), load_generator_state(res.final_dir)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_no_loadable_checkpoint_is_an_error_naming_each(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints / "src", tmp_path / "run")
    _truncate(run / "checkpoints" / "step_0000020" / "train_state.pt")
    _truncate(run / "checkpoints" / "step_0000010" / "train_state.pt", keep=0.9)
    with pytest.raises(CheckpointError, match="step_0000020.*step_0000010"):
        g2d.train(run, "train.steps=30", *RUN)
