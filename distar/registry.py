"""Explicit name -> implementation mappings for worlds (model bundles), built-in models and reward models.

Values are "module:attribute" strings imported on first use, so naming a reward does not import every
reward library. Adding a world or a reward means adding one line here.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

# world name -> builder(model_cfg, device) -> ModelBundle
WORLDS: dict[str, str] = {
    "gaussian2d": "distar.worlds.gaussian2d:build_bundle",
    "digits": "distar.worlds.digits.bundle:build_bundle",
    "sd15": "distar.worlds.sd.bundle:build_bundle",
    "sdxl": "distar.worlds.sd.bundle:build_bundle",
}

# world name -> builder(model_cfg, device, shard) -> ModelBundle whose big networks are built already sharded by
# `shard(module)` (FSDP, distar.fsdp.fsdp_hooks), so no rank holds them whole. Other worlds build with WORLDS and
# are sharded afterwards.
SHARDED_WORLDS: dict[str, str] = {
    "sd15": "distar.worlds.sd.sharded_build:build_sharded_bundle",
    "sdxl": "distar.worlds.sd.sharded_build:build_sharded_bundle",
}

# world name -> plan_models(run_cfg) -> distar.memory_plan.PlanModels: the networks `distar plan` counts (SD: built
# on the meta device from the architecture configs; small worlds: their bundle, built on the CPU)
PLAN_MODELS: dict[str, str] = {
    "gaussian2d": "distar.worlds.plan_from_bundle:plan_models",
    "digits": "distar.worlds.plan_from_bundle:plan_models",
    "sd15": "distar.worlds.sd.plan:plan_models",
    "sdxl": "distar.worlds.sd.plan:plan_models",
}

# built-in model name -> builder(device, weights_dir | None) -> (bundle, multistep); see distar.loading
BUILTIN_MODELS: dict[str, str] = {
    "digits-teacher": "distar.worlds.digits.builtins:teacher",
    "digits-onestep": "distar.worlds.digits.builtins:onestep",
}

# Inference only (generate, serve, pyfunc, export): world -> builder(model_cfg, device, dtype) -> a bundle that
# holds the generator, decoder and text encoders but no reference or fake score. Worlds without one (the
# 2-D world) load through WORLDS.
GENERATOR_LOADERS: dict[str, str] = {
    "digits": "distar.worlds.digits.inference:generator_bundle",
    "sd15": "distar.worlds.sd.inference:generator_bundle",
    "sdxl": "distar.worlds.sd.inference:generator_bundle",
}

# exported pipelines (`distar export`): world -> export(bundle, generator_net, out_dir, dtype) -> out_dir, and
# world -> builder(pipeline_dir, distar_one_step.json as a dict, device, dtype) -> a generator-only bundle
PIPELINE_EXPORTERS: dict[str, str] = {
    "digits": "distar.worlds.digits.inference:export_pipeline",
    "sd15": "distar.worlds.sd.export:export_one_step_pipeline",
    "sdxl": "distar.worlds.sd.export:export_one_step_pipeline",
}
PIPELINE_LOADERS: dict[str, str] = {
    "digits": "distar.worlds.digits.inference:pipeline_bundle",
    "sd15": "distar.worlds.sd.inference:pipeline_bundle",
    "sdxl": "distar.worlds.sd.inference:pipeline_bundle",
}

# how evaluation's `ref:PIPELINE` specs load: source, guidance, device, dtype -> (sampling-only bundle, world)
REFERENCE_PIPELINES: dict[str, str] = {"diffusers": "distar.worlds.sd.bundle:reference_bundle"}

# reward name -> builder(path: str | None, device) -> nn.Module with forward(images [B,C,H,W] in [0,1], prompts) -> [B]
REWARDS: dict[str, str] = {
    "region": "distar.worlds.gaussian2d:build_region_reward",
    "digits_alignment": "distar.worlds.digits.rewards:build_alignment_reward",
    "digits_boldness": "distar.worlds.digits.rewards:build_boldness_reward",
    "image_reward": "distar.rewards.image_reward:build_image_reward",
    "pickscore": "distar.rewards.pickscore:build_pickscore",
    "clip_score": "distar.rewards.clip_score:build_clip_score",
    "aesthetic": "distar.rewards.aesthetic:build_aesthetic",
    "hpsv2": "distar.rewards.hpsv2:build_hpsv2",
}


def resolve(table: dict[str, str], name: str, what: str) -> Callable[..., Any]:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}: expected one of {sorted(table)}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)
