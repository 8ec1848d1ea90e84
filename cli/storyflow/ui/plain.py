"""The two sinks that only write text: `JsonSink` (``run --json``) and `PlainSink` (CI logs).

Both import nothing beyond the standard library, and never ``rich``. Neither shows a
streamed reply's ``step.delta`` events unless asked: `JsonSink` with ``deltas``,
`PlainSink` the text of the step it ``follow``s.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

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
from storyflow.ui.stream import CONTROLS, follows

__all__ = ["JsonSink", "PlainSink"]

_FAILED = frozenset({"step.failed", "step.retrying", "step.fallback"})
"""Events whose ``error`` (one attempt's) may carry a traceback."""


_DELTA = "step.delta"


class JsonSink:
    """``run --json``: each event as one compact JSON line, flushed at once; ``step.delta``
    events only with ``deltas`` (``--stream-events``)."""

    def __init__(self, stream: TextIO, deltas: bool = False) -> None:
        self._stream = stream
        self._ensure_ascii = narrow_encoding(stream) is not None
        self._deltas = deltas

    def __call__(self, event: Event) -> None:
        if not self._deltas and event.get("type") == _DELTA:
            return
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

    Streamed replies (``step.delta``) print nothing, except those of the instances that
    ``follow`` names (see `storyflow.ui.stream.follows`): their text is written as it
    comes (without control characters: the model's escape sequences never reach the
    terminal), after a line ``✎ draft[2] writes:``. A line due in the middle of it (another
    event, the end of the step) first ends the text's line; the header comes again, then
    ``(continued)``, when the text goes on after another line or another instance's text.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        clock_start: float | None = None,
        tracebacks: bool = False,
        follow: str | None = None,
    ) -> None:
        self._stream = stream
        self._tracebacks = tracebacks
        self._start = clock_start
        self._last = 0.0
        self._encoding = narrow_encoding(stream)
        self._g = glyphs_for(self._encoding)
        self._ascii = self._g is ASCII
        self._follow = follow
        self._texts: dict[str, Any] = {}
        """Followed instances whose text began → the attempt it belongs to."""
        self._writing: str | None = None
        """The instance whose text the stream is in the middle of."""
        self._midline = False
        """The text written last did not end with a newline."""

    def __call__(self, event: Event) -> None:
        etype = event.get("type")
        if etype == _DELTA:
            if self._follow is not None:
                self._delta(event)
            return
        if self._writing is not None:
            self._end_text()
        step = event.get("step")
        if self._texts and etype != "step.log" and isinstance(step, str):
            self._texts.pop(step, None)  # the attempt's text is over
        if etype == "run.summary":
            line = summary_line(event, ascii=self._ascii)
        else:
            offset = self._offset(event)
            tb = traceback_lines(event) if self._tracebacks and etype in _FAILED else []
            try:
                if tb and etype == "step.failed":
                    body = failure_line(event, self._g, pointer=False)  # the rest follows
                else:
                    body = LINE_FORMATS[etype](event, self._g)  # type: ignore[index]
            except Exception:  # unknown type, or fields of unexpected shape
                body = generic_line(event, self._g)
            line = f"{offset} {body}"
            indent = " " * (len(offset) + 3)
            line += "".join(f"\n{indent}{more}".rstrip() for more in tb)
            extra = EXTRA_LINES.get(etype) if isinstance(etype, str) else None
            if extra is not None:
                try:
                    line += "".join(f"\n{offset} {more}" for more in extra(event, self._g))
                except Exception:  # fields of unexpected shape: the line alone
                    pass
        self._write(line + "\n")

    def _offset(self, event: Event) -> str:
        """``mm:ss.s`` of the event (of the last one with a ``ts`` if it has none)."""
        ts = event.get("ts")
        if isinstance(ts, float | int):
            if self._start is None:
                self._start = ts
            self._last = ts
        return offset_text(self._last - (self._start or 0.0))

    def _write(self, text: str) -> None:
        if self._encoding is not None:
            text = text.encode(self._encoding, "replace").decode(self._encoding)
        self._stream.write(text)
        self._stream.flush()

    def _delta(self, event: Event) -> None:
        """Write a followed instance's text as it comes, after its header; control
        characters (an escape sequence's ESC, a CR) removed."""
        iid, text, attempt = event.get("step"), event.get("text"), event.get("attempt")
        if not (isinstance(iid, str) and isinstance(text, str)):
            return
        text = text.translate(CONTROLS)
        if not text:
            return
        if iid != self._writing or self._texts.get(iid, attempt) != attempt:
            if not follows(self._follow or "", iid):
                return
            if self._writing is not None:
                self._end_text()
            again = iid in self._texts and self._texts[iid] == attempt
            self._texts[iid] = attempt
            which = f" attempt {attempt}" if isinstance(attempt, int) and attempt > 1 else ""
            header = f"{self._g.write} {iid}{which} writes{' (continued)' if again else ''}:"
            self._write(f"{self._offset(event)} {header}\n")
            self._writing = iid
        self._write(text)
        self._midline = not text.endswith("\n")

    def _end_text(self) -> None:
        """End the text being written: its last line, if it is not ended."""
        if self._midline:
            self._write("\n")
        self._writing, self._midline = None, False

    def close(self) -> None:
        if self._writing is not None:
            self._end_text()
        self._stream.flush()
