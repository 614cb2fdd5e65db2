"""A diffusers pipeline for the digits world's one-step generator (standalone: imports torch and diffusers only).

`distar export` copies this file into the exported directory as `pipeline.py` and names it in
model_index.json (`_class_name: ["pipeline", "DigitsOneStepPipeline"]`), so diffusers loads the directory
with no distar installed:

    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)
    images = pipe("a handwritten digit 3", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images

No standard diffusers pipeline fits: the digits model works in pixel space (no VAE), encodes prompts to 16
CLIP tokens, and its generator denoises x_tau = alpha_tau m + sigma_tau z from the mean training image m:
    x0 = (x_tau - sigma_tau eps_theta(x_tau, tau, c)) / alpha_tau,   image = (x0 + 1) / 2 clamped to [0, 1].
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput


class DigitsOneStepPipeline(DiffusionPipeline):
    """unet: the one-step generator (UNet2DConditionModel, 1 channel); text_encoder: CLIPTextModel;
    tokenizer: CLIPTokenizer; scheduler: the DDPM scheduler whose alphas_cumprod define alpha_tau, sigma_tau."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, conditioning_timestep: int = 499,
                 mean_image: Optional[List[float]] = None, max_length: int = 16):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(conditioning_timestep=int(conditioning_timestep), max_length=int(max_length),
                                mean_image=list(mean_image) if mean_image is not None else None)

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.config.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], num_images_per_prompt: int = 1,
                 generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True):
        """`latents`: the noise z [n, 1, H, W] (drawn on the CPU from `generator` when None)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        size = self.unet.config.sample_size
        if latents is None:
            latents = torch.randn((len(prompts), self.unet.config.in_channels, size, size), generator=generator)
        z = latents.to(self.device, torch.float32)
        tau = self.config.conditioning_timestep
        abar = self.scheduler.alphas_cumprod.float().to(self.device)[torch.full((z.shape[0],), tau, device=self.device)]
        alpha, sigma = abar.sqrt().view(-1, 1, 1, 1), (1.0 - abar).sqrt().view(-1, 1, 1, 1)
        mean = torch.tensor(self.config.mean_image, dtype=torch.float32, device=self.device).view(1, *z.shape[1:])
        x_tau = alpha * mean.expand_as(z) + sigma * z
        dtype = self.unet.dtype
        hidden = self.encode_prompt(prompts).to(dtype)
        t = torch.full((z.shape[0],), tau, device=self.device, dtype=torch.long)
        eps = self.unet(x_tau.to(dtype), t, encoder_hidden_states=hidden).sample.float()
        images = ((x_tau - sigma * eps) / alpha + 1.0).mul(0.5).clamp(0.0, 1.0)
        if output_type == "pt":
            out = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            out = arr if output_type == "np" else self.numpy_to_pil(arr)  # one channel: mode L
        return ImagePipelineOutput(images=out) if return_dict else (out,)
