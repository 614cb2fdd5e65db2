"""The digits world's ModelBundle: the same interface, and the same code path, as SD/SDXL.

    reference  eps_ref(x_t, t, c)  frozen teacher UNet, CFG inside: eps(x,t,null) + w (eps(x,t,c) - eps(x,t,null))
    fake score eps_fake(...)       a trainable copy of the teacher UNet (no CFG)
    generator  g_theta(z, c)       a UNet (initialised from the teacher) used DMD2-style at a fixed timestep tau:
                                       x_tau = alpha_tau * m + sigma_tau * z         (m: mean training image)
                                       x0    = (x_tau - sigma_tau * eps_theta(x_tau, tau, c)) / alpha_tau
    decode                         pixels in [-1, 1] -> images in [0, 1] (clamped)

Why x_tau = alpha m + sigma z rather than z alone at t=999: at t=999 alpha = 0.068, so every error in
eps_theta reaches x0 amplified ~15x (speckle); at tau=499 the factor is 1/alpha = 1.9. But at tau=499 a
real x_tau carries alpha*x0 (mostly alpha*(-1) background), so z alone would be far off the teacher's
input distribution; noising the mean image m puts the generator's input where the teacher has been trained
(SDEdit from the mean digit), so the teacher-initialised generator already draws blurry, class-correct digits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ... import diffusion
from ...schedules import sd_alphas_cumprod
from . import data, models, text
from .files import FILES, read_manifest, weights_dir

DEFAULT_TAU = 499
PROMPT_CACHE_SIZE = 4096  # prompts whose text-encoder states DigitsBundle keeps (~2 KB each)


@dataclass
class DigitsCond:
    hidden: torch.Tensor       # [B, L, D] text-encoder states of the prompts
    null: torch.Tensor         # [B, L, D] states of the empty prompt (for CFG)
    prompts: list[str]


def resolve_generator_file(path: str | Path) -> Path:
    """A generator checkpoint: a `distar train` directory (generator.safetensors) or a .safetensors file."""
    p = Path(path)
    if p.is_dir():
        p = p / "generator.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"model.generator {str(path)!r}: no generator.safetensors there")
    return p


class DigitsBundle:
    world = "digits"
    tokenizer = None  # a CLIPTokenizer to use instead of text.tokenize (an exported pipeline's own)

    def __init__(self, wdir: Path, generator_file: Path | None, guidance_scale: float, tau: int,
                 device: torch.device):
        self.device = torch.device(device)
        self.dir = wdir
        self.manifest = read_manifest(wdir)
        self.guidance_scale = float(guidance_scale)
        self.tau = int(tau)
        self.alphas_cumprod = sd_alphas_cumprod().to(self.device)
        self.text_encoder = models.load_weights(models.build_text_encoder(), wdir / FILES["text_encoder"])
        self.reference = models.load_weights(models.build_unet(), wdir / FILES["teacher"])
        for m in (self.text_encoder, self.reference):
            m.to(self.device).eval().requires_grad_(False)
        self.fake_score = copy.deepcopy(self.reference).requires_grad_(True).train()
        self.generator = copy.deepcopy(self.reference).requires_grad_(True).train()
        if generator_file is not None:
            models.load_weights(self.generator, generator_file)
        # the shipped generator comes with the fake score its distillation ended with (or one fitted to it):
        # post-training then needs no fake warm-up (the loop reads fake_score_matched)
        fake_file = wdir / FILES["onestep_fake"]
        self.fake_score_matched = generator_file == wdir / FILES["onestep"] and fake_file.is_file()
        if self.fake_score_matched:
            models.load_weights(self.fake_score, fake_file)
        self.mean_image = (data.load_split("teacher")[0].mean(0) * 2.0 - 1.0).to(self.device)  # m, [1, 16, 16]
        self.cache_prompts = True      # False: encode every call (the uncached path, for tests and benchmarks)
        self._prompt_cache: dict[str, torch.Tensor] = {}  # prompt -> its [L, D] states, on self.device
        self._cache_key: tuple | None = None

    # ------------------------------------------------------------------ ModelBundle
    @torch.no_grad()
    def _encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            ids = text.tokenize(list(prompts))
        else:
            ids = self.tokenizer(list(prompts), padding="max_length", max_length=text.MAX_LENGTH, truncation=True,
                                 return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device)).last_hidden_state

    def _encoder_key(self) -> tuple:
        """Changes whenever the text encoder's weights do (moved, replaced or written in place)."""
        return tuple((p.data_ptr(), p.device, p._version) for p in self.text_encoder.parameters())

    @torch.no_grad()
    def _encode_cached(self, prompts: Sequence[str]) -> torch.Tensor:
        """`_encode(prompts)` from a per-prompt cache (exact: the frozen encoder's row for a prompt depends on
        that prompt alone, and is the same bits in any batch -- tests/test_digits_speed_equivalence.py).
        The cache empties when the encoder's weights change, or when it passes PROMPT_CACHE_SIZE; an empty
        cache is filled with the world's whole prompt set (and the null prompt) in one batch."""
        key = self._encoder_key()
        if key != self._cache_key or len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache, self._cache_key = {}, key
        todo = prompts if self._prompt_cache else [text.NULL_PROMPT, *text.all_prompts(), *prompts]
        missing = list(dict.fromkeys(p for p in todo if p not in self._prompt_cache))
        if missing:
            self._prompt_cache.update(zip(missing, self._encode(missing).unbind(0)))
        return torch.stack([self._prompt_cache[p] for p in prompts])  # a new tensor: callers cannot alter the cache

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> DigitsCond:
        encode = self._encode_cached if self.cache_prompts else self._encode
        hidden = encode(list(prompts))
        null = encode([text.NULL_PROMPT])
        return DigitsCond(hidden, null.expand(len(prompts), -1, -1), list(prompts))

    def sample_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, 1, data.SIZE, data.SIZE), generator=generator).to(self.device)

    def generate(self, net: nn.Module, z: torch.Tensor, cond: DigitsCond) -> torch.Tensor:
        t = torch.full((z.shape[0],), self.tau, device=z.device, dtype=torch.long)
        alpha, sigma = diffusion.alpha_sigma(self.alphas_cumprod, t)
        x_tau = diffusion.add_noise(self.mean_image.expand_as(z), z, alpha, sigma)
        dt = next(net.parameters()).dtype  # bf16/fp16 for inference on a GPU; no-op casts in float32
        eps = net(x_tau.to(dt), t, encoder_hidden_states=cond.hidden.to(dt)).sample.float()
        return diffusion.x0_from_eps(x_tau, eps, alpha, sigma)

    def eps_fake(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: DigitsCond) -> torch.Tensor:
        return net(x_t, t, encoder_hidden_states=cond.hidden).sample

    def eps_ref(self, x_t: torch.Tensor, t: torch.Tensor, cond: DigitsCond) -> torch.Tensor:
        return self.reference_eps(x_t, t, cond, self.guidance_scale)

    def reference_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: DigitsCond, w: float) -> torch.Tensor:
        if w == 1.0:
            return self.reference(x_t, t, encoder_hidden_states=cond.hidden).sample
        out = self.reference(torch.cat([x_t, x_t]), torch.cat([t, t]),
                             encoder_hidden_states=torch.cat([cond.null, cond.hidden])).sample
        e_u, e_c = out.chunk(2)
        return diffusion.classifier_free_guidance(e_u, e_c, w)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0 + 1.0) * 0.5).clamp(0.0, 1.0)

    def frozen_modules(self) -> Sequence[nn.Module]:
        return [self.reference, self.text_encoder]

    # ------------------------------------------------------------------ optional
    def training_prompts(self) -> list[str]:
        return text.all_prompts()

    @torch.no_grad()
    def sample_grid(self, net: nn.Module, prompts: Sequence[str], rng: torch.Generator) -> torch.Tensor:
        return self.decode(self.generate(net, self.sample_noise(len(prompts), rng), self.encode_prompts(prompts)))

    @torch.no_grad()
    def evaluate(self, net: nn.Module, rng: torch.Generator) -> dict[str, float]:
        """Judge metrics of generator `net` on 20 samples per class (the judges never enter training)."""
        from .judges import Judges

        prompts = [p for p in text.eval_prompts() for _ in range(20)]
        images = self.sample_grid(net, prompts, rng)
        return Judges.load(self.dir, self.device).metrics(images, prompts)

    @torch.no_grad()
    def sample_reference(self, prompts: Sequence[str], z: torch.Tensor, steps: int = 50,
                         guidance: float | None = None) -> torch.Tensor:
        """The teacher's multi-step samples (diffusers DDIM, eta 0) from noise z [n, 1, 16, 16]
        (`sample_noise`), images [n, 1, 16, 16] in [0, 1]."""
        from diffusers import DDIMScheduler

        w = self.guidance_scale if guidance is None else float(guidance)
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        sched.set_timesteps(steps)
        cond = self.encode_prompts(prompts)
        x = z.to(self.device)
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t), device=self.device, dtype=torch.long)
            x = sched.step(self.reference_eps(x, tt, cond, w), int(t), x).prev_sample
        return self.decode(x)


def build_bundle(model_cfg, device: torch.device | str = "cpu") -> DigitsBundle:
    """The digits bundle from a distar.config.DigitsModel (weights_dir None = shipped files)."""
    wdir = weights_dir(model_cfg.weights_dir)
    if model_cfg.generator == "teacher":  # distillation starts the generator from the teacher itself
        gen = None
    elif model_cfg.generator is not None:
        gen = resolve_generator_file(model_cfg.generator)
    else:
        gen = wdir / FILES["onestep"]
        gen = gen if gen.is_file() else None  # before the one-step init exists: start from the teacher
    manifest = read_manifest(wdir)
    tau = model_cfg.conditioning_timestep
    if tau is None:
        tau = manifest.get("onestep", {}).get("config", {}).get("conditioning_timestep", DEFAULT_TAU)
    return DigitsBundle(wdir, gen, model_cfg.guidance_scale, tau, torch.device(device))
