"""Per-rank GPU memory plan of a training run, before any GPU is used (`distar plan`, and `distar train`'s check).

    plan = memory_plan(cfg, gpu_mem_gb=80)        # cfg: a RunConfig; ranks = cfg.ray.num_workers
    print(format_plan(plan)); plan.fits

The world builds its networks on the meta device (`distar.registry.PLAN_MODELS`; no weights are read) and
estimates the activations of one step; this module counts bytes the way the training code allocates them:
  trained parameters, gradients  the generator's and fake score's trainable parameters in their dtype (float32
                                 masters; LoRA: the adapters), gradients in the same dtype
  optimizer states               AdamW's exp_avg and exp_avg_sq, the parameter's dtype each (its per-tensor
                                 `step` counters are 0-d host tensors and not counted)
  EMA                            a float32 shadow of the generator's trainable parameters (distar.ema)
  frozen                         the frozen LoRA bases, the reference, VAE, text encoders, in their dtypes
Under ray.strategy=fsdp the modules distar.fsdp shards (generator, fake score, reference, frozen modules of at
least `FROZEN_MIN_PARAMS`) count 1/N per rank (dim 0 rounded up, as rank 0 holds it), with the units in flight
added; DDP holds everything on every rank. Sizes are GiB (2^30 bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .config import RunConfig
from .fsdp import DEFAULT_UNIT_PARAMS, FROZEN_MIN_PARAMS, shard_units
from .registry import PLAN_MODELS, resolve

GIB = 2 ** 30
EXIT_DOES_NOT_FIT = 3        # `distar plan`'s exit code when the run does not fit (0: it fits)
CONTEXT_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS / NCCL workspaces: reserved on every rank
SLACK = 0.10                 # allocator fragmentation and backward temporaries, as a share of the rest
# Reward models when they run in each worker (reward.backend=local): parameter counts of the default public
# weights (approximate, not built here: they are not diffusers models), loaded in float32.
REWARD_PARAMS = {"image_reward": 447_000_000,   # BLIP ViT-L/16 + BERT-base with cross-attention + MLP head
                 "pickscore": 986_000_000,      # CLIP ViT-H/14
                 "clip_score": 428_000_000,     # CLIP ViT-L/14
                 "aesthetic": 429_000_000,      # CLIP ViT-L/14 + MLP head
                 "hpsv2": 986_000_000}          # CLIP ViT-H/14
DEFAULT_REWARD_PARAMS = 500_000_000


@dataclass
class Activations:
    """Bytes held for backward during one step (per rank), as the world estimates them.

    generator_update: saved tensors of every pass in the generator update (generator, fake score, reference,
    decode) alive together until its backward; fake_update: one fake-score update's; recompute: the largest
    gradient-checkpointing unit's own saved tensors, re-materialised during the backward (0 without
    checkpointing); formula: the text the table footer prints."""

    generator_update: int
    fake_update: int
    recompute: int
    formula: str


@dataclass
class PlanModels:
    """A world's networks for the plan (meta-device modules, or real ones for small worlds)."""

    generator: nn.Module
    fake_score: nn.Module
    reference: Optional[nn.Module]
    frozen: list[tuple[str, nn.Module]]            # (row, module) besides the reference: VAE, text encoders
    activations: Callable[[int], Activations]      # batch per rank -> estimate
    source: str                                    # where the architecture came from


@dataclass
class MemoryPlan:
    rows: list[tuple[str, int, str]]               # (what, bytes per rank, note)
    total: int
    capacity: int
    ranks: int
    strategy: str
    batch: int
    source: str
    footer: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def _shard_numel(p: nn.Parameter, ranks: int) -> int:
    if p.ndim == 0 or ranks == 1:
        return p.numel()
    return math.ceil(p.shape[0] / ranks) * (p.numel() // p.shape[0])


def _bytes(module: nn.Module, ranks: int, trainable: Optional[bool], itemsize: Optional[int] = None) -> int:
    """Parameter bytes of `module` on one rank (trainable: only those that require grad / only those that don't)."""
    return sum(_shard_numel(p, ranks) * (itemsize or p.element_size()) for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _in_flight(module: nn.Module, itemsize: Optional[int] = None) -> int:
    """Bytes of one FSDP module's parameters unsharded at once: the root's own (held for its whole forward) and
    two units (the one computing and the one prefetched), as distar.fsdp.shard_module cuts it. itemsize: of the
    unsharded parameters (2 under FSDP's bf16 mixed-precision policy); None = the module's own."""
    units = shard_units(module, DEFAULT_UNIT_PARAMS)
    itemsize = itemsize or max(p.element_size() for p in module.parameters())
    root = _numel(module) - sum(_numel(u) for u in units)
    top = sorted((_numel(u) for u in units), reverse=True)[:2]
    return (root + sum(top)) * itemsize


def _reward_rows(cfg: RunConfig) -> list[tuple[str, int, str]]:
    if not cfg.loss.uses_reward or not cfg.reward.terms:
        return []
    sizes = [REWARD_PARAMS.get(t.name, DEFAULT_REWARD_PARAMS) for t in cfg.reward.terms]
    names = ", ".join(t.name for t in cfg.reward.terms)
    if cfg.reward.backend == "local":
        return [("reward models (local)", 4 * sum(sizes), f"{names}; float32, approx. public sizes")]
    free = 1.0 - cfg.ray.gpus_per_worker
    if cfg.reward.replica_gpus > 0 and free >= cfg.reward.replica_gpus - 1e-9 and cfg.ray.gpus_per_worker > 0:
        per_gpu = min(len(sizes), int(free / cfg.reward.replica_gpus + 1e-9))
        biggest = sorted(sizes, reverse=True)[:per_gpu]
        return [("reward replicas on this GPU (Serve)", 4 * sum(biggest),
                 f"up to {per_gpu} at reward.replica_gpus={cfg.reward.replica_gpus:g} beside "
                 f"ray.gpus_per_worker={cfg.ray.gpus_per_worker:g}; largest counted, float32")]
    return [("reward models", 0, "on Serve, not on the training GPUs")]


def _parameter_rows(m: PlanModels, cfg: RunConfig, ranks: int, fsdp: bool) -> list[tuple[str, int, str]]:
    r = ranks if fsdp else 1
    nets = (m.generator, m.fake_score)
    trained = sum(_bytes(n, r, True) for n in nets)
    n_trained = sum(_numel_trainable(n) for n in nets)
    rows = [("trained parameters", trained, f"generator + fake score: {n_trained / 1e9:.3f} B params"),
            ("gradients", trained, "same dtype as the parameters"),
            ("optimizer states", 2 * trained, "AdamW exp_avg + exp_avg_sq"),
            ("EMA", _bytes(m.generator, r, True, itemsize=4), "float32 shadow of the generator's trained params")]
    frozen_base = sum(_bytes(n, r, False) for n in nets)
    if frozen_base:
        rows.append(("frozen LoRA bases", frozen_base, f"generator + fake score bases, model.dtype={cfg.model.dtype}"
                     if hasattr(cfg.model, "dtype") else "generator + fake score bases"))
    if m.reference is not None:
        rows.append(("frozen reference", _bytes(m.reference, r, None), f"{_numel(m.reference) / 1e9:.3f} B params"))
    grouped: dict[str, tuple[int, list[str]]] = {}
    for label, mod in m.frozen:
        shard = fsdp and _numel(mod) >= FROZEN_MIN_PARAMS
        b, notes = grouped.get(label, (0, []))
        notes.append(f"{_numel(mod) / 1e6:.0f} M{' sharded' if shard else ''}")
        grouped[label] = (b + _bytes(mod, r if shard else 1, None), notes)
    rows += [(label, b, ", ".join(notes)) for label, (b, notes) in grouped.items()]
    return rows


def _numel_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _plan_models(cfg: RunConfig) -> PlanModels:
    return resolve(PLAN_MODELS, cfg.model.world, "world")(cfg)


def memory_plan(cfg: RunConfig, gpu_mem_gb: float, models: Optional[PlanModels] = None) -> MemoryPlan:
    """The per-rank plan of `cfg` on GPUs of `gpu_mem_gb` GiB (ranks = ray.num_workers, at least 1)."""
    if not gpu_mem_gb > 0:
        raise ValueError(f"--gpu-mem-gb: expected a positive number of GiB, got {gpu_mem_gb}")
    ranks, fsdp = max(1, cfg.ray.num_workers), cfg.ray.strategy == "fsdp"
    m = models or _plan_models(cfg)
    rows = _parameter_rows(m, cfg, ranks, fsdp) + _reward_rows(cfg)
    nets = (m.generator, m.fake_score)
    bf16 = cfg.train.mixed_precision == "bf16"
    if bf16 and not fsdp:  # under FSDP the bf16 mixed-precision policy all-gathers bf16 weights: nothing to cache
        copies = sum(2 * p.numel() for n in nets for p in n.parameters() if p.requires_grad and p.element_size() > 2)
        if copies:
            rows.append(("autocast bf16 weight copies", copies, "trained float32 weights cast once per step and "
                         "cached by torch.autocast until the step ends (upper bound)"))
    if fsdp and (ranks > 1 or bf16):  # one rank under the bf16 policy still holds bf16 copies of units in flight
        sharded = [*nets, *([m.reference] if m.reference is not None else []),
                   *(x for _, x in m.frozen if _numel(x) >= FROZEN_MIN_PARAMS)]
        rows.append(("FSDP units in flight", max(_in_flight(x, 2 if bf16 else None) for x in sharded),
                     "root + 2 largest units of one module, unsharded" + (" in bf16 (FSDP mixed precision)"
                                                                          if bf16 else "")))
    act = m.activations(cfg.train.batch_size)
    rows.append(("activations", max(act.generator_update, act.fake_update) + act.recompute,
                 f"generator update {act.generator_update / GIB:.2f}, fake update {act.fake_update / GIB:.2f}, "
                 f"recompute {act.recompute / GIB:.2f}"))
    subtotal = sum(b for _, b, _ in rows)
    rows.append(("reserve", CONTEXT_BYTES + int(SLACK * subtotal),
                 f"CUDA context {CONTEXT_BYTES / GIB:.1f} + {SLACK:.0%} for fragmentation and temporaries"))
    footer = [act.formula, f"architecture: {m.source}"]
    return MemoryPlan(rows, sum(b for _, b, _ in rows), int(gpu_mem_gb * GIB), ranks, cfg.ray.strategy,
                      cfg.train.batch_size, m.source, footer)


def _candidates(cfg: RunConfig) -> list[str]:
    """Switches that lower per-rank memory, most effective first."""
    out, model = [], cfg.model
    if cfg.ray.strategy == "ddp" and cfg.ray.num_workers > 1:
        out.append("ray.strategy=fsdp")
    if getattr(model, "lora_rank", None) == 0:
        out.append("model.lora_rank=64")
    if getattr(model, "gradient_checkpointing", True) is False:
        out.append("model.gradient_checkpointing=true")
    if cfg.reward.backend == "local" and cfg.loss.uses_reward:
        out.append("reward.backend=serve")
    if cfg.train.mixed_precision == "no" and getattr(model, "world", "") in ("sd15", "sdxl"):
        out.append("train.mixed_precision=bf16")
    if cfg.train.batch_size > 1:
        out.append(f"train.batch_size={cfg.train.batch_size // 2}")
    if cfg.ray.strategy == "fsdp":
        out.append(f"ray.num_workers={2 * max(1, cfg.ray.num_workers)}")
    return out


def suggest(cfg: RunConfig, gpu_mem_gb: float) -> list[str]:
    """For a plan that does not fit: each switch's re-planned peak, then all of them together if none fits alone."""
    from .config import apply_overrides, config_from_dict

    def replan(overrides: list[str]) -> MemoryPlan:
        data = apply_overrides(cfg.model_dump(mode="json"), overrides)
        return memory_plan(config_from_dict(data), gpu_mem_gb)

    lines, flags = [], _candidates(cfg)
    for flag in flags:
        p = replan([flag])
        lines.append(f"{flag}: {p.total / GIB:.1f} GiB per rank ({'fits' if p.fits else 'does not fit'})")
        if p.fits:
            return lines
    if len(flags) > 1:
        p = replan(flags)
        lines.append(f"all of them ({' '.join(flags)}): {p.total / GIB:.1f} GiB per rank "
                     f"({'fits' if p.fits else 'does not fit'})")
    return lines


def format_plan(plan: MemoryPlan) -> str:
    width = max(len(r[0]) for r in plan.rows)
    head = (f"memory per rank: {plan.ranks} rank(s), ray.strategy={plan.strategy}, train.batch_size={plan.batch} "
            f"per rank (GiB)")
    lines = [head, f"  {'what'.ljust(width)}  {'GiB':>7}  note"]
    lines += [f"  {what.ljust(width)}  {b / GIB:7.2f}  {note}" for what, b, note in plan.rows]
    lines.append(f"  {'total (peak)'.ljust(width)}  {plan.total / GIB:7.2f}  of {plan.capacity / GIB:g} GiB: "
                 + ("fits" if plan.fits else "DOES NOT FIT"))
    lines += [f"  note: {x}" for x in plan.footer]
    if plan.suggestions:
        lines.append("  to make it fit, try:")
        lines += [f"    {x}" for x in plan.suggestions]
    return "\n".join(lines)


DEFAULT_GPU_MEM_GB = 80.0


def require_fit(cfg: RunConfig) -> Optional[MemoryPlan]:
    """Before a Ray run starts GPU workers: raise ConfigError with the table when the plan does not fit.

    Applies when ray.num_workers > 0, ray.gpus_per_worker > 0 and ray.plan_check; returns the plan (None when
    it does not apply). GPU memory: ray.gpu_mem_gb, else the driver's own CUDA device, else DEFAULT_GPU_MEM_GB."""
    from .config import ConfigError

    if cfg.ray.num_workers < 1 or cfg.ray.gpus_per_worker <= 0 or not cfg.ray.plan_check:
        return None
    mem = cfg.ray.gpu_mem_gb
    if mem is None:
        import torch

        mem = (torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available()
               else DEFAULT_GPU_MEM_GB)
    plan = memory_plan(cfg, mem)
    if not plan.fits:
        plan.suggestions = suggest(cfg, mem)
        raise ConfigError(f"this run does not fit on {mem:g} GiB GPUs (set ray.gpu_mem_gb to your GPUs' memory; "
                          f"ray.plan_check=false starts it anyway):\n{format_plan(plan)}")
    return plan
