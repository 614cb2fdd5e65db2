"""Prompt files: PartiPrompts' TSV (Prompt, Category, ... columns) or plain text, one prompt per line.

Shipped prompt sets are named instead of given as a path: `parti` is distar/data/PartiPrompts.tsv
(Apache-2.0, see distar/data/NOTICE.md), an evaluation set."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
SHIPPED = {"parti": DATA_DIR / "PartiPrompts.tsv"}


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = ""


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read prompts from a shipped set's name (`parti`), a .tsv with a `Prompt` header column (Parti) or a text file (blank lines and
    lines starting with '#' skipped). Raises FileNotFoundError / ValueError naming the file."""
    p = SHIPPED.get(str(path), Path(path))
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r}: no such file (shipped sets: {sorted(SHIPPED)})")
    text = p.read_text(encoding="utf-8")
    first = text.split("\n", 1)[0]
    if "\t" in first:
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
        if not rows or "Prompt" not in rows[0]:
            raise ValueError(f"prompt file {str(path)!r}: a TSV needs a 'Prompt' column (PartiPrompts format), "
                             f"got columns {first.split(chr(9))}")
        prompts = [Prompt(r["Prompt"].strip(), (r.get("Category") or "").strip()) for r in rows if r["Prompt"].strip()]
    else:
        prompts = [Prompt(line.strip()) for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r}: no prompts found")
    return prompts[:limit] if limit else prompts
