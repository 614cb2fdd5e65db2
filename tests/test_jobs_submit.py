"""The job-submission path as users run it: a local head (loopback only, auth disabled, its own ports and temp
dir), `ray job submit --working-dir . -- python -m jobs.train ...`, wait, stop only the cluster started here.

The head runs as `ray start --head --block` in a child process: terminating that process stops exactly the
Ray processes it started (`ray stop` would stop every Ray cluster on the host, other engineers' included)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def local_head():
    """http://127.0.0.1:PORT of a fresh single-node head with 2 CPUs; stopped (only it) afterwards."""
    gcs, dash, client, agent, agent_grpc, rt_env, metrics = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}", "--num-cpus=2",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=_env(),
                                   capture_output=True, text=True, timeout=30)
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()
            assert time.time() < deadline, f"head at {address} not up: {probe.stderr[-500:]}"
            time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:  # its graceful stop can take ~30 s; ours is a throwaway cluster
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        for pid in _pids_using(temp):      # anything of this cluster that left the process group
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _pids_using(temp: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_ray_job_submit_trains_and_checkpoints(local_head, tmp_path):
    out, storage = tmp_path / "run", tmp_path / "ray_results"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", local_head, "--working-dir", ".", "--",
           "python", "-m", "jobs.train", "--config", "distar/configs/gaussian2d.yaml", "--no-table",
           "name=job-test", "ray.num_workers=2", "ray.cpus_per_worker=0.5", "train.steps=20",
           "train.batch_size=64", "train.fake_warmup_steps=5", "train.log_every=10", "train.device=cpu",
           f"train.out_dir={out}", f"ray.storage_path={storage}"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-3000:]
    summary = json.loads(log[log.index('{\n  "run_name"'):].split("\n}\n")[0] + "\n}")
    assert summary["workers"] == 2 and summary["step"] == 20
    assert Path(summary["checkpoint"]).parent == storage / "job-test"
    assert (out / "final" / "generator.safetensors").is_file()
