"""The one validated run configuration: a frozen pydantic model loaded from YAML with dotted overrides.

    cfg = load_config("distar/configs/gaussian2d.yaml", ["loss.alpha_rew=10", "train.steps=500"])

Every user error (unknown key, wrong type, impossible combination, unreadable file) raises `ConfigError`
whose message names the field and what was expected; the CLI prints it without a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError

BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(UserError, ValueError):
    """A configuration the user wrote cannot be used; the message says which field and why."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# ----------------------------------------------------------------------------------------------- worlds
class Gaussian2DModel(_Frozen):
    """The 2-D world: class-conditional Gaussian-mixture reference with analytic scores."""

    world: Literal["gaussian2d"] = "gaussian2d"
    guidance_scale: float = Field(1.0, ge=0.0, description="w_cfg inside the reference score")
    hidden: int = Field(128, gt=0)
    mode_std: float = Field(0.25, gt=0.0)
    init: Literal["random", "narrow"] = Field(
        "random", description="generator start: 'narrow' maps every noise to a tiny blob near the origin")


class DigitsModel(_Frozen):
    """The digits world (16x16 handwritten digits); weights default to the shipped files."""

    world: Literal["digits"] = "digits"
    weights_dir: Optional[str] = Field(None, description="directory of a digits model bundle; None = shipped")
    generator: Optional[str] = Field(
        None, description="generator checkpoint dir or .safetensors; None = the shipped one-step init; "
                          "'teacher' = a copy of the teacher (distillation)")
    guidance_scale: float = Field(2.0, ge=0.0)
    conditioning_timestep: Optional[int] = Field(None, ge=0, le=999, description="None = the bundle's own")


class StableDiffusionModel(_Frozen):
    """SD1.5 / SDXL bundles loaded through diffusers (hub ids or local directories)."""

    world: Literal["sd15", "sdxl"]
    reference: str = Field(..., description="hub id or local dir of the reference pipeline")
    generator: Optional[str] = Field(
        None, description="UNet folder, UNet state-dict file (.bin/.safetensors) or hub id; None = reference UNet")
    generator_subfolder: Optional[str] = None
    generator_file: Optional[str] = Field(
        None, description="UNet state-dict file inside the `generator` hub repo or dir, e.g. dmd2_sdxl_1step_unet_fp16.bin")
    guidance_scale: float = Field(7.5, ge=0.0)
    conditioning_timestep: int = Field(399, ge=0, le=999)
    resolution: Optional[int] = Field(None, gt=0, description="image side in pixels; None = the UNet's default")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    lora_rank: int = Field(0, ge=0, description="0 = full fine-tuning of generator and fake score")
    variant: Optional[str] = None


ModelConfig = Annotated[Union[Gaussian2DModel, DigitsModel, StableDiffusionModel], Field(discriminator="world")]


# ----------------------------------------------------------------------------------------------- loss
class AlphaControl(_Frozen):
    """Adaptive reward weight (like PPO's adaptive KL coefficient): `loss.alpha_rew` becomes the initial value.

    After every generator update, with the step's fidelity signal s (no extra network calls: the score gap
    the step already computed) smoothed as s_ema = ema * s_ema + (1 - ema) * s,
        alpha_rew <- clip(alpha_rew * exp(-rate * clip((s_ema - target) / target, -1, 1)), alpha_min, alpha_max)
    so alpha_rew shrinks while the generator is farther from the reference than `target` and grows while it
    is closer: the run holds the chosen distance to the reference (distar/reward_weight.py).
    """

    signal: Literal["score_gap", "gap_over_c"] = Field(
        "gap_over_c", description="score_gap = mean ||e_fake - e_ref|| (epsilon units); gap_over_c = mean of "
                                  "||e_fake - e_ref|| / c_eff (unitless: << 1 L2 regime, >> 1 unit-direction regime)")
    target: float = Field(..., gt=0.0, description="the signal value to hold")
    rate: float = Field(0.05, gt=0.0, le=1.0, description="largest multiplicative log-step of alpha_rew per update")
    alpha_min: float = Field(1e-3, gt=0.0, description="lower bound of alpha_rew (> 0: a zero weight cannot grow back)")
    alpha_max: float = Field(1e3, gt=0.0, description="upper bound of alpha_rew")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="smoothing of the signal (0 = use each step's value)")

    @model_validator(mode="after")
    def _bounds(self) -> "AlphaControl":
        if not self.alpha_min < self.alpha_max:
            raise ValueError(f"alpha_control.alpha_min ({self.alpha_min}) must be < "
                             f"alpha_control.alpha_max ({self.alpha_max})")
        return self


class LossConfig(_Frozen):
    divergence: Literal["score", "kl", "none"] = Field(
        "score", description="score = DI* (pseudo-Huber/L2 score divergence), kl = DI++, none = reward only")
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    c: float = Field(1.0, gt=0.0, description="pseudo-Huber constant, in epsilon units (see c_scale)")
    c_scale: Literal["per_sample", "per_dim"] = Field(
        "per_sample", description="per_sample: c bounds ||e_fake - e_ref|| over a whole sample; per_dim: c is a "
                                  "per-element RMS gap (effective c = c * sqrt(D)), the same regime at any resolution")
    full: bool = Field(False, description="add the d(e_f - e_r) term (sampling distribution not stop-gradiented)")
    weighting: Literal["uniform", "sigma", "snr_clip", "score"] = Field(
        "uniform", description="lambda(t); score = 1/sigma_t with c_t = c * sigma_t: the pseudo-Huber in score units")
    alpha_rew: float = Field(0.0, ge=0.0, description="reward weight alpha_rew (the initial value under alpha_control)")
    alpha_control: Optional[AlphaControl] = Field(
        None, description="adapt alpha_rew to hold a fidelity signal at a target; None = constant alpha_rew")
    t_min: int = Field(20, ge=0, description="generator loss timestep range, inclusive")
    t_max: int = Field(980, ge=0)
    fake_t_min: int = Field(0, ge=0)
    fake_t_max: int = Field(999, ge=0)
    reward_mode: Literal["x0", "diffused"] = Field(
        "x0", description="x0 = the reward term alpha_rew * L_rew on the clean image (DI*, DI++); diffused = DIDR: "
                          "no x0 term, the divergence's target becomes e_ref - sigma_t s_r with the diffused reward "
                          "proxy s_r (distar/diffused_reward.py), towards p_ref exp(r / beta)")
    drp_steps: int = Field(1, ge=1, description="K: deterministic reference (DDIM) steps of the diffused reward proxy "
                                                "from x_t to x0 (reward_mode=diffused)")
    beta: Optional[float] = Field(
        None, gt=0.0, description="temperature of the reward tilt p_ref exp(r / beta) (reward_mode=diffused); "
                                  "None = 1 / alpha_rew (the current one under alpha_control). When set, alpha_rew "
                                  "is not used")
    drp_checkpoint: bool = Field(False, description="gradient checkpointing through the K proxy steps (recompute "
                                                    "each in the backward pass: one network's activations held, not K)")

    @model_validator(mode="after")
    def _ranges(self) -> "LossConfig":
        if self.t_min > self.t_max:
            raise ValueError(f"loss.t_min ({self.t_min}) must be <= loss.t_max ({self.t_max})")
        if self.fake_t_min > self.fake_t_max:
            raise ValueError(f"loss.fake_t_min ({self.fake_t_min}) must be <= loss.fake_t_max ({self.fake_t_max})")
        if self.weighting == "score" and (self.divergence, self.distance) != ("score", "pseudo_huber"):
            raise ValueError(f"loss.weighting='score' is the pseudo-Huber score divergence in score units: it needs "
                             f"loss.divergence='score' and loss.distance='pseudo_huber' (got {self.divergence!r}, "
                             f"{self.distance!r})")
        self._reward_mode_rules()
        ctl = self.alpha_control
        if ctl is not None:
            if self.divergence == "none":
                raise ValueError("loss.alpha_control needs a divergence (its signal is the score gap): "
                                 "loss.divergence='none' computes none")
            if not ctl.alpha_min <= self.alpha_rew <= ctl.alpha_max:
                raise ValueError(f"loss.alpha_rew ({self.alpha_rew}) is the initial value under loss.alpha_control "
                                 f"and must lie in [alpha_control.alpha_min, alpha_control.alpha_max] = "
                                 f"[{ctl.alpha_min}, {ctl.alpha_max}]")
        return self

    def _reward_mode_rules(self) -> None:
        if self.reward_mode == "x0":
            if self.drp_steps != 1 or self.beta is not None or self.drp_checkpoint:
                raise ValueError("loss.drp_steps, loss.beta and loss.drp_checkpoint belong to "
                                 "loss.reward_mode='diffused'; with reward_mode='x0' leave them at their defaults")
            return
        if self.divergence == "none":
            raise ValueError("loss.reward_mode='diffused' puts the reward into the divergence's target: it needs "
                             "loss.divergence 'kl' (DIDR) or 'score', not 'none'")
        if self.beta is None and self.alpha_rew <= 0:
            raise ValueError("loss.beta: loss.reward_mode='diffused' needs loss.beta > 0 (or loss.alpha_rew > 0, "
                             "read as 1 / beta)")
        if self.beta is not None and self.alpha_control is not None:
            raise ValueError("loss.beta is fixed but loss.alpha_control adapts alpha_rew, which reward_mode="
                             "'diffused' only uses as 1 / beta when loss.beta is None: drop one of them")

    @property
    def uses_reward(self) -> bool:
        """Whether a step needs the reward client: the x0 term (alpha_rew > 0) or the diffused reward proxy."""
        return self.alpha_rew > 0 or self.reward_mode == "diffused"


class HackingMonitorConfig(_Frozen):
    """Reward-hacking monitor (distar/hacking_monitor.py); meant to be attached as `train.monitor`.

    Triggers when the held-out metric has degraded by more than `tolerance` (relative to its best value so
    far) while the trained reward is still above its value at that best step, for `patience` consecutive
    evaluations: the optimiser keeps winning on the reward it sees while a judge it never sees gets worse.
    """

    held_out: str = Field(..., min_length=1, description="held-out metric name, e.g. eval/frechet")
    mode: Literal["min", "max"] = Field(..., description="which direction is good for the held-out metric")
    trained: str = Field("reward/total", min_length=1, description="the reward being optimised (higher is better)")
    tolerance: float = Field(0.25, gt=0.0, description="relative degradation from the best held-out value, 0.25 = 25%")
    patience: int = Field(2, ge=1, description="consecutive degraded evaluations before it triggers")
    action: Literal["stop", "keep_best", "warn"] = Field(
        "warn", description="stop = end the run; keep_best = end it and keep the best step's checkpoint; warn = log")


class RewardTerm(_Frozen):
    name: str = Field(..., description="registry name, see distar.rewards.REWARDS")
    weight: float = 1.0
    path: Optional[str] = Field(None, description="weights dir / hub id where the reward needs one")


class RewardConfig(_Frozen):
    terms: tuple[RewardTerm, ...] = ()
    backend: Literal["local", "serve"] = Field("local", description="in-process autograd or Ray Serve deployments")
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(2, ge=0)
    num_replicas: int = Field(1, ge=1, description="Serve replicas per reward model (the minimum when autoscaling)")
    max_replicas: Optional[int] = Field(None, ge=1, description="> num_replicas turns on Serve autoscaling up to this")
    replica_cpus: float = Field(0.25, gt=0)
    replica_gpus: float = Field(0.0, ge=0)


# ----------------------------------------------------------------------------------------------- optimisation
class OptimConfig(_Frozen):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)


class TrainConfig(_Frozen):
    steps: int = Field(1000, ge=0, description="generator updates")
    batch_size: int = Field(256, gt=0, description="per worker")
    fake_steps: int = Field(1, ge=1, description="K_fake: fake-score updates per generator update")
    fake_warmup_steps: int = Field(0, ge=0, description="fake-score updates before the first generator update")
    generator_optim: OptimConfig = OptimConfig()
    fake_optim: OptimConfig = OptimConfig()
    grad_clip: float = Field(10.0, gt=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    seed: int = 0
    log_every: int = Field(50, gt=0)
    sample_every: int = Field(0, ge=0, description="image grid every N steps; 0 = only at the end")
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_checkpoints: Optional[int] = Field(
        None, ge=1, description="keep the N newest complete checkpoints under out_dir/checkpoints (None = all)")
    out_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads per process (None = torch's default); 1 is fastest for "
                                "small CPU models on shared cores (jobs/bench_digits_step.py)")
    init_from: Optional[str] = Field(
        None, description="checkpoint dir to start the generator (its EMA weights) and the fake score, if saved, "
                          "from: a model dir (generator.safetensors [+ train_state.pt]) or a step checkpoint, "
                          "sharded ones included (any world size wrote it); ignored when resuming")
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16 autocast around the step (trained weights stay float32 masters)")
    monitor: Optional[HackingMonitorConfig] = Field(
        None, description="reward-hacking monitor, checked at every evaluation (log_every)")


class RayConfig(_Frozen):
    num_workers: int = Field(0, ge=0, description="0 = run in this process, no Ray")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    gpu_mem_gb: Optional[float] = Field(
        None, gt=0, description="memory of one worker GPU in GiB for the pre-start memory check (distar plan); "
                                "None = the driver's own GPU if it has one, else 80")
    plan_check: bool = Field(True, description="on GPU runs, refuse to start workers when `distar plan` says the "
                                               "run does not fit (false: start anyway)")
    max_failures: int = Field(0, ge=0)
    run_name: Optional[str] = None
    storage_path: Optional[str] = None
    log_to_driver: bool = Field(
        False, description="forward every worker's output to the driver (off: the driver prints each logged "
                           "step once from metrics.jsonl; worker logs stay in Ray's log files)")


class MLflowConfig(_Frozen):
    enabled: bool = False
    tracking_uri: Optional[str] = Field(None, description="None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "distar"
    registered_model: Optional[str] = None
    alias: str = "champion"


class EvalConfig(_Frozen):
    n_per_prompt: int = Field(8, gt=0)


class RunConfig(_Frozen):
    name: str = "distar-run"
    model: ModelConfig
    loss: LossConfig = LossConfig()
    reward: RewardConfig = RewardConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    mlflow: MLflowConfig = MLflowConfig()
    eval: EvalConfig = EvalConfig()
    prompts: tuple[str, ...] = Field((), description="training prompts; empty = prompts_file or the world's own set")
    prompts_file: Optional[str] = Field(None, description="a prompt file (PartiPrompts TSV or one per line)")

    @model_validator(mode="after")
    def _cross_field(self) -> "RunConfig":
        if self.loss.divergence == "none" and self.loss.alpha_rew == 0:
            raise ValueError("loss.divergence='none' with loss.alpha_rew=0 trains nothing: set one of them")
        if self.loss.alpha_rew > 0 and not self.reward.terms:
            raise ValueError("loss.alpha_rew > 0 needs at least one entry in reward.terms")
        if self.loss.reward_mode == "diffused" and not self.reward.terms:
            raise ValueError("loss.reward_mode='diffused' needs at least one entry in reward.terms")
        if self.prompts and self.prompts_file:
            raise ValueError("give either prompts or prompts_file, not both")
        if self.prompts_file and (self.prompts_file == "parti" or Path(self.prompts_file).name.lower().startswith("partiprompts")):
            raise ValueError(f"prompts_file={self.prompts_file!r}: PartiPrompts is the evaluation set (distar eval "
                             f"--prompts parti) and is never trained on; give your own training captions (the "
                             f"DMD2-SDXL / SiD-LSG lineage used LAION-aesthetic captions)")
        if self.mlflow.registered_model is not None and not self.mlflow.enabled:
            raise ValueError("mlflow.registered_model is set but mlflow.enabled is false")
        return self


# ----------------------------------------------------------------------------------------------- loading
def _coerce(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted `a.b.c=value` overrides to a nested dict (copied)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. loss.alpha_rew=10")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty component in key {key!r}")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = _coerce(value)
    return data


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a built-in config (`gaussian2d`, `digits`, ...)."""
    p = Path(path)
    if p.is_file():
        return p
    builtin = BUILTIN_CONFIG_DIR / f"{path}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(x.stem for x in BUILTIN_CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"--config {str(path)!r}: no such file, and not a built-in config (built-ins: {names})")


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not (isinstance(x, str) and x in ("gaussian2d", "digits", "sd15", "sdxl")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        elif "input" in e and e["type"] not in ("missing",) and loc and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"  # a value, never a whole section or the whole config
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def config_from_dict(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Load a YAML config (file path or built-in name), apply dotted overrides, validate once."""
    data: dict = dict(base or {})
    if path is not None:
        p = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {str(p)!r}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(p)!r}: expected a mapping at the top level, got {type(loaded).__name__}")
        data.update(loaded)
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
