"""distar's MLflow pyfunc: a registered one-step model that `mlflow.pyfunc.load_model` and `mlflow models serve`
run without distar installed.

    model = mlflow.pyfunc.load_model("models:/distar-digits@champion")
    out = model.predict(["a handwritten digit 3"], params={"seed": 3, "count": 4})
    png = base64.b64decode(out["png_base64"][0])      # the bytes `distar generate --seed 3 --n 4` writes first

What is logged (`log_pyfunc`):
- artifacts/pipeline/  the exported diffusers pipeline (distar.export), the model's only weights;
- python_model         pyfunc_model.py, MLflow's models-from-code (no cloudpickle);
- code/distar/         this package's source (code_paths; the shipped digits weights and prompt data left
                       out), put on the import path at load time: "distar" is not on PyPI, so it is not a requirement;
- requirements         the exact versions of the libraries that code imports at inference time;
- signature            input: one string column of prompts (a list, or a DataFrame column `prompt`); params seed (long, 0) and count (long, 1);
                       output: prompt, index, seed, png_base64 (one row per image, prompt-major).

Images are drawn exactly as `distar serve` draws them (GeneratorService), on CUDA when present.
"""
from __future__ import annotations

import base64
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow.pyfunc

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
ARTIFACT = "pipeline"
# what the inference path imports (distar.loading, serving.service, the worlds' inference loaders)
RUNTIME_PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "peft", "pydantic", "pyyaml", "pillow",
                    "numpy", "pandas", "mlflow")
NOT_SHIPPED = ("weights", "data", "__pycache__")  # large and unused at inference: the export holds the weights


class DistarGenerator(mlflow.pyfunc.PythonModel):
    """prompts -> PNG images (see the module docstring)."""

    def load_context(self, context):
        from .service import GeneratorService

        self.service = GeneratorService(context.artifacts[ARTIFACT], device="auto")

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from .service import Job

        if hasattr(model_input, "columns"):
            col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[col]]
        else:
            prompts = [model_input] if isinstance(model_input, str) else [str(p) for p in model_input]
        params = params or {}
        seed, count = int(params.get("seed", 0)), int(params.get("count", 1))
        if count < 1:
            raise ValueError(f"params.count must be >= 1, got {count}")
        pngs = self.service.generate([Job(tuple(prompts), count, seed)])[0]
        return pd.DataFrame({"prompt": [p for p in prompts for _ in range(count)],
                             "index": [k for _ in prompts for k in range(count)], "seed": seed,
                             "png_base64": [base64.b64encode(b).decode("ascii") for b in pngs]})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a plain list of prompts is valid input
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "index"), ColSpec("long", "seed"),
                        ColSpec("string", "png_base64")]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("count", "long", 1)]))


def pip_requirements() -> list[str]:
    """Exact versions installed here (a local build label such as torch's +cu130 dropped: PyPI has none)."""
    reqs = []
    for name in RUNTIME_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_pyfunc(pipeline_dir: str | Path, workdir: str | Path, name: str = "generator"):
    """Log `pipeline_dir` as a pyfunc model in the active MLflow run; `workdir` holds the copied code."""
    code = Path(workdir) / "code" / "distar"
    shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns(*NOT_SHIPPED), dirs_exist_ok=True)
    return mlflow.pyfunc.log_model(name=name, python_model=str(MODEL_CODE), artifacts={ARTIFACT: str(pipeline_dir)},
                                   code_paths=[str(code)], signature=signature(), pip_requirements=pip_requirements())
