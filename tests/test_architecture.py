"""The shape of the code, checked by machine: import-linter's contracts (pyproject.toml), no import cycles,
small files and functions, no path outside the repository, and a wheel that stands alone."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("distar", "services", "jobs")


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_import_linter_contracts_are_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "4 kept" in out.stdout, out.stdout[-2000:]


def _cycles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), over every import grimp sees
    (function-local ones included)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v) & modules:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles_between_modules():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph(*CODE_DIRS, cache_dir=None)
    modules = {m for m in graph.modules if m.split(".")[0] in CODE_DIRS}
    assert _cycles(graph, modules) == []


def test_the_cycle_finder_finds_a_cycle():
    class Fake:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return set(self.edges.get(m, ()))

    assert _cycles(Fake(), {"a", "b", "c", "d"}) == [["a", "b", "c"]]


def test_files_under_400_lines_and_functions_under_80():
    long_files, long_functions = [], []
    for p in _sources(*CODE_DIRS):
        text = p.read_text()
        if text.count("\n") > 400:
            long_files.append(f"{p.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert long_files == [] and long_functions == []


def test_no_path_outside_the_repository():
    pattern = re.compile(r"sys\.path|PYTHONPATH|\.\./shared|/work/|/home/|/Users/")
    files = _sources(*CODE_DIRS, "tests") + [ROOT / f for f in ("README.md", "Makefile", "pyproject.toml")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files if p != Path(__file__)
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


@pytest.mark.slow
def test_wheel_holds_services_configs_weights_and_runs_installed(tmp_path):
    """`pip wheel --no-deps .` carries everything; an installed (non-editable) copy runs `distar --help`."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, timeout=600)
    wheel = next(wheels.glob("distar-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("services/reward_service.py", "services/generator_app.py", "distar/configs/digits_ray.yaml",
                     "distar/configs/sdxl_dmd2.yaml", "distar/weights/digits/teacher_unet.safetensors",
                     "distar/weights/digits/manifest.json", "distar/data/PartiPrompts.tsv", "distar/data/NOTICE.md"):
        assert required in names, required
    # a venv that sees the dependencies of this one but not its editable distar, with the wheel installed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv",
                    "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import distar, services; "
                            "print(distar.__file__); print(services.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert all(str(venv) in line for line in where.stdout.splitlines()), where.stdout
    for argv in (["--help"], ["serve", "--help"], ["train", "--config", "digits_ray", "--print-config"]):
        out = subprocess.run([str(venv / "bin" / "distar"), *argv], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, (argv, out.stderr[-2000:])
