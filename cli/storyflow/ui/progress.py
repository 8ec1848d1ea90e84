"""Where run events go while a run is in progress: JSON lines, plain lines or a live view.

The engine hands every event, a plain ``dict``, to a *sink*: any callable taking one
event, with a ``close()`` called once at the end. Three sinks share that shape:

- `JsonSink`: one compact JSON object per line (``run --json``).
- `PlainSink`: one human line per event, never an ANSI code; for CI and ``--no-progress``.
  It imports nothing beyond the standard library and costs a few microseconds per event.
- `LiveSink`: a rich live view for terminals. Events only update a few counters in O(1);
  drawing happens at rich's bounded refresh rate and costs the same for 10 or 10,000 steps.

`make_sink` picks one. ``rich`` is imported lazily, so plain and JSON runs never load it.

A streaming step's reply arrives as ``step.delta`` events. JSON lines carry them only
when asked (``--stream-events``); plain lines write the text of the step ``follow``
names and nothing of the others; the live view shows each streaming row's last line
and tokens, and a panel with the followed step's text (`follows` says which instances
a step name covers).

This module is the public entry; the sinks live in `storyflow.ui.plain` (JSON, plain)
and `storyflow.ui.live` (rich), the shared line text in `storyflow.ui.lines`, streamed
text in `storyflow.ui.stream`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Protocol, TextIO

from storyflow.ui.lines import Event, format_duration, summary_line
from storyflow.ui.live import LiveSink
from storyflow.ui.plain import JsonSink, PlainSink
from storyflow.ui.stream import follows

__all__ = [
    "Event",
    "JsonSink",
    "LiveSink",
    "PlainSink",
    "Sink",
    "follows",
    "format_duration",
    "make_sink",
    "summary_line",
]


class Sink(Protocol):
    """What the engine is handed: called once per event, closed once at the end."""

    def __call__(self, event: Event) -> None: ...

    def close(self) -> None: ...


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def make_sink(
    *,
    json_mode: bool,
    progress: bool | None,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    follow: str | None = None,
    stream_events: bool = False,
) -> Sink:
    """The sink for a run: JSON lines with ``--json``; a live view on a terminal unless
    ``progress`` is False or ``TERM=dumb``; plain lines otherwise (CI, pipes, files).

    ``follow`` (``--follow STEP``) shows that step's streamed reply: the live view in a
    panel, plain lines as raw text. ``stream_events`` (``--stream-events``) keeps the
    ``step.delta`` events in JSON lines. ``stream`` defaults to ``sys.stdout`` and
    ``environ`` to ``os.environ``, read at call time.
    """
    out: TextIO = sys.stdout if stream is None else stream
    env = os.environ if environ is None else environ
    if json_mode:
        return JsonSink(out, deltas=stream_events)
    if progress is not False and _isatty(out) and env.get("TERM") != "dumb":
        from rich.console import Console

        return LiveSink(Console(file=out, _environ=env), follow=follow)
    return PlainSink(out, follow=follow)
