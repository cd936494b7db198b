"""Keep docs/RESULTS.md sections up to date: each section lives between markers and
is replaced whole when its command runs again, so the file never mixes old and new
numbers within one table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HEADER = "# SALOMI results\n\nEvery table below was written by the command shown above it, on this repository's code.\n"


def replace_section(path: str | Path, key: str, body: str) -> None:
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x >= 1e4:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c[0])) for c in columns) + " |")
    return "\n".join(lines)


QUALITY_COLUMNS = [
    ("method", "method"),
    ("ppl", "ppl"),
    ("ratio", "ratio"),
    ("kl", "KL (nats/token)"),
    ("top1", "top-1 agree"),
    ("linear_bpw", "linear bpw"),
    ("model_bpw", "model bpw"),
    ("file_bytes", "file bytes"),
]
