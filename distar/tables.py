"""The one markdown table writer (eval results, the digits table, the main job's before/after table)."""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence


def format_cell(v) -> str:
    """Strings as they are, ints plainly, floats to 4 significant digits, None / NaN as '-'."""
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], headers: Mapping[str, str] | None = None,
                   formats: Mapping[str, Callable[[object], str]] | None = None) -> str:
    """Rows (dicts) as a markdown table over `columns`; `headers` renames columns, `formats` formats cells."""
    headers, formats = headers or {}, formats or {}
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append(formats[c](v) if c in formats and v is not None else format_cell(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
