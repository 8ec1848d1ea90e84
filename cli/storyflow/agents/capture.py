"""A step's own output, captured per attempt into its log: `StepLog` and the routing to it.

``sys.stdout`` and ``sys.stderr`` belong to the whole process, and several steps run at
once (async callables on the loop, sync ones in worker threads). `install` puts one
`_Router` on each of them, once: a write made while an attempt is `capturing` (a
context variable, which the python agent sets and copies into the worker thread of a
sync callable) goes to that attempt's `StepLog`; any other write goes to the stream
as before. `logging` records that no handler takes — those that would have reached
the terminal through `logging.lastResort` — are routed the same way, and a step's
``context.logger`` (`step_logger`) writes to its log directly.

A `StepLog` is bounded: the first `HEAD_LINES` lines (or `HEAD_CHARS` characters) are
logged as they come, so ``storyflow logs RUN --follow`` shows them live; past that,
only the last `TAIL_LINES` lines (or `TAIL_CHARS` characters) are kept, and logged
when the attempt ends after a line that says how many were not. Lines longer than
`MAX_LINE_CHARS` are cut.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, TextIO

__all__ = ["StepLog", "capturing", "install", "step_logger"]

HEAD_LINES = 500
HEAD_CHARS = 128 * 1024
TAIL_LINES = 500
TAIL_CHARS = 128 * 1024
MAX_LINE_CHARS = 8 * 1024

capturing: ContextVar[StepLog | None] = ContextVar("storyflow_capturing", default=None)
"""The log of the attempt whose code runs in this context, if any."""


class StepLog:
    """One attempt's output, line by line, to its ``log`` (`storyflow.agents.base.Call.log`);
    bounded as the module docstring says. Safe to write from any thread."""

    __slots__ = ("_closed", "_cut", "_dropped", "_head_chars", "_head_lines", "_lock", "_log",
                 "_partial", "_tail", "_tail_chars")

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._partial = ["", ""]
        """A line still being written, per stream (stdout, stderr); at most
        `MAX_LINE_CHARS`, the characters beyond counted in ``_cut``."""
        self._cut = [0, 0]
        self._head_lines = 0
        self._head_chars = 0
        self._tail: deque[str] | None = None
        """Once the head is full: the latest lines, logged when the attempt ends."""
        self._tail_chars = 0
        self._dropped = 0
        self._closed = False

    def write(self, text: str, stream: int = 0) -> None:
        """Text as a stream receives it: whole lines are logged, a partial one waits."""
        out: list[str] = []
        with self._lock:
            pending = self._partial[stream] + text
            if "\n" in pending:
                first, *lines, pending = pending.split("\n")
                self._add(first, out, self._cut[stream])
                self._cut[stream] = 0
                for line in lines:
                    self._add(line, out)
            cr = pending.rfind("\r", 0, len(pending) - 1)  # not a \r of a \r\n to come
            if cr >= 0:  # a progress bar redrawing its line: keep what shows
                pending = pending[cr + 1 :]
                self._cut[stream] = 0
            if len(pending) > MAX_LINE_CHARS:
                self._cut[stream] += len(pending) - MAX_LINE_CHARS
                pending = pending[:MAX_LINE_CHARS]
            self._partial[stream] = pending
        self._emit(out)

    def line(self, text: object) -> None:
        """Log ``text``, one entry per line it holds."""
        out: list[str] = []
        with self._lock:
            for line in str(text).split("\n"):
                self._add(line, out)
        self._emit(out)

    def close(self) -> None:
        """The attempt ended: log partial lines and the kept tail. Lines written later
        (a thread still running after a timeout) are logged while the head has room."""
        out: list[str] = []
        with self._lock:
            for i, pending in enumerate(self._partial):
                if pending:
                    self._partial[i] = ""
                    self._add(pending, out, self._cut[i])
                    self._cut[i] = 0
            tail, self._tail = self._tail, None
            if tail:
                if self._dropped:
                    out.append(f"… {self._dropped:,} more lines not logged; "
                               f"the last {len(tail):,} follow")
                out.extend(tail)
            self._closed = True
        self._emit(out)

    def _add(self, line: str, out: list[str], cut: int = 0) -> None:
        """Log ``line`` (``cut`` characters of it already dropped) now, into ``out``, or
        keep it for the tail; under the lock."""
        if line.endswith("\r"):
            line = line[:-1]
        if "\r" in line:
            line, cut = line.rpartition("\r")[2], 0
        if len(line) + cut > MAX_LINE_CHARS:
            more = len(line) + cut - MAX_LINE_CHARS
            line = f"{line[:MAX_LINE_CHARS]} … ({more:,} more characters)"
        if self._tail is None:
            if self._head_lines < HEAD_LINES and self._head_chars + len(line) <= HEAD_CHARS:
                self._head_lines += 1
                self._head_chars += len(line)
                out.append(line)
                return
            if self._closed:
                self._dropped += 1
                return
            self._tail = deque()
        self._tail.append(line)
        self._tail_chars += len(line)
        while len(self._tail) > TAIL_LINES or self._tail_chars > TAIL_CHARS:
            self._tail_chars -= len(self._tail.popleft())
            self._dropped += 1

    def _emit(self, lines: list[str]) -> None:
        if not lines:
            return
        # Whatever logging a line writes (the display, a warning) is not the step's.
        token = capturing.set(None)
        try:
            for line in lines:
                self._log(line)
        finally:
            capturing.reset(token)


class _Router:
    """Stands in for ``sys.stdout``/``sys.stderr``: a write goes to the capturing
    attempt's log, else to the stream it replaced; everything else is the stream's."""

    def __init__(self, stream: TextIO, index: int) -> None:
        self._stream = stream
        self._index = index

    def write(self, text: str) -> int:
        sink = capturing.get()
        if sink is None:
            return self._stream.write(text)
        sink.write(text, self._index)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if capturing.get() is None:
            self._stream.flush()

    def isatty(self) -> bool:
        """False for a step's code: its output goes to a log, not to a terminal."""
        return capturing.get() is None and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _LastResort(logging.Handler):
    """`logging.lastResort`, routed: a record no handler takes goes to the capturing
    attempt's log, else where the previous last resort sent it (the terminal)."""

    def __init__(self, previous: logging.Handler | None) -> None:
        super().__init__(previous.level if previous is not None else logging.WARNING)
        self._previous = previous
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        sink = capturing.get()
        if sink is not None:
            sink.line(self.format(record))
        elif self._previous is not None:
            self._previous.handle(record)


_routed = [False]
"""Whether `logging.lastResort` has been routed (once: a later replacement stands)."""


def install() -> None:
    """Route ``sys.stdout``, ``sys.stderr`` and `logging.lastResort` (again if something
    put its own stream in place since, as rich's live display does while it runs)."""
    out, err = sys.stdout, sys.stderr
    if out is not None and type(out) is not _Router:
        sys.stdout = _Router(out, 0)
    if err is not None and type(err) is not _Router:
        sys.stderr = _Router(err, 1)
    if not _routed[0]:
        _routed[0] = True
        logging.lastResort = _LastResort(logging.lastResort)


class _LineHandler(logging.Handler):
    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(logging.NOTSET)
        self._log = log
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._log(self.format(record))
        except Exception:
            self.handleError(record)


_STEP_LOGGERS = logging.getLogger("storyflow.step")


def step_logger(step_id: str, log: Callable[[str], None]) -> logging.Logger:
    """A logger (``storyflow.step.<step id>``, level DEBUG) writing to ``log`` only.

    Made for one attempt and not registered by name, so it goes with the attempt; its
    records do not propagate (they would reach the terminal, or be logged twice)."""
    logger = logging.Logger(f"{_STEP_LOGGERS.name}.{step_id}", logging.DEBUG)
    logger.parent = _STEP_LOGGERS
    logger.propagate = False
    logger.addHandler(_LineHandler(log))
    return logger
