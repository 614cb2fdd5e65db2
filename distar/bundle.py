"""The model-bundle interface every world implements (2-D, digits, SD1.5, SDXL).

The training step only ever talks to a bundle through these methods, so the same step runs a 2-D
Gaussian mixture on a laptop and SDXL on a cluster. `cond` is opaque to the step: whatever
`encode_prompts` returns (class ids, text embeddings, SDXL's pooled embeddings and add_time_ids, ...),
always including what the reference needs for classifier-free guidance.

Optional methods a world may add (the loop and CLI use them when present):
    training_prompts() -> list[str]                       the world's own prompt set
    evaluate(net, rng) -> dict[str, float]                world-specific quality metrics of generator `net`
    sample_grid(net, prompts, rng) -> torch.Tensor        images [n, C, H, W] in [0, 1] for a grid artifact
    fake_score_matched: bool                              the fake score came already fitted to the generator
                                                          (the loop then skips the fake warm-up)
    sample_reference(prompts, z, steps, guidance)         the reference's own multi-step samples from noise z
                                                          (images [n, C, H, W] in [0, 1]; evaluation, serving)

Networks that are trained (`generator`, `fake_score`) are passed to `generate` / `eps_fake` explicitly,
so a caller can hand in a DDP/FSDP wrapper for the trained pass and the bare module for a frozen pass.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ModelBundle(Protocol):
    generator: nn.Module          # g_theta, trained
    fake_score: nn.Module         # eps_fake, trained online
    alphas_cumprod: torch.Tensor  # [T], VP schedule shared by reference and fake score
    device: torch.device

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Conditioning for a batch of prompts (with the null prompt's, for CFG); no gradient."""

    def sample_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The generator's input noise z [n, ...] on `device`, drawn from `generator` (a CPU torch.Generator)."""

    def generate(self, net: nn.Module, z: torch.Tensor, cond: Any) -> torch.Tensor:
        """x0 = g_theta(z, c) [n, ...] (latents for SD/SDXL, pixels for small worlds)."""

    def eps_fake(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Fake-score epsilon prediction at (x_t, t), conditional, no CFG."""

    def eps_ref(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Frozen reference epsilon with CFG applied inside (differentiable in x_t)."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [n, C, H, W], differentiable in x0 (VAE decode for latent models)."""

    def frozen_modules(self) -> Sequence[nn.Module]:
        """Every module that must never receive a gradient (reference, VAE, text encoders)."""


def unwrap(net: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (FSDP2 shards in place, so it needs none)."""
    return getattr(net, "module", net)
