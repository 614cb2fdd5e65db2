"""A full disk during a checkpoint save: `distar train` writes into a small tmpfs (mounted in a private
mount namespace, `unshare -r -m`), sized so the first checkpoint fits and the second does not. The run
stops with one clear line (exit 2), the previous checkpoint stays intact and loadable, and no half-written
directory is left where a resume would look."""
from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from distar.checkpoint import check_complete, load_train_state, resume_candidates

from . import g2d

pytestmark = pytest.mark.faults

RUN = ["train.checkpoint_every=10", "train.log_every=10", "train.steps=30"]
PAGE = 4096


def _namespaced(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], env=g2d.env(), capture_output=True, text=True)


@pytest.fixture()
def mount_point(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` to mount a private tmpfs")
    probe = _namespaced(f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mnt))}")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user+mount namespace here: {probe.stderr.strip()}")
    return mnt


def _pages(path) -> int:
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in path.rglob("*") if f.is_file())


def test_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, mount_point):
    ref = tmp_path / "ref"
    g2d.train(ref, *RUN[:2], "train.steps=10")
    one = _pages(ref / "checkpoints" / "step_0000010")
    size = one + one // 2 + 4 * PAGE  # room for config.yaml, metrics.jsonl, `latest` and one checkpoint, not two
    run, copy = mount_point / "run", tmp_path / "after"
    cmd = shlex.join(g2d.command(run, *RUN))
    script = (f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount_point))} && {{ {cmd}; rc=$?; "
              f"cp -a {shlex.quote(str(run))} {shlex.quote(str(copy))}; exit $rc; }}")
    done = _namespaced(script)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not write the step-20 checkpoint" in lines[0], done.stderr[-3000:]
    assert "step_0000010 is intact" in lines[0] and "run the same command again" in lines[0]
    # the previous checkpoint is whole and loads; nothing half-written is left beside it
    assert [p.name for p in resume_candidates(copy)] == ["step_0000010"]
    assert check_complete(copy / "checkpoints" / "step_0000010")["step"] == 10
    assert load_train_state(copy / "checkpoints" / "step_0000010")["step"] == 10
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["latest", "step_0000010"]
    print(lines[0])
    # with space again, the same run resumes from it and finishes
    res = g2d.train(copy, *RUN)
    assert res.history[0]["step"] == 20 and res.history[-1]["step"] == 30
