"""Untrusted files: training state loads with weights_only=True, so a pickle planted where a checkpoint's
train_state.pt is expected is refused and never run (the marker file its __reduce__ would create stays absent)."""
from __future__ import annotations

import io
import pickle

import pytest
import torch

from distar.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint, load_train_state

from . import g2d

pytestmark = pytest.mark.faults


class _Planted:
    """Unpickling this calls open(marker, 'w'): the file appears only if the pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_real_training_state_loads_weights_only(tmp_path):
    g2d.train(tmp_path / "run", "train.steps=4", "loss.alpha_rew=0.2", "reward.terms=[{name: region}]",
              "loss.alpha_control={target: 1.0}")
    saved = load_train_state(latest_checkpoint(tmp_path / "run"))  # weights_only=True inside
    assert saved["step"] == 4 and saved["fake_warmup_done"] is True
    assert isinstance(saved["alpha_controller"], dict)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_planted_pickle_is_refused_not_run(tmp_path, writer):
    run = tmp_path / "run"
    g2d.train(run, "train.steps=4")
    target = latest_checkpoint(run) / STATE_FILE
    marker = tmp_path / "pwned"
    if writer == "torch.save":
        buf = io.BytesIO()
        torch.save({"step": _Planted(marker)}, buf)
        data = buf.getvalue()
    else:
        data = pickle.dumps(_Planted(marker))
    g2d.replace_file(target.parent, STATE_FILE, data)  # planted with care: meta.json's sizes agree
    # the planted file would run code under the old weights_only=False (so this test can fail) ...
    if writer == "torch.save":
        torch.load(target, weights_only=False)
        assert marker.exists()
        marker.unlink()
    # ... and resume refuses it, naming the file, without running it
    with pytest.raises(CheckpointError, match=STATE_FILE) as err:
        g2d.train(run, "train.steps=8")
    assert "weights_only" in str(err.value)
    assert not marker.exists()
    # starting a new run from it (train.init_from) is refused the same way
    with pytest.raises(CheckpointError):
        g2d.train(tmp_path / "other", "train.steps=0", f"train.init_from={target.parent}")
    assert not marker.exists()
