"""Models in the formats people load (digits world, CPU, MLflow in a tmp SQLite store): `distar export` writes a
pipeline diffusers runs; registration stores that pipeline as a models-from-code pyfunc whose predict(params=
{"seed": S, "count": N}) gives the PNG bytes `distar generate --seed S --n N` writes."""
from __future__ import annotations

import base64
import json

import pytest
import torch

pytest.importorskip("mlflow")

from distar.cli import main  # noqa: E402

PROMPT = "a handwritten digit 3"
URI = "models:/distar-digits@champion"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A "trained" digits generator in a run's final/, registered as models:/distar-digits@champion."""
    from distar import tracking

    try:
        from .registry_fixtures import digits_run
    except ImportError:
        from registry_fixtures import digits_run

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
        ckpt, run_id = digits_run(tmp, uri, "pyfunc-test")
        tracking.register_generator(uri, run_id, ckpt, "distar-digits", "champion")
        yield tmp, ckpt, uri


def _cli_pngs(out, model: str, n: int, seed: int) -> list[bytes]:
    assert main(["generate", "--model", model, "--prompt", PROMPT, "--n", str(n), "--seed", str(seed),
                 "--out", str(out)]) == 0
    return [(out / f"sample_{i:04d}.png").read_bytes() for i in range(n)]


def test_pyfunc_predict_equals_distar_generate(registered, monkeypatch):
    import mlflow

    tmp, ckpt, uri = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(URI)
    out = model.predict([PROMPT, "the digit seven"], params={"seed": 3, "count": 2})
    assert list(out["prompt"]) == [PROMPT, PROMPT, "the digit seven", "the digit seven"]
    assert list(out["index"]) == [0, 1, 0, 1] and set(out["seed"]) == {3}
    pngs = [base64.b64decode(s) for s in out["png_base64"]]
    assert pngs[:2] == _cli_pngs(tmp / "cli3", str(ckpt), 2, 3)     # the same bytes as `distar generate`
    other = model.predict([PROMPT], params={"seed": 4})                # the seed is not dropped
    assert base64.b64decode(other["png_base64"][0]) == _cli_pngs(tmp / "cli4", str(ckpt), 1, 4)[0] != pngs[0]


def test_registered_artifact_is_the_pipeline_and_code(registered, monkeypatch):
    from mlflow.artifacts import download_artifacts

    tmp, _, uri = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    local = download_artifacts(artifact_uri=URI, dst_path=str(tmp / "dl"))
    from pathlib import Path

    root = Path(local)
    mlmodel = (root / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel     # models-from-code
    assert not list(root.rglob("python_model.pkl"))                         # nothing cloudpickled
    from mlflow.models import Model

    params = {p.name: p.default for p in Model.load(str(root / "MLmodel")).signature.params.params}
    assert params == {"seed": 0, "count": 1}                                 # params in the signature
    reqs = (root / "requirements.txt").read_text().split()
    assert not [r for r in reqs if r.split("==")[0] == "distar"] and "diffusers==" in " ".join(reqs)
    assert (root / "code" / "distar" / "loading.py").is_file()              # the code travels with the model
    assert not (root / "code" / "distar" / "weights").exists()
    pipe = root / "artifacts" / "pipeline"
    assert json.loads((pipe / "model_index.json").read_text())["_class_name"] == ["pipeline", "DigitsOneStepPipeline"]


def test_export_digits_loads_in_diffusers_and_in_distar(tmp_path):
    from diffusers import DiffusionPipeline

    from distar.loading import load_model, seeded_rng

    out = tmp_path / "digits_pipeline"
    assert main(["export", "--model", "digits-onestep", "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    theirs = pipe([PROMPT], num_images_per_prompt=3, generator=torch.Generator().manual_seed(5),
                  output_type="pt").images
    ours = load_model("digits-onestep").sample([PROMPT] * 3, seeded_rng(5))
    assert theirs.shape == ours.shape == (3, 1, 16, 16)
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    assert not torch.allclose(theirs[0], theirs[1], atol=1e-3)               # the comparison sees the noise
    assert pipe(PROMPT).images[0].size == (16, 16)                           # PIL output too
    # the exported directory is a model spec for distar itself: same bytes as the model it came from
    assert _cli_pngs(tmp_path / "a", str(out), 2, 7) == _cli_pngs(tmp_path / "b", "digits-onestep", 2, 7)


def test_export_bad_input_names_the_argument(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv, flag in ((["--model", "digits-onestep", "--out", str(tmp_path / "full")], "--out"),
                       (["--model", "digits-teacher", "--out", str(tmp_path / "t")], "--model"),
                       (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "n")], "--model")):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err
