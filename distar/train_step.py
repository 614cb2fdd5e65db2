"""One DI* training step, written once for every world and for the Ray workers.

A step is `fake_steps` fake-score updates followed by one generator update and an EMA update. The step
never knows whether it runs under Ray: it receives the (possibly DDP-wrapped) trained networks, their
optimizers, a reward client and a CPU `torch.Generator` for all randomness.

Generator loss (per sample, then averaged):
    lambda(t) * L_div            with L_div from `losses.score_divergence_loss` (divergence='score', with
                                 c_eff = `losses.effective_c`) or `losses.kl_divergence_loss` (divergence='kl'),
                                 or nothing ('none');
  + alpha_rew * L_rew            with L_rew = `losses.reward_surrogate_loss(Dec(x0), grad_r)`; alpha_rew is
                                 `loss.alpha_rew`, or the `reward_weight.AlphaController`'s current value.
With loss.reward_mode='diffused' (DIDR) the L_rew term is off: the divergence measures e_fake against the
reward-corrected target e_ref - sigma_t s_r (`losses.reward_corrected_eps`), s_r the diffused reward proxy of
`distar.diffused_reward` with temperature loss.beta (None: 1/alpha_rew); the reward client supplies its
image gradient exactly as for L_rew. gen/score_gap stays the gap to the reference; gen/target_gap is the gap
to the corrected target; reward/drp_* are the rewards of the K-step denoised images the proxy scored.

Metrics of the score gap g_i = ||e_fake - e_ref||_i (per sample, epsilon units), next to c:
    gen/score_gap, gen/c_eff (mean effective c), gen/gap_over_c (mean g_i / c_eff,i: << 1 is the L2 regime of
    the pseudo-Huber, >> 1 its unit-direction regime), and per noise bucket [lo, hi) of t (`GAP_T_EDGES`):
    gap/t{lo}-{hi}_n (samples in the bucket) and gap/t{lo}-{hi}_{p50,p90}_wsum (n times the bucket's
    median / 90th percentile). Every key is present at every step (DDP metric reduction stacks keys), none is
    ever NaN, and after the loop averages them over steps and ranks `finalize_interval_metrics` turns each
    pair into gap/t{lo}-{hi}_p50 = sum(n * p50) / sum(n): the count-weighted mean of the per-step medians.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import diffused_reward, diffusion, losses
from .bundle import ModelBundle, unwrap
from .config import LossConfig
from .ema import EMA
from .reward_weight import AlphaController
from .rewards.base import RewardClient

GAP_T_EDGES: tuple[int, ...] = (0, 250, 500, 750, 1000)   # noise buckets [lo, hi) of the gap metrics
GAP_QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p90", 0.9))


@dataclass
class TrainState:
    bundle: ModelBundle
    generator: nn.Module             # what the generator pass calls (bundle.generator or its DDP wrapper)
    fake_score: nn.Module
    generator_opt: torch.optim.Optimizer
    fake_opt: torch.optim.Optimizer
    ema: EMA
    step: int = 0                    # generator updates done
    fake_warmup_done: bool = False   # the fake score has adapted to this generator (warm-up or init_from)
    alpha_rew: float | None = None   # the current reward weight; None = loss.alpha_rew (mirrors the controller)
    alpha_controller: AlphaController | None = None  # adapts alpha_rew after each generator update
    # makes the controller's signal the same on every rank (DDP: an all-reduce mean); None = this rank's value
    signal_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None


def _noise_like(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=rng, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def _clip(net: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in net.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def fake_update(state: TrainState, cond: Any, n: int, loss_cfg: LossConfig, grad_clip: float,
                rng: torch.Generator) -> dict[str, torch.Tensor]:
    """One denoising-score-matching update of the fake score on detached generator samples."""
    b = state.bundle
    with torch.no_grad():
        x0 = b.generate(unwrap(state.generator), b.sample_noise(n, rng), cond)
    t = diffusion.sample_timesteps(n, loss_cfg.fake_t_min, loss_cfg.fake_t_max, rng, x0.device)
    alpha, sigma = diffusion.alpha_sigma(b.alphas_cumprod, t)
    eps = _noise_like(x0, rng)
    x_t = diffusion.add_noise(x0, eps, alpha, sigma)
    loss = losses.fake_score_loss(b.eps_fake(state.fake_score, x_t, t, cond), eps).mean()
    state.fake_opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = _clip(state.fake_score, grad_clip)
    state.fake_opt.step()
    return {"fake/loss": loss.detach(), "fake/grad_norm": gnorm.detach()}


def _masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per row k of mask [K, B]: the q-quantile of values[mask[k]] ([B] values), with torch.quantile's linear
    interpolation; 0 for an empty row. Sort-and-gather, so no host sync."""
    n = mask.sum(dim=1)
    ranked = torch.where(mask, values.expand_as(mask), torch.full_like(mask, float("inf"), dtype=values.dtype))
    ranked = ranked.sort(dim=1).values
    pos = q * (n - 1).clamp(min=0).to(values.dtype)
    lo, hi = pos.floor().long(), pos.ceil().long()
    v_lo, v_hi = ranked.gather(1, lo[:, None])[:, 0], ranked.gather(1, hi[:, None])[:, 0]
    value = v_lo + (v_hi - v_lo) * (pos - lo.to(values.dtype))
    return torch.where(n > 0, value, torch.zeros_like(value))


def gap_metrics(gap: torch.Tensor, t: torch.Tensor, c_eff: float | torch.Tensor) -> dict[str, torch.Tensor]:
    """The score-gap metrics of one step (module doc): regime (gen/c_eff, gen/gap_over_c) and noise buckets.

    gap: [B] per-sample ||e_fake - e_ref||; t: [B] timesteps; c_eff: the float or [B] tensor the loss used.
    A bucket with no sample this step reports n = 0 and wsum = 0, which leaves the interval's ratio exact.
    """
    gap = gap.float()
    c = torch.as_tensor(c_eff, dtype=gap.dtype, device=gap.device)
    out = {"gen/c_eff": c.mean(), "gen/gap_over_c": (gap / c).mean()}
    t = t.to(gap.device)
    last = len(GAP_T_EDGES) - 2
    masks = torch.stack([(t >= lo) & ((t < hi) | (i == last))  # the last bucket also takes any t >= its hi
                         for i, (lo, hi) in enumerate(zip(GAP_T_EDGES[:-1], GAP_T_EDGES[1:]))])
    n = masks.sum(dim=1).to(gap.dtype)
    quantiles = {name: _masked_quantile(gap, masks, q) for name, q in GAP_QUANTILES}
    for i, (lo, hi) in enumerate(zip(GAP_T_EDGES[:-1], GAP_T_EDGES[1:])):
        out[f"gap/t{lo}-{hi}_n"] = n[i]
        for name, _ in GAP_QUANTILES:
            out[f"gap/t{lo}-{hi}_{name}_wsum"] = n[i] * quantiles[name][i]
    return out


def finalize_interval_metrics(averaged: Mapping[str, Any]) -> dict[str, Any]:
    """Turn interval-averaged metrics into what a person reads: every gap/*_{q}_wsum with its gap/*_n becomes
    gap/*_{q} = mean(n * q) / mean(n) (the count-weighted mean of the per-step quantiles; exact whatever
    steps or ranks had no sample in the bucket), omitted when the bucket had no sample in the whole interval.
    Call it after the loop has averaged over steps (and ranks); other keys pass through unchanged."""
    out: dict[str, Any] = {k: v for k, v in averaged.items() if not (k.startswith("gap/") and k.endswith("_wsum"))}
    for k, v in averaged.items():
        if k.startswith("gap/") and k.endswith("_wsum"):
            name = k[: -len("_wsum")]                          # gap/t0-250_p50
            n = float(averaged.get(name.rsplit("_", 1)[0] + "_n", 0.0))
            if n > 0:
                out[name] = float(v) / n
    return out


# A reward-correction plug-in: (x_t, t, sigma_t, e_ref) -> (target epsilon, metrics)
TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _divergence(bundle: ModelBundle, fake: nn.Module, x0: torch.Tensor, cond: Any, loss_cfg: LossConfig,
                rng: torch.Generator, target: TargetFn | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean_i lambda(t_i) * L_div_i and the score-gap metrics; `target` corrects e_ref (None: the reference)."""
    n = x0.shape[0]
    t = diffusion.sample_timesteps(n, loss_cfg.t_min, loss_cfg.t_max, rng, x0.device)
    alpha, sigma = diffusion.alpha_sigma(bundle.alphas_cumprod, t)
    eps = _noise_like(x0, rng)
    x_t = diffusion.add_noise(x0, eps, alpha, sigma)
    e_f = bundle.eps_fake(fake, x_t, t, cond)
    e_r = bundle.eps_ref(x_t, t, cond)
    e_tgt, target_metrics = target(x_t, t, sigma, e_r) if target is not None else (e_r, {})
    lam = diffusion.time_weight(loss_cfg.weighting, alpha, sigma).to(x0.dtype)
    c_eff = losses.effective_c(loss_cfg.c, loss_cfg.c_scale, x0[0].numel(), sigma=sigma,
                               weighting=loss_cfg.weighting)
    if loss_cfg.divergence == "score":
        per = losses.score_divergence_loss(e_f, e_tgt, eps, c=c_eff, distance=loss_cfg.distance, full=loss_cfg.full)
    else:
        per = losses.kl_divergence_loss(e_f, e_tgt, x_t, sigma.to(x_t.dtype))
    div = (lam * per).mean()
    with torch.no_grad():
        gap = (e_f - e_r).float().pow(2).flatten(1).sum(1).sqrt()
        metrics = {"gen/div_loss": div.detach(), "gen/score_gap": gap.mean(), **gap_metrics(gap, t, c_eff),
                   **target_metrics}
        if target is not None:
            metrics["gen/target_gap"] = (e_f - e_tgt).float().pow(2).flatten(1).sum(1).sqrt().mean()
    return div, metrics


def diffused_reward_target(bundle: ModelBundle, cond: Any, prompts: Sequence[str], reward: RewardClient,
                           loss_cfg: LossConfig, beta: float) -> TargetFn:
    """DIDR's plug-in: e_target = e_ref - sigma_t * s_r, with s_r the K-step diffused reward proxy
    (`diffused_reward.diffused_reward_score`) whose image gradient comes from `reward`, as for the x0 term."""
    def target(x_t, t, sigma, e_r):
        outs, pendings = [], []

        def reward_grad(image: torch.Tensor) -> torch.Tensor:
            pendings.append(reward.submit(image, prompts, with_grad=True))
            outs.append(pendings[-1].result())
            return outs[-1].grad.to(image.device)

        s_r = diffused_reward.diffused_reward_score(
            x_t, t, eps_fn=lambda x, tau: bundle.eps_ref(x, tau, cond), decode=bundle.decode,
            reward_grad=reward_grad, alphas_cumprod=bundle.alphas_cumprod, steps=loss_cfg.drp_steps, beta=beta,
            checkpoint=loss_cfg.drp_checkpoint)
        out = outs[0]
        metrics = {"reward/drp_total": out.total.float().mean(), "reward/beta": torch.tensor(float(beta)),
                   "reward/drp_score_norm": s_r.float().flatten(1).norm(dim=1).mean(),
                   **{f"reward/drp_{k}": v.float().mean() for k, v in out.parts.items()}}
        if hasattr(pendings[-1], "service_retries"):  # rewards on Serve: the client's running total, as for x0
            metrics["reward/service_retries"] = torch.tensor(float(pendings[-1].service_retries))
        return losses.reward_corrected_eps(e_r, sigma, s_r), metrics
    return target


def generator_loss(bundle: ModelBundle, generator: nn.Module, fake: nn.Module, cond: Any,
                   prompts: Sequence[str], loss_cfg: LossConfig, reward: RewardClient | None,
                   rng: torch.Generator, *,
                   alpha_rew: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator objective (scalar) and its metrics. `fake` is used frozen; gradients reach only `generator`.

    alpha_rew: the reward weight of this step; None = loss_cfg.alpha_rew (an adaptive controller passes its own).
    """
    alpha = loss_cfg.alpha_rew if alpha_rew is None else alpha_rew
    n = len(prompts)
    x0 = bundle.generate(generator, bundle.sample_noise(n, rng), cond)
    metrics: dict[str, torch.Tensor] = {}
    total = x0.new_zeros(())

    pending = None
    image = None
    target = None
    if loss_cfg.reward_mode == "diffused":
        if reward is None:
            raise ValueError("loss.reward_mode='diffused' but no reward client was given to the training step")
        if loss_cfg.beta is None and not alpha > 0:
            raise ValueError(f"loss.reward_mode='diffused' with loss.beta unset reads beta as 1 / alpha_rew, but this "
                             f"step's alpha_rew is {alpha}")
        beta = loss_cfg.beta if loss_cfg.beta is not None else 1.0 / alpha
        target = diffused_reward_target(bundle, cond, prompts, reward, loss_cfg, beta)
    elif alpha > 0:
        if reward is None:
            raise ValueError("loss.alpha_rew > 0 but no reward client was given to the training step")
        image = bundle.decode(x0)
        pending = reward.submit(image.detach(), prompts, with_grad=True)  # overlaps with the divergence below

    if loss_cfg.divergence != "none":
        div, div_metrics = _divergence(bundle, fake, x0, cond, loss_cfg, rng, target)
        total = total + div
        metrics.update(div_metrics)

    if pending is not None:
        out = pending.result()
        rew = alpha * losses.reward_surrogate_loss(image, out.grad.to(image.device)).mean()
        total = total + rew
        metrics["reward/total"] = out.total.float().mean()
        for k, v in out.parts.items():
            metrics[f"reward/{k}"] = v.float().mean()
        metrics["reward/grad_norm"] = out.grad.float().flatten(1).norm(dim=1).mean()
        metrics["reward/alpha_rew"] = torch.tensor(float(alpha))
        if hasattr(pending, "service_retries"):  # rewards on Serve: how many requests had to be sent again
            metrics["reward/service_retries"] = torch.tensor(float(pending.service_retries))
    metrics["gen/loss"] = total.detach()
    return total, metrics


def current_alpha_rew(state: TrainState, loss_cfg: LossConfig) -> float:
    """The reward weight the next generator update uses: the controller's, else state.alpha_rew, else the config's."""
    if state.alpha_controller is not None:
        return state.alpha_controller.value
    return loss_cfg.alpha_rew if state.alpha_rew is None else state.alpha_rew


def _control_alpha(state: TrainState, metrics: dict[str, torch.Tensor]) -> None:
    """Feed this step's fidelity signal (already computed, no network call) to the controller."""
    ctl = state.alpha_controller
    if ctl is None:
        return
    if ctl.metric not in metrics:
        raise ValueError(f"loss.alpha_control.signal={ctl.signal!r} needs the metric {ctl.metric!r}, which this step "
                         f"did not compute (is loss.divergence 'none'?)")
    signal = metrics[ctl.metric].detach().float()
    if state.signal_reduce is not None:
        signal = state.signal_reduce(signal)
    state.alpha_rew = ctl.update(float(signal))


def generator_update(state: TrainState, cond: Any, prompts: Sequence[str], loss_cfg: LossConfig,
                     grad_clip: float, reward: RewardClient | None, rng: torch.Generator) -> dict[str, torch.Tensor]:
    fake = unwrap(state.fake_score)
    was = [p.requires_grad for p in fake.parameters()]
    fake.requires_grad_(False)
    try:
        loss, metrics = generator_loss(state.bundle, state.generator, fake, cond, prompts, loss_cfg, reward, rng,
                                       alpha_rew=current_alpha_rew(state, loss_cfg))
        state.generator_opt.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        for p, w in zip(fake.parameters(), was):
            p.requires_grad_(w)
    metrics["gen/grad_norm"] = _clip(state.generator, grad_clip).detach()
    state.generator_opt.step()
    state.ema.update(unwrap(state.generator))
    state.step += 1
    _control_alpha(state, metrics)
    return metrics


def train_step(state: TrainState, prompts: Sequence[str], loss_cfg: LossConfig, *, fake_steps: int,
               grad_clip: float, reward: RewardClient | None, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """`fake_steps` fake-score updates, then one generator update. Prompts are this worker's batch."""
    cond = state.bundle.encode_prompts(list(prompts))
    metrics: dict[str, torch.Tensor] = {}
    for _ in range(fake_steps):
        metrics.update(fake_update(state, cond, len(prompts), loss_cfg, grad_clip, rng))
    metrics.update(generator_update(state, cond, prompts, loss_cfg, grad_clip, reward, rng))
    return metrics


def build_optimizer(net: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(net).__name__} has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
