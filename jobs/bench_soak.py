"""Soak: N loopback clients against a locally started `distar serve` for a bounded time.

    python -m jobs.bench_soak [--clients 32] [--seconds 120] [--kill-replica-at 30] [--out soak.json]

Starts `distar serve` (digits-onestep) as a subprocess, then runs --clients concurrent clients, each POSTing
one-image requests back to back (every request has a --timeout, so none can hang), for --seconds. Reports
throughput, p50/p99 latency of the 200s, answers by status (and client-side errors by kind), and the RSS of
the server (the `distar serve` process and the generator replica) at start and end. With --kill-replica-at S
the replica process is SIGKILLed S seconds in; the report gives the window of non-200 answers after it and
the time until the next 200 (the service recovered). Ends with SIGTERM to the server and its exit time.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPLICA = "ServeReplica:generator"


def replica(server) -> "psutil.Process | None":  # noqa: F821
    for p in server.children(recursive=True):
        try:
            if REPLICA in " ".join(p.cmdline()):
                return p
        except Exception:  # psutil.NoSuchProcess: a process that ended while we looked
            continue
    return None


def rss_mib(server) -> dict:
    rep = replica(server)
    return {"serve_mib": round(server.memory_info().rss / 2**20, 1),
            "replica_mib": round(rep.memory_info().rss / 2**20, 1) if rep else None,
            "replica_pid": rep.pid if rep else None}


async def soak(url: str, clients: int, seconds: float, timeout: float, kill_at: float | None, server) -> dict:
    import httpx

    answers: list[tuple[float, float, str]] = []   # (start s, latency s, "200" | "503" | "ReadTimeout" ...)
    killed: dict = {}
    t0 = time.monotonic()

    async def client(k: int) -> None:
        i = k
        while time.monotonic() - t0 < seconds:
            start = time.monotonic()
            try:
                r = await c.post(url, json={"prompt": f"a handwritten digit {i % 10}", "seed": i})
                what = str(r.status_code)
            except httpx.HTTPError as err:
                what = type(err).__name__
            answers.append((start - t0, time.monotonic() - start, what))
            i += clients
            if what != "200":
                await asyncio.sleep(0.2)   # a polite client backs off instead of spinning on errors

    async def killer() -> None:
        await asyncio.sleep(kill_at)
        rep = replica(server)
        if rep is not None:
            os.kill(rep.pid, signal.SIGKILL)
            killed.update(pid=rep.pid, at_s=round(time.monotonic() - t0, 2))

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients)) as c:
        jobs = [client(k) for k in range(clients)] + ([killer()] if kill_at is not None else [])
        await asyncio.gather(*jobs)
    wall = time.monotonic() - t0
    ok = [lat for _, lat, what in answers if what == "200"]
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [float("nan")] * 99
    report = {"clients": clients, "seconds": round(wall, 1), "requests": len(answers), "ok": len(ok),
              "ok_per_s": round(len(ok) / wall, 1), "p50_ms": round(1000 * q[49], 1), "p99_ms": round(1000 * q[98], 1),
              "max_ms": round(1000 * max(lat for _, lat, _ in answers), 1) if answers else None,
              "by_status": dict(collections.Counter(what for _, _, what in answers))}
    if killed:
        after = sorted((s, lat, w) for s, lat, w in answers if s + lat >= killed["at_s"])
        bad = [s + lat for s, lat, w in after if w != "200"]
        back = [s + lat for s, lat, w in after if w == "200" and (not bad or s + lat > max(bad))]
        report["kill"] = {**killed, "non_200_after_kill": len(bad),
                          "non_200_window_s": round(max(bad) - killed["at_s"], 2) if bad else 0.0,
                          "first_200_after_window_s": round(min(back) - killed["at_s"], 2) if back else None,
                          "recovered": bool(back)}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120.0, help="soak duration (upper bound)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request: no client waits longer")
    ap.add_argument("--kill-replica-at", type=float, default=None, help="SIGKILL the generator replica at S s")
    ap.add_argument("--model", default="digits-onestep")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "distar.cli", "serve", "--model", args.model, "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("serving "):
                break
        if proc.poll() is not None:
            raise SystemExit(f"distar serve exited with {proc.returncode} before serving")
        server = psutil.Process(proc.pid)
        start = rss_mib(server)
        report = asyncio.run(soak(f"http://127.0.0.1:{port}/generate", args.clients, args.seconds, args.timeout,
                                  args.kill_replica_at, server))
        report["rss_start"], report["rss_end"] = start, rss_mib(server)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        report["sigterm_exit_s"], report["exit_code"] = round(time.monotonic() - t, 1), proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
