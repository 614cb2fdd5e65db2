"""A process's host memory while a function runs, from /proc/self/status (Linux), for the memory benchmarks.

    peaks = peaks_during(fn)   # MiB above the levels just before fn(): rss, anon (RssAnon), rss_hwm, anon_after

A thread samples RSS and its anonymous part (RssAnon: memory the process allocated; the rest is mapped file
pages the kernel can drop) every 5 ms; the kernel's exact RSS peak (VmHWM) is reset just before through
/proc/self/clear_refs, since a sampler can miss a short spike.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path


def _rss_mib() -> tuple[float, float]:
    """(RSS, RssAnon) of this process in MiB, from /proc/self/status (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024


def _reset_hwm() -> bool:
    """Reset this process's VmHWM (the kernel's exact RSS peak) to its current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mib() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024


def peaks_during(fn) -> dict[str, float]:
    """MiB of RSS and of RssAnon above their levels before `fn()`, at their peaks while `fn` runs (sampled); the
    kernel's exact RSS peak (VmHWM, reset just before; None where it cannot be reset); and RssAnon when `fn` has
    returned (what the built state keeps)."""
    hwm = _reset_hwm()
    base, peak, done = _rss_mib(), list(_rss_mib()), threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _rss_mib()
            peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    after = _rss_mib()
    return {"rss": max(peak[0], after[0]) - base[0], "anon": max(peak[1], after[1]) - base[1],
            "anon_after": after[1] - base[1], "rss_hwm": _hwm_mib() - base[0] if hwm else None}
