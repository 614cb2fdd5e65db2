"""The 2-D world: a class-conditional Gaussian-mixture reference whose scores are analytic.

Four classes ("class 0" .. "class 3"); class k is an equal mixture of two modes at (-2, y_k) and (+2, y_k),
y_k = -3 + 2k, each isotropic with std `mode_std`. The null prompt "" is the mixture of all eight modes,
so classifier-free guidance is the real thing. The "image" of a sample is the point itself; the region
reward prefers the right half-plane (x > 0), so with a reward DI* should move mass from each class's left
mode to its right mode without dropping the left mode, and reward-only should abandon the reference.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import diffusion
from ..schedules import sd_alphas_cumprod

NUM_CLASSES = 4
MODE_X = 2.0


def mode_means() -> torch.Tensor:
    """[K, 2 modes, 2] mode centres: class k has (-2, y_k) and (+2, y_k)."""
    ys = torch.tensor([-3.0 + 2.0 * k for k in range(NUM_CLASSES)])
    left = torch.stack([torch.full_like(ys, -MODE_X), ys], dim=-1)
    right = torch.stack([torch.full_like(ys, MODE_X), ys], dim=-1)
    return torch.stack([left, right], dim=1)


def gmm_eps(x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, means: torch.Tensor,
            std: float, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Exact epsilon-prediction -sigma_t * grad log p_t(x_t) for per-sample isotropic GMMs.

    x_t: [B, D]; alpha, sigma: [B]; means: [B, M, D]; log_weights: [B, M] or [M] (normalised or not; None =
    equal weights); returns [B, D].  p_t = sum_m w_m N(alpha mu_m, (alpha^2 std^2 + sigma^2) I).
    """
    a, s = alpha[:, None, None], sigma[:, None, None]
    var = a.squeeze(-1) ** 2 * std ** 2 + s.squeeze(-1) ** 2           # [B, 1]
    diff = x_t[:, None, :] - a * means                                  # [B, M, D]
    logw = -0.5 * diff.pow(2).sum(-1) / var                             # [B, M]
    if log_weights is not None:
        logw = logw + log_weights
    resp = torch.softmax(logw, dim=-1)
    score = -(resp[..., None] * diff).sum(1) / var                      # [B, D]
    return -sigma[:, None] * score


def tilt_linear(means: torch.Tensor, std: float, w: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward-tilted mixture p*_0 ∝ p_ref exp(w·x / beta) of an equal-weight isotropic GMM, exactly.

    Each component N(mu_k, std^2 I) times exp(w·x/beta) is again N(mu_k + std^2 w / beta, std^2 I), its mass
    scaled by exp(w·mu_k / beta + std^2 |w|^2 / (2 beta^2)). means: [..., M, D]; w: [D].
    Returns (tilted means [..., M, D], normalised log weights [..., M]).
    """
    w = w.to(means.dtype)
    logits = means @ w / beta + std ** 2 * (w @ w) / (2 * beta ** 2)
    return means + std ** 2 * w / beta, torch.log_softmax(logits, dim=-1)


def tilted_diffused_reward_score(x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, means: torch.Tensor,
                                 std: float, w: torch.Tensor, beta: float) -> torch.Tensor:
    """The exact diffused reward score s*_t - s_ref,t [B, D] for the linear reward w·x (means: [B, M, D])."""
    t_means, t_logw = tilt_linear(means, std, w, beta)
    e_star = gmm_eps(x_t, alpha, sigma, t_means, std, t_logw)
    return (gmm_eps(x_t, alpha, sigma, means, std) - e_star) / sigma[:, None]


def sample_gmm(means: torch.Tensor, log_weights: torch.Tensor, std: float, n: int,
               generator: torch.Generator) -> torch.Tensor:
    """n exact samples [n, D] of sum_m softmax(log_weights)_m N(means_m, std^2 I); means [M, D] (CPU)."""
    comp = torch.multinomial(torch.softmax(log_weights.float(), -1), n, replacement=True, generator=generator)
    return means[comp] + std * torch.randn(n, means.shape[-1], generator=generator, dtype=means.dtype)


def parse_prompts(prompts: Sequence[str]) -> torch.Tensor:
    """"class k" -> k, "" -> -1 (null); anything else is an error naming the prompt."""
    ids = []
    for p in prompts:
        p = p.strip()
        if p == "":
            ids.append(-1)
            continue
        parts = p.split()
        if len(parts) == 2 and parts[0] == "class" and parts[1].isdigit() and int(parts[1]) < NUM_CLASSES:
            ids.append(int(parts[1]))
        else:
            raise ValueError(f"gaussian2d prompt {p!r}: expected 'class K' with K in 0..{NUM_CLASSES - 1}, or ''")
    return torch.tensor(ids, dtype=torch.long)


class _MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Generator2D(nn.Module):
    """x0 = g(z, class): an MLP on [z, one-hot class]."""

    def __init__(self, hidden: int, init: str = "narrow"):
        super().__init__()
        self.mlp = _MLP(2 + NUM_CLASSES, hidden, 2)
        if init == "narrow":  # a poor start: every class maps to a tiny blob near the origin
            with torch.no_grad():
                self.mlp.net[-1].weight.mul_(0.05)
                self.mlp.net[-1].bias.zero_()

    def forward(self, z: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([z, nn.functional.one_hot(cls, NUM_CLASSES).to(z.dtype)], dim=-1))


class FakeScore2D(nn.Module):
    """eps_fake(x_t, t, class): MLP on [x_t, alpha_t, sigma_t, log SNR, one-hot class]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = _MLP(2 + 3 + NUM_CLASSES, hidden, 2)

    def forward(self, x_t, alpha, sigma, cls):
        feats = torch.stack([alpha, sigma, torch.log(alpha / sigma)], dim=-1).to(x_t.dtype)
        onehot = nn.functional.one_hot(cls.clamp(min=0), NUM_CLASSES).to(x_t.dtype)
        return self.mlp(torch.cat([x_t, feats, onehot], dim=-1))


class RegionReward(nn.Module):
    """r(x) = sigmoid(4 x_0): a smooth indicator of the right half-plane."""

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.sigmoid(4.0 * images.reshape(images.shape[0], -1)[:, 0])


class LinearReward(nn.Module):
    """r(x) = w·x: the reward whose tilt of the GMM reference stays a GMM (`tilt_linear`)."""

    def __init__(self, w: Sequence[float]):
        super().__init__()
        self.register_buffer("w", torch.tensor(list(w), dtype=torch.float32))

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images.reshape(images.shape[0], -1) @ self.w.to(images.dtype)


def build_region_reward(path, device) -> nn.Module:
    if path is not None:
        raise ValueError(f"reward 'region' takes no weights path, got path={path!r}")
    return RegionReward().to(device)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistics), >= 0, 0 iff equal in distribution."""
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


class Gaussian2DBundle:
    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.alphas_cumprod = sd_alphas_cumprod().to(device)
        self.means = mode_means().to(device)
        self.all_means = self.means.reshape(1, -1, 2)
        self.std = cfg.mode_std
        self.generator = Generator2D(cfg.hidden, cfg.init).to(device)
        self.fake_score = FakeScore2D(cfg.hidden).to(device)

    # -- ModelBundle
    def encode_prompts(self, prompts):
        return parse_prompts(prompts).to(self.device)

    def sample_noise(self, n, generator):
        return torch.randn(n, 2, generator=generator).to(self.device)

    def generate(self, net, z, cond):
        if (cond < 0).any():
            raise ValueError("gaussian2d: the generator needs a class prompt, not the null prompt ''")
        return net(z, cond)

    def eps_fake(self, net, x_t, t, cond):
        alpha, sigma = diffusion.alpha_sigma(self.alphas_cumprod, t)
        return net(x_t, alpha, sigma, cond)

    def eps_ref(self, x_t, t, cond):
        alpha, sigma = diffusion.alpha_sigma(self.alphas_cumprod, t)
        alpha, sigma = alpha.to(x_t.dtype), sigma.to(x_t.dtype)
        e_null = gmm_eps(x_t, alpha, sigma, self.all_means.expand(len(x_t), -1, -1), self.std)
        w = self.cfg.guidance_scale
        if w == 0.0:
            return e_null
        e_cond = gmm_eps(x_t, alpha, sigma, self.means[cond.clamp(min=0)], self.std)
        e_cond = torch.where((cond >= 0)[:, None], e_cond, e_null)
        return diffusion.classifier_free_guidance(e_null, e_cond, w)

    def decode(self, x0):
        return x0

    def frozen_modules(self):
        return []

    # -- optional
    def training_prompts(self) -> list[str]:
        return [f"class {k}" for k in range(NUM_CLASSES)]

    def reference_samples(self, cls: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Exact samples of the (unguided) reference class-conditional mixture."""
        side = torch.randint(0, 2, (len(cls),), generator=generator)
        noise = torch.randn(len(cls), 2, generator=generator)
        return (self.means.cpu()[cls.cpu(), side] + self.std * noise).to(self.device)

    @torch.no_grad()
    def evaluate(self, net, rng: torch.Generator, n_per_class: int = 1000) -> dict[str, float]:
        """Energy distance to the reference (mean over classes), right-mode mass, mode coverage, reward."""
        eds, right, covered, rewards = [], [], 0, []
        for k in range(NUM_CLASSES):
            cls = torch.full((n_per_class,), k, dtype=torch.long, device=self.device)
            x = net(self.sample_noise(n_per_class, rng), cls).float()
            y = self.reference_samples(cls, rng).float()
            eds.append(energy_distance(x, y))
            d = torch.cdist(x, self.means[k].float())                       # [n, 2]
            near = d.argmin(dim=1)
            on_mode = d.min(dim=1).values < 4 * self.std
            mass = torch.stack([((near == j) & on_mode).float().mean() for j in range(2)])
            right.append(mass[1])
            covered += int((mass >= 0.05).sum())
            rewards.append(torch.sigmoid(4.0 * x[:, 0]).mean())
        return {
            "energy_distance": float(torch.stack(eds).mean()),
            "right_mode_mass": float(torch.stack(right).mean()),
            "mode_coverage": covered / (2 * NUM_CLASSES),
            "mean_reward": float(torch.stack(rewards).mean()),
        }

    def sample_grid(self, net, prompts, rng):
        cls = self.encode_prompts(prompts)
        return net(self.sample_noise(len(prompts), rng), cls)


def build_bundle(cfg, device: torch.device) -> Gaussian2DBundle:
    return Gaussian2DBundle(cfg, device)
