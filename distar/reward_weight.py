"""An adaptive reward weight alpha_rew, held by feedback on how far the generator is from the reference.

The analogue of PPO's adaptive KL coefficient: instead of choosing alpha_rew (whose good value depends on
the reward's scale, the world and the stage of training), the user chooses how far from the reference the
generator may go, measured by a signal every generator step already computes (no extra network calls):

    score_gap:  mean_i ||e_fake - e_ref||_i             epsilon units over a whole sample
    gap_over_c: mean_i ||e_fake - e_ref||_i / c_eff,i   unitless; << 1 is the L2 regime of the pseudo-Huber,
                                                        >> 1 its unit-direction regime

After each update, with s_ema = ema * s_ema + (1 - ema) * s (s_ema starts at the first signal),

    alpha <- clip(alpha * exp(-rate * clip((s_ema - target) / target, -1, 1)), alpha_min, alpha_max)

A signal ABOVE target (the generator drifted away from the reference, typically because the reward pulls
harder than the divergence holds) REDUCES alpha; a signal below target lets the reward pull harder. Each
update changes alpha by at most a factor exp(rate). Pure python: no torch, no config needed at run time.
"""
from __future__ import annotations

import math
from typing import Any

SIGNAL_METRICS = {"score_gap": "gen/score_gap", "gap_over_c": "gen/gap_over_c"}


class AlphaController:
    """Multiplicative feedback on alpha_rew that holds a fidelity signal at `target` (see the module doc)."""

    def __init__(self, alpha: float, *, target: float, rate: float = 0.05, alpha_min: float = 1e-3,
                 alpha_max: float = 1e3, ema: float = 0.9, signal: str = "gap_over_c"):
        if signal not in SIGNAL_METRICS:
            raise ValueError(f"AlphaController: signal {signal!r}: expected one of {sorted(SIGNAL_METRICS)}")
        if not target > 0:
            raise ValueError(f"AlphaController: target must be > 0, got {target}")
        if not rate > 0:
            raise ValueError(f"AlphaController: rate must be > 0, got {rate}")
        if not 0 < alpha_min < alpha_max:
            raise ValueError(f"AlphaController: need 0 < alpha_min < alpha_max, got {alpha_min}, {alpha_max}")
        if not 0 <= ema < 1:
            raise ValueError(f"AlphaController: ema must be in [0, 1), got {ema}")
        if not alpha_min <= alpha <= alpha_max:
            raise ValueError(f"AlphaController: initial alpha {alpha} outside [{alpha_min}, {alpha_max}]")
        self.signal, self.target, self.rate, self.ema = signal, float(target), float(rate), float(ema)
        self.alpha_min, self.alpha_max = float(alpha_min), float(alpha_max)
        self._alpha = float(alpha)
        self.signal_ema: float | None = None
        self.updates = 0

    @classmethod
    def from_config(cls, control: Any, alpha_init: float) -> "AlphaController":
        """From a `config.AlphaControl` (`loss.alpha_control`) and the initial weight (`loss.alpha_rew`)."""
        return cls(alpha_init, target=control.target, rate=control.rate, alpha_min=control.alpha_min,
                   alpha_max=control.alpha_max, ema=control.ema, signal=control.signal)

    @property
    def value(self) -> float:
        """The current alpha_rew."""
        return self._alpha

    @property
    def metric(self) -> str:
        """The metric key (from `train_step.generator_loss`) that carries this controller's signal."""
        return SIGNAL_METRICS[self.signal]

    def update(self, signal: float) -> float:
        """Fold one step's signal into the EMA, move alpha, return the new alpha.

        A non-finite signal (a diverged step) is ignored: alpha and the EMA stay where they were.
        """
        signal = float(signal)
        if not math.isfinite(signal):
            return self._alpha
        if self.signal_ema is None:
            self.signal_ema = signal
        else:
            self.signal_ema = self.ema * self.signal_ema + (1.0 - self.ema) * signal
        err = min(1.0, max(-1.0, (self.signal_ema - self.target) / self.target))
        self._alpha = min(self.alpha_max, max(self.alpha_min, self._alpha * math.exp(-self.rate * err)))
        self.updates += 1
        return self._alpha

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume the controller exactly (plain python values)."""
        return {"alpha": self._alpha, "signal_ema": self.signal_ema, "updates": self.updates,
                "signal": self.signal, "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore alpha, the signal EMA and the update count; the settings stay this controller's own, and a
        saved alpha outside this controller's [alpha_min, alpha_max] is clipped into it."""
        self._alpha = min(self.alpha_max, max(self.alpha_min, float(state["alpha"])))
        ema = state.get("signal_ema")
        self.signal_ema = None if ema is None else float(ema)
        self.updates = int(state.get("updates", 0))


def build_alpha_controller(loss_cfg: Any) -> AlphaController | None:
    """The controller a `LossConfig` asks for (`loss.alpha_control`), or None for a constant alpha_rew."""
    control = getattr(loss_cfg, "alpha_control", None)
    if control is None:
        return None
    return AlphaController.from_config(control, loss_cfg.alpha_rew)
