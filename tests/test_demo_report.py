"""The main job's digits table: the cached reference row is used only when it matches the weights, and the
three conditions are checked as stated (no sampling here: `measure` is replaced where it would run)."""
import json
import shutil

import pytest

from distar.worlds.digits import files
from jobs.digits import demo_report


@pytest.fixture
def weights(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    for k in demo_report.KEYED_BY:
        shutil.copy(files.SHIPPED_DIR / files.FILES[k], d / files.FILES[k])
    return d


def test_reference_row_reuses_a_matching_cache_and_remeasures_a_stale_one(weights, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_report, "measure", lambda spec, label, d, n=100: calls.append(spec) or {"frechet": 9.0})
    assert demo_report.reference_row(weights) == {"frechet": 9.0} and calls == ["digits-teacher"]
    saved = json.loads((weights / demo_report.REFERENCE_FILE).read_text())
    assert saved["row"] == {"frechet": 9.0} and set(saved["sha256"]) == set(demo_report.KEYED_BY)
    assert demo_report.reference_row(weights) == {"frechet": 9.0} and len(calls) == 1      # cached
    judge = weights / files.FILES["judge"]
    judge.write_bytes(judge.read_bytes()[:-4] + b"\0\0\0\0")                                # other weights
    monkeypatch.setattr(demo_report, "measure", lambda *a, **k: calls.append("again") or {"frechet": 7.0})
    assert demo_report.reference_row(weights) == {"frechet": 7.0} and calls[-1] == "again"


def test_shipped_reference_row_matches_the_shipped_weights():
    saved = json.loads((files.SHIPPED_DIR / demo_report.REFERENCE_FILE).read_text())
    assert saved["sha256"] == demo_report._digest(files.SHIPPED_DIR)
    assert saved["row"]["n"] == 1000


@pytest.mark.parametrize("trained, expected", [
    ({"gold_boldness": 0.32, "judge_accuracy": 0.99, "frechet": 15.0}, [True, True, True]),
    ({"gold_boldness": 0.31, "judge_accuracy": 0.99, "frechet": 15.0}, [False, True, True]),
    ({"gold_boldness": 0.32, "judge_accuracy": 0.97, "frechet": 15.0}, [True, False, True]),
    ({"gold_boldness": 0.32, "judge_accuracy": 0.99, "frechet": 15.1}, [True, True, False]),
])
def test_conditions(trained, expected):
    ref = {"gold_boldness": 0.3131, "judge_accuracy": 0.998, "frechet": 10.0}
    assert [ok for _, ok in demo_report.conditions(ref, trained)] == expected
