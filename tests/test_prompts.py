"""Prompt files: the shipped PartiPrompts TSV (by name and by path) and plain text files."""
from pathlib import Path

import pytest

from distar.config import ConfigError, load_config
from distar.prompts import load_prompts

from distar.prompts import SHIPPED

PARTI = SHIPPED["parti"]


def test_parti_tsv_has_1632_prompts_with_categories():
    prompts = load_prompts(PARTI)
    assert len(prompts) == 1632
    assert prompts[0].text == "bond" and prompts[0].category == "Abstract"
    assert len({p.category for p in prompts}) == 12
    assert len(load_prompts(PARTI, limit=10)) == 10


def test_text_file_and_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\na cat\n\n a dog \n")
    assert [p.text for p in load_prompts(f)] == ["a cat", "a dog"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(ValueError, match="'Prompt' column"):
        load_prompts(bad)
    empty = tmp_path / "e.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(ConfigError, match="either prompts or prompts_file"):
        load_config("gaussian2d", ["prompts=[class 0]", f"prompts_file={f}"])
