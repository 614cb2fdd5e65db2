"""`distar eval --prompts`: the Parti path end to end on tiny random-init SD1.5 models and rewards (offline).

A 6-prompt slice of the shipped PartiPrompts (`--prompts parti`), a 2-step CFG reference and a one-step
checkpoint trained for one step (given twice as METHOD@alpha runs, so the plot is drawn), the four paper
rewards built tiny on disk. Checked: table files, columns and categories; identical scores from two fresh
runs; a re-run generates nothing and gives the same scores; one-line errors naming the bad argument.
"""
from __future__ import annotations

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

try:
    from . import eval_fixtures
except ImportError:
    import eval_fixtures

from distar.cli import main
from distar.evaluation import models as eval_models

from distar.prompts import SHIPPED

PARTI = SHIPPED["parti"]
LIMIT = 6
COLUMNS = ["model", "steps", "ImageReward", "Aesthetic", "PickScore", "CLIP"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from .fid_fixtures import save_random_inception

    root = tmp_path_factory.mktemp("eval_fx")
    return {**eval_fixtures.build_all(root), "inception": save_random_inception(root / "inception.pth")}


def _argv(fx, out):
    return ["eval", "--prompts", "parti", "--limit", str(LIMIT), "--images-per-prompt", "1", "--steps", "2",
            "--seed", "3", "--threads", "1", "--out", str(out),
            "--models", f"SD1.5-tiny=ref@2:{fx['sd15']}", f"DIstar@1={fx['onestep']}", f"DIstar@10={fx['onestep']}",
            "--rewards", *(f"{n}:{fx[n]}" for n in ("image_reward", "aesthetic", "pickscore", "clip_score"))]


@pytest.fixture
def count_generation(monkeypatch):
    calls = []
    real = eval_models.EvalModel.generate

    def counted(self, prompts, seeds):
        calls.append((self.label, len(prompts)))
        return real(self, prompts, seeds)

    monkeypatch.setattr(eval_models.EvalModel, "generate", counted)
    return calls


def test_parti_slice_table_determinism_and_resume(fx, tmp_path, count_generation):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(fx, a)) == 0
    assert {lab for lab, _ in count_generation} == {"SD1.5-tiny", "DIstar@1", "DIstar@10"}
    res = json.loads((a / "results.json").read_text())
    assert res["columns"][:6] == COLUMNS and res["columns"][-1] == "s / image"
    assert [r["model"] for r in res["rows"]] == ["SD1.5-tiny", "DIstar@1", "DIstar@10"]
    assert res["rows"][0]["steps"] == 2 and res["rows"][1]["steps"] == 1
    assert all(r["images"] == LIMIT and r["s / image"] > 0 for r in res["rows"])
    with PARTI.open() as f:
        cats = [row["Category"] for row in csv.DictReader(f, delimiter="\t")][:LIMIT]
    assert set(res["per_category"]["DIstar@1"]) == set(cats) and sum(res["category_counts"].values()) == LIMIT
    md = (a / "results.md").read_text()
    assert "| model | steps | ImageReward | Aesthetic | PickScore | CLIP |" in md and "## Per category" in md
    assert res["rows"][0][res["columns"][-2]] == 0.0  # the reference's divergence proxy against itself
    for f in ("scores.json", "reward_vs_divergence.png", "grids/comparison.png", "grids/SD1.5-tiny.png"):
        assert (a / f).is_file(), f
    assert len(list((a / "images" / "DIstar@1").glob("p*_0.png"))) == LIMIT

    # a second fresh run: same images, same scores (per-image seeds; PNGs are scored)
    assert main(_argv(fx, b)) == 0
    assert json.loads((b / "scores.json").read_text()) == json.loads((a / "scores.json").read_text())
    for name in ("SD1.5-tiny", "DIstar@10"):
        for p in (a / "images" / name).glob("*.png"):
            assert p.read_bytes() == (b / "images" / name / p.name).read_bytes()

    # resume (logging to MLflow, and FID + CLIP-FD against a folder, this time): nothing generated again (no
    # generate() call, PNGs untouched)
    count_generation.clear()
    stamps = {p: p.stat().st_mtime_ns for p in (a / "images").rglob("*.png")}
    fid = ["--fid-ref", str(a / "images" / "SD1.5-tiny"), "--fid-weights", str(fx["inception"]),
           "--clip-fd", str(fx["clip_score"])]
    assert main(_argv(fx, a) + fid + ["--mlflow", "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    assert count_generation == []
    assert {p: p.stat().st_mtime_ns for p in (a / "images").rglob("*.png")} == stamps
    assert json.loads((a / "results.json").read_text())["generated"] == {"SD1.5-tiny": 0, "DIstar@1": 0, "DIstar@10": 0}
    assert json.loads((a / "scores.json").read_text()) == json.loads((b / "scores.json").read_text())
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        json.loads((a / "results.json").read_text())["mlflow_run_id"])
    assert run.data.metrics["DIstar_1/CLIP"] == pytest.approx(res["rows"][1]["CLIP"])
    with_fid = json.loads((a / "results.json").read_text())
    assert with_fid["columns"][6:8] == ["FID", "CLIP-FD"] and with_fid["fid_ref_images"] == LIMIT
    ref_row, one_step = with_fid["rows"][0], with_fid["rows"][1]
    assert abs(ref_row["FID"]) < 1e-3 * one_step["FID"] and one_step["FID"] > 0  # the folder holds the ref's images
    assert abs(ref_row["CLIP-FD"]) < 1e-3 * one_step["CLIP-FD"] and one_step["CLIP-FD"] > 0
    assert run.data.metrics["DIstar_1/FID"] == pytest.approx(one_step["FID"])
    assert "| FID | CLIP-FD |" in (a / "results.md").read_text()
    images = {f.path for f in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(run.info.run_id,
                                                                                                 "images")}
    assert any("comparison" in p for p in images), images  # grids through MLflow's image API

    # a cache made with other settings is refused, not mixed
    argv = _argv(fx, a)
    argv[argv.index("--seed") + 1] = "4"
    assert main(argv) == 2


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_bad_inputs_name_the_argument(fx, tmp_path, capsys, count_generation):
    argv = _argv(fx, tmp_path / "out")
    bad = list(argv)
    bad[bad.index("--prompts") + 1] = str(tmp_path / "no_such.tsv")
    _one_line_error(capsys, bad, "--prompts")
    bad = list(argv)
    bad[bad.index("--rewards") + 1] = "imagereward"
    _one_line_error(capsys, bad, "--rewards 'imagereward'")
    bad = list(argv)
    bad[bad.index("--models") + 2] = f"DIstar@1={tmp_path / 'no_such_ckpt'}"
    _one_line_error(capsys, bad, "--models DIstar@1=")
    bad = list(argv)
    bad[bad.index("--models") + 1] = f"ref=ref@2:{tmp_path}"  # a directory that is not a pipeline
    _one_line_error(capsys, bad, "--models")
    _one_line_error(capsys, argv + ["--clip-fd", str(fx["clip_score"])], "--clip-fd")  # without --fid-ref
    _one_line_error(capsys, argv + ["--fid-ref", str(tmp_path / "nowhere")], "--fid-ref")  # before generating
    _one_line_error(capsys, argv + ["--device", "gpu"], "--device 'gpu': expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        _one_line_error(capsys, argv + ["--device", "cuda:7"], "--device 'cuda:7'")
    assert count_generation == []  # every error came before any generation
