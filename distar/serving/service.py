"""`GeneratorService`: load a generator once, then turn batches of requests into PNGs, deterministically.

Each request (a `Job`) draws its noise exactly as `distar generate` does, from `seeded_rng(seed)`, once
per prompt; all jobs of a batch then share network calls (`LoadedModel.sample_from_noise`, which keeps
pixels independent of the batch composition). So image i of prompt P with seed S is image i of
`distar generate --prompt P --seed S --n COUNT`, whether the request was served alone or batched.
"""
from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from ..device import pick_device
from ..images import encode_png, to_uint8
from ..loading import load_model, seeded_rng


@dataclass(frozen=True)
class Job:
    prompts: tuple[str, ...]
    count: int
    seed: int

    @classmethod
    def from_request(cls, req) -> "Job":
        """A GenerateRequest with its seed resolved (drawn here when the client gave none)."""
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        return cls(tuple(req.prompt), req.count, seed)


class GeneratorService:
    """The served model (fixed at construction; clients never name one) and its optional reference."""

    def __init__(self, model: str, device: str = "cpu", reference: str | None = None,
                 weights_dir: str | None = None, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = str(pick_device(device))
        self.model = load_model(model, self.device, weights_dir)
        self.reference_model = load_model(reference, self.device, weights_dir) if reference else None
        z = self.model.bundle.sample_noise(1, torch.Generator().manual_seed(0))
        self.image_size = [int(z.shape[-2]), int(z.shape[-1])]

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def reference_name(self) -> str | None:
        return self.reference_model.name if self.reference_model else None

    # ------------------------------------------------------------------ images in [0, 1]
    def images(self, jobs: Sequence[Job]) -> list[torch.Tensor]:
        """One tensor [len(prompts) * count, C, H, W] per job (prompt-major), in one batched pass."""
        if self.model.multistep:  # a multi-step model cannot share noise across requests; sample one by one
            return [self._sample_each(self.model, job) for job in jobs]
        prompts, noise = [], []
        for job in jobs:
            for p in job.prompts:
                noise.append(self.model.bundle.sample_noise(job.count, seeded_rng(job.seed)))
                prompts += [p] * job.count
        out = self.model.sample_from_noise(prompts, torch.cat(noise))
        return list(out.split([len(j.prompts) * j.count for j in jobs]))

    def reference_images(self, job: Job) -> torch.Tensor:
        if self.reference_model is None:
            raise LookupError("this server has no reference model")
        return self._sample_each(self.reference_model, job)

    @staticmethod
    def _sample_each(model, job: Job) -> torch.Tensor:
        return torch.cat([model.sample([p] * job.count, seeded_rng(job.seed)) for p in job.prompts])

    # ------------------------------------------------------------------ PNG bytes
    def generate(self, jobs: Sequence[Job]) -> list[list[bytes]]:
        return [[encode_png(im) for im in to_uint8(x)] for x in self.images(jobs)]

    def reference(self, job: Job) -> list[bytes]:
        return [encode_png(im) for im in to_uint8(self.reference_images(job))]


class AsyncGenerator:
    """Runs a GeneratorService off the event loop, one batch at a time (one worker thread: the model is
    not shared between concurrent calls, and batching, not threads, is what buys throughput)."""

    def __init__(self, service: GeneratorService):
        self.service = service
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator")

    async def generate_many(self, jobs: Sequence[Job]) -> list[list[bytes]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.service.generate, list(jobs))

    async def generate(self, job: Job) -> list[bytes]:
        return (await self.generate_many([job]))[0]

    async def reference(self, job: Job) -> list[bytes]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.service.reference, job)
