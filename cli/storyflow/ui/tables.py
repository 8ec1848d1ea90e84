"""Titled tables for commands that print a summary (`report`, `doctor`).

On a terminal they are drawn with ``rich`` (imported lazily, inside `print_sections`);
anywhere else — a pipe, a file, CI, ``TERM=dumb`` — as plain aligned columns with no
ANSI code, so the output can be diffed and grepped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["Section", "plain_text", "print_sections"]


@dataclass(frozen=True, slots=True)
class Section:
    """One titled table, with lines of text around it."""

    title: str
    """Printed above the table; empty for none."""
    header: tuple[str, ...] = ()
    """Column headings; no table when empty."""
    rows: tuple[tuple[str, ...], ...] = ()
    """Cells as text, one tuple per row, as many cells as headings."""
    right: frozenset[int] = frozenset()
    """Indexes of the columns aligned right (numbers)."""
    notes: tuple[str, ...] = ()
    """Lines printed under the table."""
    styles: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    """Per column: cell text → rich style (e.g. ``{1: {"fail": "red"}}``); terminal only."""


def _plain_table(section: Section) -> list[str]:
    if not section.header:
        return []
    rows = [section.header, *section.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(section.header))]
    out = []
    for row in rows:
        cells = [
            c.rjust(w) if i in section.right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def plain_text(sections: Sequence[Section]) -> str:
    """Every section as plain text, a blank line between them."""
    blocks = []
    for s in sections:
        lines = ([s.title] if s.title else []) + _plain_table(s) + list(s.notes)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def print_sections(
    sections: Sequence[Section],
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Print ``sections``: rich tables on a terminal, plain text elsewhere."""
    out: TextIO = sys.stdout if stream is None else stream
    env = os.environ if environ is None else environ
    if not _isatty(out) or env.get("TERM") == "dumb":
        out.write(plain_text(sections))
        out.flush()
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, _environ=dict(env), highlight=False)
    for n, s in enumerate(sections):
        if n:
            console.print()
        if s.header:
            table = Table(
                title=_escape(s.title) if s.title else None,
                title_justify="left",
                box=box.SIMPLE_HEAD,
                show_edge=False,
            )
            for i, name in enumerate(s.header):
                table.add_column(_escape(name), justify="right" if i in s.right else "left")
            for row in s.rows:
                cells = []
                for i, cell in enumerate(row):
                    style = s.styles.get(i, {}).get(cell)
                    cells.append(f"[{style}]{_escape(cell)}[/]" if style else _escape(cell))
                table.add_row(*cells)
            console.print(table)
        elif s.title:
            console.print(_escape(s.title))
        for line in s.notes:
            console.print(_escape(line))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
