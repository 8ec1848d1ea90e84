"""The two sinks that only write text: `JsonSink` (``run --json``) and `PlainSink` (CI logs).

Both import nothing beyond the standard library, and never ``rich``.
"""

from __future__ import annotations

import json
from typing import TextIO

from storyflow.ui.lines import (
    ASCII,
    EXTRA_LINES,
    LINE_FORMATS,
    Event,
    failure_line,
    generic_line,
    glyphs_for,
    narrow_encoding,
    offset_text,
    summary_line,
    traceback_lines,
)

__all__ = ["JsonSink", "PlainSink"]

_FAILED = frozenset({"step.failed", "step.retrying", "step.fallback"})
"""Events whose ``error`` (one attempt's) may carry a traceback."""


class JsonSink:
    """``run --json``: each event as one compact JSON line, flushed at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._ensure_ascii = narrow_encoding(stream) is not None

    def __call__(self, event: Event) -> None:
        line = json.dumps(
            event, separators=(",", ":"), ensure_ascii=self._ensure_ascii, default=str
        )
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class PlainSink:
    """One plain line per event, for CI logs and ``--no-progress``; never an ANSI code.

    A run on a cluster adds lines to its ``run.started`` (the executor and its workers,
    then a note if the executor has one), each with the same offset.

    Lines start with the event's offset from the run's start (``mm:ss.s``), measured from
    ``clock_start`` (epoch seconds) or else from the first event's ``ts``. There is no
    colour to switch off, so ``NO_COLOR`` holds trivially. When the stream's encoding
    cannot carry the symbols, ASCII stand-ins are used and other text is replaced.

    A failure whose error has a traceback points to ``storyflow show RUN --step STEP``;
    with ``tracebacks`` (``storyflow logs``) the traceback itself follows its line,
    indented, under a failed, retrying or falling-back attempt.
    """

    def __init__(
        self, stream: TextIO, *, clock_start: float | None = None, tracebacks: bool = False
    ) -> None:
        self._stream = stream
        self._tracebacks = tracebacks
        self._start = clock_start
        self._last = 0.0
        self._encoding = narrow_encoding(stream)
        self._g = glyphs_for(self._encoding)
        self._ascii = self._g is ASCII

    def __call__(self, event: Event) -> None:
        etype = event.get("type")
        if etype == "run.summary":
            line = summary_line(event, ascii=self._ascii)
        else:
            ts = event.get("ts")
            if isinstance(ts, float | int):
                if self._start is None:
                    self._start = ts
                self._last = ts
            tb = traceback_lines(event) if self._tracebacks and etype in _FAILED else []
            try:
                if tb and etype == "step.failed":
                    body = failure_line(event, self._g, pointer=False)  # the rest follows
                else:
                    body = LINE_FORMATS[etype](event, self._g)  # type: ignore[index]
            except Exception:  # unknown type, or fields of unexpected shape
                body = generic_line(event, self._g)
            offset = offset_text(self._last - (self._start or 0.0))
            line = f"{offset} {body}"
            indent = " " * (len(offset) + 3)
            line += "".join(f"\n{indent}{more}".rstrip() for more in tb)
            extra = EXTRA_LINES.get(etype) if isinstance(etype, str) else None
            if extra is not None:
                try:
                    line += "".join(f"\n{offset} {more}" for more in extra(event, self._g))
                except Exception:  # fields of unexpected shape: the line alone
                    pass
        if self._encoding is not None:
            line = line.encode(self._encoding, "replace").decode(self._encoding)
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()
