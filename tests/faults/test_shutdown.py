"""Stopping on SIGINT/SIGTERM, sent from outside: `distar train` writes the current step's checkpoint and
exits 130/143 with one line (the same command resumes from that step); `distar serve` answers what it holds,
stops the Ray processes it started and exits 0. Neither prints a traceback or a stack dump."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from distar.checkpoint import latest_checkpoint

from ..serve_fixtures import PROMPT, weights_dir
from ..test_serve_registry import URI, registered  # noqa: F401 (a fixture)
from . import g2d

pytestmark = pytest.mark.faults

BOUND = 60  # seconds: generous, only so that a process that ignores the signal fails the test
RUN = ["train.checkpoint_every=100000", "train.log_every=10"]
DUMPS = ("Traceback", "*** SIG", "Stack trace", "core dumped")


def _logged_steps(out) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signalled_training_saves_this_step_and_resumes_from_it(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(g2d.command(out, "train.steps=1000000", *RUN), env=g2d.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not _logged_steps(out) and proc.poll() is None:  # past the warm-up, training steps
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=BOUND)[1]
    assert proc.returncode == code, err[-2000:]
    assert not any(d in err for d in DUMPS), err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"distar train: stopped by {sig.name} at step "), err[-2000:]
    stopped_at = int(last_line.split(" at step ")[1].split(";")[0])
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"step_{stopped_at:07d}" and stopped_at % 100000, err[-2000:]
    seen = len(_logged_steps(out))
    done = subprocess.run(g2d.command(out, f"train.steps={stopped_at + 20}", *RUN), env=g2d.env(),
                          capture_output=True, text=True, timeout=BOUND * 5)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["step"] == stopped_at + 20
    resumed = _logged_steps(out)[seen:]
    assert resumed and min(resumed) > stopped_at, resumed    # a run that started over would log step 10 again


@pytest.mark.parametrize("prog", ["jobs.train", "distar.cli"])
def test_sigint_while_the_command_starts_gives_one_line_not_a_traceback(tmp_path, prog):
    """Ctrl-C one second in: the command is importing torch and its libraries (a KeyboardInterrupt inside an
    import once left numpy half-initialised: RecursionError, exit 1) or starting Ray; its stop handler is not yet
    on. Whatever phase the signal lands in, the command exits 130 with one line and no traceback."""
    args = ["train", "--config", "gaussian2d"] if prog == "distar.cli" else ["--config", "gaussian2d"]
    cmd = [sys.executable, "-m", prog, *args, *g2d.overrides(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=g2d.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=BOUND)[1]
    assert proc.returncode == 130, err[-2000:]
    assert not any(d in err for d in DUMPS), err[-2000:]
    assert err.strip().splitlines()[-1].startswith("jobs.train: " if prog == "jobs.train" else "distar train: "), \
        err[-2000:]


def test_keyboard_interrupt_outside_training_is_one_line_and_130(monkeypatch, capsys):
    """The same, at a known phase: Ctrl-C raised where no stop handler is installed (here: loading the config)."""
    import jobs.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("distar.config.load_config", interrupted)
    assert jobs.train.main(["--config", "gaussian2d"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["jobs.train: interrupted; checkpoints written so far are kept (the same command "
                                "resumes)"], err


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_to_the_ray_driver_saves_on_every_worker_and_resumes(ray_cluster, tmp_path):
    """`python -m jobs.train` on its own local cluster with 2 workers: SIGTERM to the driver only."""
    import psutil

    out = tmp_path / "run"
    ray_args = [f"ray.storage_path={tmp_path / 'ray'}", "ray.num_workers=2", "ray.cpus_per_worker=0.5",
                "ray.run_name=sigterm", "train.batch_size=64", "model.hidden=32", "train.fake_warmup_steps=5",
                "train.device=cpu", "train.threads=1", f"train.out_dir={out}", *RUN]
    cmd = [sys.executable, "-m", "jobs.train", "-q", "--no-table", "--config", "gaussian2d", *ray_args]
    proc = subprocess.Popen([*cmd, "train.steps=1000000"], env=g2d.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while not _logged_steps(out) and proc.poll() is None:
        time.sleep(0.1)
    started = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=BOUND * 3)[1]
    assert proc.returncode == 143, err[-2000:]
    assert not any(d in err for d in DUMPS), err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("jobs.train: stopped by SIGTERM at step "), err[-2000:]
    stopped_at = int(last_line.split(" at step ")[1].split(";")[0])
    assert latest_checkpoint(out).name == f"step_{stopped_at:07d}", err[-2000:]
    assert not [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    seen = len(_logged_steps(out))
    # the run resumes from that step (here in this process, on the session's cluster: the command's own resume
    # is test_signalled_training_saves_this_step_and_resumes_from_it)
    from distar.config import load_config
    from distar.ray_train import run_on_ray

    summary = run_on_ray(load_config("gaussian2d", [*ray_args, f"train.steps={stopped_at + 20}"]))
    assert summary["resumed_from_step"] == stopped_at, summary
    resumed = _logged_steps(out)[seen:]
    assert resumed and min(resumed) > stopped_at and max(resumed) == stopped_at + 20, resumed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_sigterm_stops_serve_answers_in_flight_and_leaves_no_ray_processes(registered):
    """Serving a registered model (`registered`: MLFLOW_TRACKING_URI and the cache in tmp_path), whose
    /health must name it as given, not by the replica's cache path."""
    import httpx
    import psutil

    port = _free_port()
    cmd = [sys.executable, "-m", "distar.cli", "serve", "--model", URI, "--port", str(port), "--num-cpus", "2",
           "--weights-dir", weights_dir(), "--batch-wait-ms", "200"]
    proc = subprocess.Popen(cmd, env=g2d.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("serving "):
                break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "distar serve started no Ray processes"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=BOUND).json()["model"] == URI
        answers: list = []

        def ask(seed):
            try:
                answers.append(httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": PROMPT, "seed": seed},
                                          timeout=BOUND).status_code)
            except httpx.HTTPError as err:
                answers.append(type(err).__name__)

        clients = [threading.Thread(target=ask, args=(s,)) for s in range(8)]
        for c in clients:
            c.start()
        time.sleep(0.1)   # the batch wait (200 ms) holds them in flight
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=BOUND)
        for c in clients:
            c.join(timeout=BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stopping: SIGTERM" in out and out.strip().endswith("stopped"), out
    assert not any(d in err for d in DUMPS), err[-3000:]
    assert len(answers) == 8 and all(isinstance(a, int) for a in answers), answers  # answered, none dropped
    left = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"Ray processes left behind: {left}"


def test_stop_before_any_checkpoint_says_the_command_starts_over(monkeypatch):
    """A stop during the fake-score warm-up has no checkpoint: the summary holds None (not the string "None"),
    so the printed line says the rerun starts over instead of naming a checkpoint that does not exist."""
    from distar.config import load_config
    from distar.ray_train import _in_driver
    from distar.stopping import TrainingStopped, stopped_line

    def stopped_in_warmup(*args, **kwargs):
        raise TrainingStopped(0, None)

    monkeypatch.setattr("distar.train_loop.run_training", stopped_in_warmup)
    summary = _in_driver(load_config("gaussian2d", []), None, None)
    assert summary["checkpoint"] is None, summary
    line = stopped_line("jobs.train", "SIGINT", summary["step"], summary["checkpoint"])
    assert line.endswith("no checkpoint yet (the fake-score warm-up); the same command starts over"), line
