"""`distar generate` / `distar eval` on the digits world: outputs, and one-line errors naming the argument."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from distar.cli import main


def _err(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_generate_onestep_writes_pngs_and_grid(tmp_path):
    out = tmp_path / "g"
    assert main(["generate", "--model", "digits-onestep", "--prompt", "a handwritten digit 3", "--n", "5",
                 "--seed", "0", "--out", str(out)]) == 0
    pngs = sorted(out.glob("sample_*.png"))
    assert len(pngs) == 5 and (out / "grid.png").is_file()
    assert Image.open(pngs[0]).size == (16, 16)


def test_generate_teacher_honours_steps(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["generate", "--model", "digits-teacher", "--prompt", "the digit five", "--n", "2", "--out"]
    assert main(base + [str(a), "--steps", "4", "--guidance", "2"]) == 0
    assert main(base + [str(b), "--steps", "8", "--guidance", "2"]) == 0
    assert Image.open(a / "sample_0000.png").tobytes() != Image.open(b / "sample_0000.png").tobytes()


@pytest.mark.parametrize("extra,needle", [
    (["--model", "no-such-model"], "--model"),
    (["--model", "models:/digits@champion"], "--model"),
    (["--model", "digits-onestep", "--n", "0"], "--n"),
    (["--model", "digits-onestep", "--n", "-3"], "--n"),
    (["--model", "digits-onestep", "--steps", "4"], "--steps"),
    (["--model", "digits-teacher", "--steps", "0"], "--steps"),
])
def test_generate_bad_input(tmp_path, capsys, extra, needle):
    argv = ["generate", "--prompt", "a handwritten 3", "--out", str(tmp_path / "o")] + extra
    if "--n" not in extra:
        argv += ["--n", "2"]
    rc, err = _err(capsys, argv)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_generate_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _err(capsys, ["generate", "--model", "digits-onestep", "--prompt", "3", "--n", "1",
                            "--out", str(blocker / "sub")])
    assert rc == 2 and "--out" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions do not bind
        return
    rc, err = _err(capsys, ["generate", "--model", "digits-onestep", "--prompt", "3", "--n", "1", "--out", str(ro)])
    assert rc == 2 and "--out" in err


def test_eval_table(tmp_path):
    import json

    assert main(["eval", "--models", "one=digits-onestep", "--n-per-class", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows[0]["model"] == "one" and rows[0]["n"] == 30
    assert {"proxy_alignment", "proxy_boldness", "gold_boldness", "judge_accuracy", "frechet", "diversity",
            "sec_per_image"} <= set(rows[0])
    assert "| one |" in (tmp_path / "results.md").read_text()
