"""The image and the local venv install from one dependency source: the Dockerfile's install lines and the
Makefile's setup recipe read the same requirements file for the torch pair, then the project's pyproject.toml;
the runtime_env alternative (jobs/runtime_env.py) lists the same. No image is built here (no Docker)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TORCH_TXT = "requirements/torch.txt"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The argument lists of every `pip install` in these shell commands (after `install`)."""
    found = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":  # pip, .venv/bin/pip, python -m pip
                rest = words[i + 2:]
                end = next((j for j, w in enumerate(rest) if w in ("&&", "||", ";", "|")), len(rest))
                found.append(rest[:end])
    return found


def _requirement_files(installs: list[list[str]]) -> list[str]:
    return [args[i + 1] for args in installs for i, a in enumerate(args) if a == "-r"]


def _project_installs(installs: list[list[str]]) -> list[str]:
    return [a for args in installs for a in args if a == "." or a.startswith(".[")]


def makefile_setup_commands() -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    out = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def dockerfile_run_commands() -> list[str]:
    return [args for word, args in dockerfile_instructions((ROOT / "Dockerfile").read_text()) if word == "RUN"]


def test_dockerfile_and_makefile_install_from_the_same_source():
    make, docker = pip_installs(makefile_setup_commands()), pip_installs(dockerfile_run_commands())
    assert _requirement_files(make) == _requirement_files(docker) == [TORCH_TXT]
    assert _project_installs(make) == [".[dev]"] and _project_installs(docker) == ["."]
    for installs in (make, docker):  # torch first, then the project (whose ranges then keep that build)
        order = [i for i, args in enumerate(installs) if "-r" in args or _project_installs([args])]
        assert "-r" in installs[order[0]] and _project_installs([installs[order[-1]]])
        assert not any(a.startswith(("torch", "torchvision")) for args in installs for a in args), installs
    assert "torch==" not in (ROOT / "Makefile").read_text() + (ROOT / "Dockerfile").read_text()


def test_dockerfile_copies_the_requirements_before_installing_them_and_takes_an_index_url():
    steps = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    copy = next(i for i, (w, a) in enumerate(steps) if w == "COPY" and TORCH_TXT in a)
    run = next(i for i, (w, a) in enumerate(steps) if w == "RUN" and TORCH_TXT in a)
    assert copy < run
    assert any(w == "ARG" and a.startswith("TORCH_INDEX_URL=https://") for w, a in steps)
    assert "--index-url ${TORCH_INDEX_URL}" in steps[run][1]
    assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE_IMAGE}")


def test_the_parsers_see_what_a_wrong_file_would_do():
    installs = pip_installs(["pip install torch==2.14.1 && python -m pip install -q -e '.[dev]'"])
    assert installs == [["torch==2.14.1"], ["-q", "-e", ".[dev]"]] and _requirement_files(installs) == []
    steps = dockerfile_instructions("# c\nFROM x\nRUN a \\\n  && b\n")
    assert steps == [("FROM", "x"), ("RUN", "a    && b")]


def _pinned() -> dict[str, Version]:
    reqs = [Requirement(line) for line in (ROOT / TORCH_TXT).read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs), reqs
    return {r.name: Version(next(iter(r.specifier)).version) for r in reqs}


def test_the_pinned_pair_satisfies_pyproject_also_as_a_cuda_build():
    pinned = _pinned()
    assert set(pinned) == {"torch", "torchvision"}
    deps = {Requirement(d).name: Requirement(d) for d in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, version in pinned.items():
        for build in (str(version), f"{version}+cu128"):  # what the CUDA index serves
            assert deps[name].specifier.contains(build), (name, build, deps[name])


def test_runtime_env_lists_the_same_pins_and_ray_accepts_it():
    from ray.runtime_env import RuntimeEnv

    from jobs.runtime_env import TORCH_INDEX_URL, runtime_env

    env = runtime_env()
    packages = env["pip"]["packages"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert packages[:2] == [f"{n}=={v}" for n, v in _pinned().items()]
    assert packages[2:] == [d for d in deps if Requirement(d).name != "ray"]
    assert env["pip"]["pip_install_options"][-2:] == ["--extra-index-url", TORCH_INDEX_URL]
    docker_default = next(a for w, a in dockerfile_instructions((ROOT / "Dockerfile").read_text())
                          if w == "ARG" and a.startswith("TORCH_INDEX_URL="))
    assert docker_default == f"TORCH_INDEX_URL={TORCH_INDEX_URL}"
    RuntimeEnv(**env)  # Ray's own validation of pip / working_dir
