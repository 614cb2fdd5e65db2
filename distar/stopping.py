"""Stopping on SIGINT/SIGTERM at a safe point instead of wherever the signal lands.

`StopSignals` turns the first SIGINT or SIGTERM into a flag that a loop polls (the training loop after each
step, `distar serve` between sleeps); the loop then finishes its unit of work, saves or drains, and returns.
A second signal while stopping raises KeyboardInterrupt (a person who presses Ctrl-C twice means it).
Handlers can only be installed from the main thread; elsewhere the flag simply never rises.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: while inside, SIGINT/SIGTERM set `signum` (the old handlers come back on exit)."""

    def __init__(self, what: str = "stopping", on_stop: Callable[[], None] | None = None):
        self.what, self.on_stop = what, on_stop  # on_stop: called once, in the handler (e.g. tell other processes)
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: %s (send it again to abort at once)", signal.Signals(signum).name, self.what)
        if self.on_stop is not None:
            self.on_stop()

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for "ended by signal N": 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum if self.signum is not None else 0


class ExitAtOnce:
    """Context manager for a phase where nothing is running yet (importing torch, diffusers, Ray): SIGINT prints
    `line` (stderr) and exits 130 at once. A KeyboardInterrupt raised in the middle of an import leaves modules
    half-initialised (numpy's lazy `linalg` then recurses until RecursionError), so it must not be raised there."""

    def __init__(self, line: str):
        self.line = line
        self._old = None

    def __enter__(self) -> "ExitAtOnce":
        # not off the main thread (handlers cannot be set there), nor over an inherited SIG_IGN (nohup, a
        # background job: SIGINT stays ignored)
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _handle(self, signum: int, frame) -> None:
        sys.stderr.write(self.line + "\n")
        sys.stderr.flush()
        os._exit(128 + signum)


class TrainingStopped(Exception):
    """The training loop stopped early on request, after writing `checkpoint` (None: nothing to save yet,
    the stop came during the fake-score warm-up, which a rerun repeats)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"stopped at step {step}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.step, self.checkpoint = step, checkpoint


def stopped_line(prog: str, signal_name: str, step, checkpoint) -> str:
    """The one line a stopped training command prints (stderr) before exiting 130/143."""
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet (the fake-score warm-up)"
    return f"{prog}: stopped by {signal_name} at step {step}; {where}; the same command " + \
        ("resumes" if checkpoint else "starts over")
