"""The digits world for inference only: the one-step generator, the text encoder and the decoder, with no
teacher or fake score in memory, and the same code path (`DigitsBundle`'s methods) as training, so an image
is the same bits either way. Also the diffusers export (`pipeline.py`'s DigitsOneStepPipeline) and loading
that export back.

    generator_bundle(DigitsModel(...), device, dtype)      a run's generator, the shipped one-step model
    export_pipeline(bundle, net, out_dir)                   -> a directory diffusers loads (trust_remote_code)
    pipeline_bundle(out_dir, meta, device, dtype)           that directory back as a generator-only bundle
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ...bundle import unwrap
from ...model_registry import PIPELINE_META
from ...schedules import sd_alphas_cumprod
from . import data, models, text
from .bundle import DEFAULT_TAU, DigitsBundle, resolve_generator_file
from .files import FILES, read_manifest, weights_dir

PIPELINE_FILE = Path(__file__).with_name("pipeline.py")


class DigitsOneStep(DigitsBundle):
    """A DigitsBundle that holds only generator, text encoder and mean image (reference/fake_score None)."""

    def __init__(self, generator: nn.Module, text_encoder: nn.Module, mean_image: torch.Tensor, tau: int,
                 device: torch.device, tokenizer=None):
        self.device = torch.device(device)
        self.dir, self.manifest, self.guidance_scale, self.tau = None, {}, 1.0, int(tau)
        self.alphas_cumprod = sd_alphas_cumprod().to(self.device)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.reference = self.fake_score = None
        self.fake_score_matched = False
        self.mean_image = mean_image.float().to(self.device)
        self.tokenizer = tokenizer
        self.cache_prompts, self._prompt_cache, self._cache_key = True, {}, None

    def _no_reference(self, *args, **kwargs):
        raise RuntimeError("this digits model was loaded for inference (generator only): it has no reference "
                           "or fake score; use distar.worlds.build_bundle for training or the teacher")

    eps_fake = eps_ref = reference_eps = sample_reference = evaluate = _no_reference

    def frozen_modules(self) -> Sequence[nn.Module]:
        return [self.text_encoder]


def generator_bundle(model_cfg, device: torch.device, dtype: torch.dtype = torch.float32) -> DigitsOneStep:
    """The generator named by a DigitsModel section (None = the shipped one-step model), for inference."""
    wdir = weights_dir(model_cfg.weights_dir)
    if model_cfg.generator == "teacher":
        gen_file = wdir / FILES["teacher"]
    elif model_cfg.generator is not None:
        gen_file = resolve_generator_file(model_cfg.generator)
    else:
        gen_file = wdir / FILES["onestep"]
        gen_file = gen_file if gen_file.is_file() else wdir / FILES["teacher"]
    tau = model_cfg.conditioning_timestep
    if tau is None:
        tau = read_manifest(wdir).get("onestep", {}).get("config", {}).get("conditioning_timestep", DEFAULT_TAU)
    generator = models.load_weights(models.build_unet(), gen_file)
    text_encoder = models.load_weights(models.build_text_encoder(), wdir / FILES["text_encoder"])
    if dtype != torch.float32:
        generator, text_encoder = generator.to(dtype), text_encoder.to(dtype)
    mean = data.load_split("teacher")[0].mean(0) * 2.0 - 1.0
    return DigitsOneStep(generator, text_encoder, mean, tau, device)


def pipeline_bundle(pipeline_dir: str | Path, meta: dict, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> DigitsOneStep:
    """A directory written by `export_pipeline`, as a generator-only bundle (no distar weights needed)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    d = Path(pipeline_dir)
    cfg = json.loads((d / "model_index.json").read_text())
    generator = UNet2DConditionModel.from_pretrained(d / "unet", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(d / "text_encoder", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(d / "tokenizer")
    mean = torch.tensor(cfg["mean_image"], dtype=torch.float32).view(1, data.SIZE, data.SIZE)
    return DigitsOneStep(generator, text_encoder, mean, cfg["conditioning_timestep"], device, tokenizer)


def export_pipeline(bundle: DigitsBundle, generator_net: nn.Module, out_dir: str | Path,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Save `generator_net` with the bundle's text encoder as a DigitsOneStepPipeline directory."""
    import importlib.util

    from diffusers import DDPMScheduler

    spec = importlib.util.spec_from_file_location("distar_digits_pipeline", PIPELINE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = Path(out_dir)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    unet, text_encoder = copy.deepcopy(unwrap(generator_net)).to("cpu"), copy.deepcopy(bundle.text_encoder).to("cpu")
    if dtype != torch.float32:
        unet, text_encoder = unet.to(dtype), text_encoder.to(dtype)
    pipe = module.DigitsOneStepPipeline(
        unet=unet, scheduler=scheduler, text_encoder=text_encoder,
        tokenizer=bundle.tokenizer or text.clip_tokenizer(), conditioning_timestep=bundle.tau,
        mean_image=bundle.mean_image.flatten().cpu().tolist(), max_length=text.MAX_LENGTH)
    pipe.save_pretrained(out)
    shutil.copy2(PIPELINE_FILE, out / "pipeline.py")
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", "DigitsOneStepPipeline"]  # diffusers loads the class from pipeline.py
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / PIPELINE_META).write_text(json.dumps({
        "world": "digits", "timesteps": [bundle.tau], "num_inference_steps": 1, "resolution": data.SIZE,
        "usage": "DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)(prompt, generator=...).images",
    }, indent=2))
    return out
