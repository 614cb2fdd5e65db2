"""The runtime_env for a Ray cluster that runs Ray's own base image instead of distar's (see Dockerfile).

    ray job submit --address http://HEAD:8265 --runtime-env-json "$(python -m jobs.runtime_env)" -- \\
        python -m jobs.train --config sdxl_dmd2 train.out_dir=/shared/runs/sdxl_dmd2 ...

Prints JSON: `working_dir: "."` (this checkout, uploaded by the submitter; .gitignore'd paths such as runs/
stay behind) and a `pip` list read from the same two files the Makefile and the Dockerfile install from:
the torch pair in requirements/torch.txt and pyproject.toml's dependencies (less Ray: the cluster's stays). Each node builds that virtualenv
once per distinct list (several GB for torch: minutes); the image is the faster route.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_REQUIREMENTS = ROOT / "requirements" / "torch.txt"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu128"  # the Dockerfile's default; "" = PyPI's build
PASSED_ENV = ("MLFLOW_TRACKING_URI", "HF_HOME")  # never the hub token: the job's env is shown in the dashboard


def requirement_lines(path: Path = TORCH_REQUIREMENTS) -> list[str]:
    """The requirements in a requirements file, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def project_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """[project].dependencies of pyproject.toml (the installed distribution's, on Python 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: what pip installed from the same pyproject.toml
        from importlib.metadata import requires

        return [r for r in requires("distar") or [] if "extra ==" not in r]
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def _not_ray(requirement: str) -> bool:
    """The cluster's own Ray stays: a second Ray in the job's virtualenv would not match the running one."""
    return re.match(r"[A-Za-z0-9_.-]+", requirement.strip()).group(0).lower() != "ray"


def runtime_env(torch_index_url: str = TORCH_INDEX_URL, working_dir: str = ".") -> dict:
    """A Ray runtime_env with the torch pair first, then the project's dependencies."""
    options = ["--disable-pip-version-check", "--no-cache-dir"]
    if torch_index_url:  # local versions (2.14.1+cu128) rank above PyPI's 2.14.1, so pip takes the index's build
        options += ["--extra-index-url", torch_index_url]
    env = {"working_dir": working_dir,
           "pip": {"packages": [r for r in requirement_lines() + project_dependencies() if _not_ray(r)],
                   "pip_install_options": options}}
    env_vars = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.runtime_env", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-index-url", default=TORCH_INDEX_URL,
                    help=f"index of the torch CUDA build (default {TORCH_INDEX_URL}; '' = PyPI's)")
    ap.add_argument("--working-dir", default=".", help="local directory or remote zip URL (default: .)")
    args = ap.parse_args(argv)
    print(json.dumps(runtime_env(args.torch_index_url, args.working_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
