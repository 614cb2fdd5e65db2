"""LoRA runs checkpoint their adapters only, and final/ holds them in the file diffusers' `load_lora_weights`
reads; `train.keep_checkpoints` prunes older complete checkpoints, never one being written. A tiny SD1.5
trained in this process."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distar import checkpoint as ckpt
from distar.config import load_config
from distar.train_loop import run_training

try:
    from . import tiny_sd
except ImportError:
    import tiny_sd
pipeline_dirs = tiny_sd.pipeline_dirs  # a fixture


def _cfg(reference, out, steps: int):
    return load_config("sd15", [f"model.reference={reference}", "model.dtype=float32", "model.resolution=null",
                                "model.gradient_checkpointing=false", "model.lora_rank=4", "loss.alpha_rew=0",
                                "reward.terms=[]", f"train.steps={steps}", "train.batch_size=2",
                                "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.log_every=1",
                                "train.sample_every=0", "train.ema_decay=0.5", "train.device=cpu",
                                "train.threads=1", f"train.out_dir={out}", "ray.num_workers=0",
                                "train.generator_optim.lr=1e-2", "prompts=[a cat, a red house]"])


@pytest.mark.timeout(300)
def test_lora_run_checkpoints_adapters_and_diffusers_loads_them(pipeline_dirs, tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    from distar.worlds.sd.loading import add_lora

    ref = pipeline_dirs["sd15"]
    run_training(_cfg(ref, tmp_path / "run", 3))
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert steps == ["step_0000002", "step_0000003"]            # keep_checkpoints=2 pruned step 1
    last = ckpt.latest_checkpoint(tmp_path / "run")
    saved = ckpt.load_train_state(last)
    for part in ("generator", "fake_score"):                       # adapters only, never the frozen base
        assert saved[part] and all("lora_" in k for k in saved[part]), part
    assert not (last / ckpt.GENERATOR_FILE).exists() and (last / ckpt.ADAPTER_FILE).is_file()

    final = tmp_path / "run" / "final"
    trained = tiny_sd.tiny_unet(False)                             # the trained EMA generator, from final/
    trained.load_state_dict(_base_weights(ref))
    add_lora(trained, 4)
    trained.load_state_dict(ckpt.load_generator_state(final))
    pipe = StableDiffusionPipeline.from_pretrained(str(ref), safety_checker=None)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), torch.randn(2, 77, 16)
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(final), weight_name=ckpt.ADAPTER_FILE)  # (offline mode wants the name)
        got, want = pipe.unet(x, t, encoder_hidden_states=text).sample, trained(x, t, encoder_hidden_states=text).sample
    assert (want - plain).abs().max() > 1e-4                       # training moved the adapters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # registration: the pipeline as the model, the adapters beside it (their URI in the version's tags)
    import mlflow
    from mlflow import MlflowClient

    from distar.tracking import register_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = register_run(tmp_path / "run", uri, name="tiny-lora")
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("tiny-lora", reg["version"])
    mlflow.set_tracking_uri(uri)
    got_dir = mlflow.artifacts.download_artifacts(version.tags["distar.lora_adapters"], dst_path=str(tmp_path / "dl"))
    assert (Path(got_dir) / ckpt.ADAPTER_FILE).read_bytes() == (final / ckpt.ADAPTER_FILE).read_bytes()

    res = run_training(_cfg(ref, tmp_path / "run", 4))            # resumes from the adapters-only checkpoint
    assert [h["step"] for h in res.history] == [4]


def _base_weights(ref):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(ref), subfolder="unet").state_dict()


def test_prune_keeps_the_newest_complete_and_never_touches_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_step_checkpoint(tmp_path, step, generator_state={"w": torch.zeros(1)}, config_yaml="",
                                  meta={"step": step}, train_state={"step": step})
    (root / ".step_0000004.tmp-x").mkdir()                         # being written
    half = root / "step_0000005"                                   # no meta.json: never complete
    half.mkdir()
    (half / ckpt.STATE_FILE).write_bytes(b"")
    assert [p.name for p in ckpt.prune_checkpoints(tmp_path, 2)] == ["step_0000001"]
    assert sorted(p.name for p in root.iterdir()) == [".step_0000004.tmp-x", "latest", "step_0000002",
                                                      "step_0000003", "step_0000005"]
    with pytest.raises(ValueError, match="keep_checkpoints"):
        ckpt.prune_checkpoints(tmp_path, 0)
