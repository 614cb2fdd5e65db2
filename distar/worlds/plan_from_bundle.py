"""`distar plan` for small worlds (2-D, digits): the bundle itself, built on the CPU, is what gets counted."""
from __future__ import annotations

from torch import nn

from ..memory_plan import Activations, PlanModels
from . import build_bundle


def plan_models(cfg) -> PlanModels:
    """The bundle's generator, fake score, reference and frozen modules; activations are not estimated."""
    b = build_bundle(cfg.model, "cpu")
    ref = getattr(b, "reference", None)
    ref = ref if isinstance(ref, nn.Module) else None
    frozen = [(f"frozen {type(x).__name__}", x) for x in b.frozen_modules() if x is not ref]
    return PlanModels(b.generator, b.fake_score, ref, frozen,
                      lambda batch: Activations(0, 0, 0, "activations: not estimated for this world (small)"),
                      f"the {cfg.model.world} bundle built on the CPU")
