"""The live view's table of instances under way: a row each, at most ``max_rows``.

A running row's note is its last log line or, while its reply streams, the reply's last
line and tokens (`storyflow.ui.stream.TailNote`); a retrying row counts down to its next
attempt. The note column is the one that gives way on a narrow terminal. ``rich`` is
imported only while drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from storyflow.ui.lines import Glyphs, format_duration, one_line

if TYPE_CHECKING:
    from rich.console import JustifyMethod, RenderableType
    from rich.table import Table

__all__ = ["STYLES", "Row", "rows_table"]

STYLES = {"running": "cyan", "retrying": "yellow", "succeeded": "green", "cached": "green",
          "kept": "green", "failed": "red", "cancelled": "red", "degraded": "yellow"}
"""The colour of each status, in rows and in the counts line."""

_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("step", "left"), ("status", "left"), ("attempt", "right"), ("time", "right"), ("", "left"),
)

Row = tuple[str, Any, float, "float | None", str, str, "RenderableType | None"]
"""An instance's row: id, attempt, since (clock), retry at (clock; None while running),
error class, note, and the note of its streaming reply (None when none streams)."""


def rows_table(rows: Sequence[Row], now: float, glyphs: Glyphs) -> Table:
    """The table of ``rows`` at ``now`` (the same clock as their times)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for name, justify in _COLUMNS:  # the note (no name) may shrink first; its text never wraps
        table.add_column(name, justify=justify, no_wrap=bool(name), overflow="ellipsis")
    for step, attempt, since, retry_at, error, note, streamed in rows:
        if retry_at is None:
            row = ("running", format_duration(now - since), one_line(note, glyphs)[:80])
        else:
            left = format_duration(max(retry_at - now, 0.0))
            row = ("retrying", f"retry in {left}", error)
        table.add_row(
            Text(step),
            Text(row[0], style=STYLES[row[0]]),
            str(attempt or ""),
            row[1],
            streamed if streamed is not None and retry_at is None
            else Text(row[2], style="dim", no_wrap=True, overflow="ellipsis"),
        )
    return table
