"""Tiny random-init SD1.5 (saved and loaded back through the real loading code): a served replica holds one
UNet, not three; `distar export` writes a pipeline diffusers loads and runs; the registry holds that pipeline."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd
pipeline_dirs = tiny_sd.pipeline_dirs  # a fixture

from distar.cli import main  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse"


@pytest.fixture(scope="module")
def checkpoint(pipeline_dirs, tmp_path_factory):
    """A run's final/ for the tiny SD1.5: config.yaml + a "trained" generator.safetensors."""
    from distar.checkpoint import save_generator_dir
    from distar.config import dump_config, load_config

    cfg = load_config("sd15", [f"model.reference={pipeline_dirs['sd15']}", "model.resolution=16", "name=tiny-sd"])
    b = tiny_sd.build("sd15", pipeline_dirs["sd15"])
    with torch.no_grad():
        for p in b.generator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_generator_dir(tmp_path_factory.mktemp("run") / "final", b.generator.state_dict(), dump_config(cfg),
                              {"step": 1})


def _unets(root) -> set[int]:
    """ids of the distinct UNets reachable from `root` through attributes, containers and dataclasses."""
    from diffusers import UNet2DConditionModel

    seen, found, todo = set(), set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.Tensor)):
            continue
        seen.add(id(obj))
        if isinstance(obj, UNet2DConditionModel):
            found.add(id(obj))
        elif isinstance(obj, torch.nn.Module):
            continue  # a text encoder or VAE holds no UNet
        elif isinstance(obj, dict):
            todo += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo += list(obj)
        elif hasattr(obj, "__dict__"):
            todo += list(vars(obj).values())
    return found


def test_served_replica_holds_one_unet(checkpoint, pipeline_dirs):
    from distar.serving.config import GeneratorAppConfig
    from distar.serving.service import GeneratorService

    c = GeneratorAppConfig(model=str(checkpoint), device="cpu")
    service = GeneratorService(c.model, c.device, c.reference, c.weights_dir, c.torch_threads)  # as the replica does
    assert len(_unets(service)) == 1
    assert len(_unets(tiny_sd.build("sd15", pipeline_dirs["sd15"]))) == 3   # what training holds: the count sees it
    model = service.model
    assert model.bundle.reference is None and model.bundle.fake_score is None
    from safetensors.torch import load_file

    want = load_file(str(checkpoint / "generator.safetensors"))
    got = model.net.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_export_tiny_sd_loads_in_diffusers_and_registers(checkpoint, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, LCMScheduler

    from distar import tracking
    from distar.config import dump_config, load_config
    from distar.loading import load_model

    out = tmp_path / "pipe"
    assert main(["export", "--model", str(checkpoint), "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, LCMScheduler)
    meta = json.loads((out / "distar_one_step.json").read_text())
    assert meta["timesteps"] == [999]                                       # sd15.yaml's tau, not the default 399
    theirs = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, timesteps=meta["timesteps"], height=16, width=16,
                  generator=torch.Generator().manual_seed(1), output_type="pt").images
    lm = load_model(str(checkpoint))
    ours = lm.sample([PROMPT], torch.Generator().manual_seed(1))
    assert theirs.shape == ours.shape == (1, 3, 16, 16)
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config(checkpoint / "config.yaml")
    run_id = tracking.start_run(uri, cfg, dump_config(cfg), "tiny-sd")
    tracking.register_generator(uri, run_id, checkpoint, "tiny-sd", "champion")
    from distar.model_registry import resolve_registry_uri

    local = resolve_registry_uri("models:/tiny-sd@champion")
    assert (local / "model_index.json").is_file() and (local / "unet").is_dir()   # the registry holds the pipeline
    a, b = tmp_path / "a", tmp_path / "b"
    for spec, d in (("models:/tiny-sd@champion", a), (str(checkpoint), b)):
        assert main(["generate", "--model", spec, "--prompt", PROMPT, "--n", "1", "--seed", "2", "--out", str(d)]) == 0
    assert (a / "sample_0000.png").read_bytes() == (b / "sample_0000.png").read_bytes()
