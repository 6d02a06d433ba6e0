"""Markdown tables of the benchmarks' results, and the cell formats they share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["dims", "fmt", "format_table", "ratio"]


def fmt(value: Any, digits: int = 2) -> str:
    """A cell: ``None`` as a dash, floats with ``digits`` decimals, anything else as ``str``."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], pad: bool = True) -> str:
    """A Markdown table; short rows are filled with empty cells.

    Args:
        headers: the column names.
        rows: the cells, formatted by :func:`fmt` (pass strings to format them otherwise).
        pad: pad the columns to equal width; ``False``: single spaces and ``---`` rules, for tables printed as
            they are measured.
    """
    n = len(headers)
    cells = [[str(h) for h in headers]] + [([fmt(c) for c in row] + [""] * n)[:n] for row in rows]
    widths = [max(len(r[i]) for r in cells) if pad else 0 for i in range(n)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|" if pad else "| --- " * n + "|"
    lines.insert(1, rule)
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``"1.23x"``; a dash when either is missing."""
    return "—" if a is None or not b else f"{a / b:.2f}x"


def dims(shape: Sequence[int] | None) -> str:
    """A shape as ``"240x240x155"``; a dash when missing."""
    return "—" if not shape else "x".join(str(int(v)) for v in shape)
