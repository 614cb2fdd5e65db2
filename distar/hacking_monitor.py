"""A reward-hacking monitor: the trained reward keeps climbing while a held-out judge gets worse.

Reward hacking is visible as a divergence between the reward the optimiser sees and a metric it never
sees (a held-out judge, a Frechet distance to reference samples). The rule, per evaluation (an observation
that carries the held-out metric):

    best      = the best held-out value so far (min or max per `mode`), at best_step; r_best = the trained
                reward logged at best_step
    degraded  = the held-out value is worse than best by more than `tolerance`, relative to |best|:
                mode=min: (value - best) / |best| > tolerance;  mode=max: (best - value) / |best| > tolerance
    climbing  = the trained reward now is above r_best
    trigger   when degraded AND climbing for `patience` consecutive evaluations.

A held-out metric that degrades while the trained reward does not climb is not hacking (the run is simply
getting worse, or noisy) and does not trigger; a new best resets the count. Pure python; the training loop
owns the evaluations and acts on the `Decision` (stop, stop and keep the best step's checkpoint, or warn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

_TINY = 1e-12  # |best| floor: with best == 0 any worsening counts as relative degradation


def _fmt(x: float | None) -> str:
    return "missing" if x is None else f"{x:.6g}"


@dataclass(frozen=True)
class Decision:
    triggered: bool      # the rule fired at this observation
    reason: str          # why (or why not), for the log
    best_step: int       # the step of the best held-out value so far (-1 before the first evaluation)
    should_stop: bool    # triggered and the action is 'stop' or 'keep_best'


class HackingMonitor:
    """Watches (held-out, trained) metric pairs; `cfg` is a `config.HackingMonitorConfig` (or anything with
    its fields: held_out, mode, trained, tolerance, patience, action)."""

    def __init__(self, cfg: Any):
        if cfg.mode not in ("min", "max"):
            raise ValueError(f"HackingMonitor: mode {cfg.mode!r}: expected 'min' or 'max'")
        if cfg.action not in ("stop", "keep_best", "warn"):
            raise ValueError(f"HackingMonitor: action {cfg.action!r}: expected 'stop', 'keep_best' or 'warn'")
        if not cfg.tolerance > 0 or cfg.patience < 1:
            raise ValueError(f"HackingMonitor: need tolerance > 0 and patience >= 1, got {cfg.tolerance}, "
                             f"{cfg.patience}")
        self.cfg = cfg
        self.best: float | None = None
        self.best_step = -1
        self.trained_at_best: float | None = None
        self.streak = 0
        self.triggered_step: int | None = None   # the first step at which the rule fired

    def _degradation(self, value: float) -> float:
        """How much worse than the best, relative to |best| (negative = better)."""
        worse = value - self.best if self.cfg.mode == "min" else self.best - value
        return worse / max(abs(self.best), _TINY)

    def _decision(self, triggered: bool, reason: str) -> Decision:
        stop = triggered and self.cfg.action in ("stop", "keep_best")
        return Decision(triggered=triggered, reason=reason, best_step=self.best_step, should_stop=stop)

    def observe(self, step: int, metrics: Mapping[str, float]) -> Decision:
        """Fold in the metrics logged at `step`; observations without a finite held-out value are not
        evaluations and change nothing."""
        name = self.cfg.held_out
        value = metrics.get(name)
        if value is None or not math.isfinite(float(value)):
            return self._decision(False, f"no finite {name} at step {step}: not an evaluation")
        value = float(value)
        raw = metrics.get(self.cfg.trained)
        trained = float(raw) if raw is not None and math.isfinite(float(raw)) else None
        if self.best is None or self._degradation(value) < 0:
            self.best, self.best_step, self.trained_at_best, self.streak = value, step, trained, 0
            return self._decision(False, f"{name}={value:.6g} is the best so far")
        degradation = self._degradation(value)
        degraded = degradation > self.cfg.tolerance
        climbing = trained is not None and self.trained_at_best is not None and trained > self.trained_at_best
        self.streak = self.streak + 1 if degraded and climbing else 0
        what = (f"{name}={value:.6g} is {100 * degradation:.1f}% worse than its best {self.best:.6g} "
                f"(step {self.best_step}, tolerance {100 * self.cfg.tolerance:.0f}%); {self.cfg.trained}="
                f"{_fmt(trained)} vs {_fmt(self.trained_at_best)} at the best step")
        if self.streak >= self.cfg.patience:
            if self.triggered_step is None:
                self.triggered_step = step
            return self._decision(True, f"reward hacking: {what}, {self.streak} evaluations in a row "
                                        f"-> {self.cfg.action}")
        if degraded and climbing:
            return self._decision(False, f"{what} ({self.streak}/{self.cfg.patience})")
        return self._decision(False, f"{what}: " + ("within tolerance" if not degraded else "reward not climbing"))

    def state_dict(self) -> dict[str, Any]:
        """Plain python values, to checkpoint with the run."""
        return {"best": self.best, "best_step": self.best_step, "trained_at_best": self.trained_at_best,
                "streak": self.streak, "triggered_step": self.triggered_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.best_step = int(state["best_step"])
        self.trained_at_best = state["trained_at_best"]
        self.streak = int(state["streak"])
        self.triggered_step = state.get("triggered_step")
