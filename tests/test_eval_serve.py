"""`distar eval --rewards-backend serve`: the same scores as in-process scoring, through the reward Serve apps.

Scores the images cached by an in-process run (so nothing is generated again), on the shared local cluster;
the apps this evaluation started are deleted afterwards.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

try:
    from . import eval_fixtures
except ImportError:
    import eval_fixtures

from distar.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120), pytest.mark.usefixtures("serve_module")]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_serve_fx")
    sd15 = eval_fixtures.tiny_sd.save_sd15(root)
    return {"sd15": sd15, "clip_score": eval_fixtures.tiny_sd.save_open_clip_dir(root / "clip")}


def test_serve_backend_scores_equal_local(fx, tmp_path, ray_cluster):
    from ray import serve

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\n# a comment\na photo of a cat\na blue painting\n")
    argv = ["eval", "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2", "--threads", "1",
            "--out", str(tmp_path / "out"), "--models", f"ref=ref@2:{fx['sd15']}",
            "--rewards", f"clip_score:{fx['clip_score']}"]
    assert main(argv) == 0
    local = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert main(argv + ["--rewards-backend", "serve"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["generated"] == {"ref": 0} and res["category_counts"] == {"(none)": 3}
    remote = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert len(remote["ref"]["CLIP"]) == 6
    assert remote["ref"]["CLIP"] == pytest.approx(local["ref"]["CLIP"], rel=1e-5, abs=1e-5)
    assert not [a for a in serve.status().applications if a.startswith("distar-reward-")]  # cleaned up
