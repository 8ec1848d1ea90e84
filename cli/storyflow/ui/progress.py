"""Where run events go while a run is in progress: JSON lines, plain lines or a live view.

The engine hands every event, a plain ``dict``, to a *sink*: any callable taking one
event, with a ``close()`` called once at the end. Three sinks share that shape:

- `JsonSink`: one compact JSON object per line (``run --json``).
- `PlainSink`: one human line per event, never an ANSI code; for CI and ``--no-progress``.
  It imports nothing beyond the standard library and costs a few microseconds per event.
- `LiveSink`: a rich live view for terminals. Events only update a few counters in O(1);
  drawing happens at rich's bounded refresh rate and costs the same for 10 or 10,000 steps.

`make_sink` picks one. ``rich`` is imported lazily, so plain and JSON runs never load it.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from storyflow.events import StepStatus

if TYPE_CHECKING:
    from rich.console import Console, JustifyMethod, RenderableType
    from rich.live import Live
    from rich.text import Text

__all__ = [
    "Event",
    "JsonSink",
    "LiveSink",
    "PlainSink",
    "Sink",
    "format_duration",
    "make_sink",
    "summary_line",
]

Event = Mapping[str, Any]
"""One event as the engine emits it: ``type``, ``run_id``, ``ts`` and per-type fields."""


class Sink(Protocol):
    """What the engine is handed: called once per event, closed once at the end."""

    def __call__(self, event: Event) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Glyphs:
    """The symbols a line may use; an ASCII set stands in where the stream cannot encode."""

    start: str
    ok: str
    fail: str
    retry: str
    skip: str
    cancel: str
    same: str
    sep: str
    more: str
    newline: str
    fallback: str
    breaker: str


_UNICODE = _Glyphs("▶", "✓", "✗", "↻", "⤼", "⊘", "≡", " · ", "…", " ⏎ ", "↪", "◆")
_ASCII = _Glyphs(">", "+", "x", "~", "-", "/", "=", " | ", "...", " / ", "->", "*")
_BASE_KEYS = frozenset({"type", "run_id", "ts", "step"})
# Display order of statuses in counts; any other status follows in arrival order.
_STATUS_ORDER = (
    StepStatus.PENDING.value,
    StepStatus.READY.value,
    StepStatus.RUNNING.value,
    StepStatus.RETRYING.value,
    StepStatus.SUCCEEDED.value,
    StepStatus.CACHED.value,
    "kept",
    StepStatus.FAILED.value,
    StepStatus.SKIPPED.value,
    StepStatus.CANCELLED.value,
    "degraded",
)


def _narrow_encoding(stream: object) -> str | None:
    """The stream's codec name when it is not a UTF codec; None when anything encodes."""
    encoding = getattr(stream, "encoding", None)
    if not isinstance(encoding, str):
        return None
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return "ascii"
    return None if name.startswith("utf") else name


def _glyphs_for(encoding: str | None) -> _Glyphs:
    if encoding is None:
        return _UNICODE
    try:
        "".join(getattr(_UNICODE, f) for f in _UNICODE.__slots__).encode(encoding)
    except UnicodeEncodeError:
        return _ASCII
    return _UNICODE


def format_duration(seconds: float) -> str:
    """``1.6s`` under a minute, ``2m05s`` under an hour, ``1h02m05s`` beyond."""
    if seconds < 59.95:
        return f"{max(seconds, 0.0):.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def _offset(seconds: float) -> str:
    """An offset from the run's start as ``mm:ss.s``."""
    tenths = round(seconds * 10) if seconds > 0 else 0
    minutes, tenths = divmod(tenths, 600)
    return f"{minutes:02d}:{tenths // 10:02d}.{tenths % 10}"


def _one_line(text: object, glyphs: _Glyphs) -> str:
    text = str(text)
    if "\n" in text or "\r" in text:
        return glyphs.newline.join(line for line in text.splitlines() if line.strip())
    return text


def _error_text(error: object, glyphs: _Glyphs) -> str:
    """``class: message`` from an event's ``error`` (a mapping, or anything printable)."""
    if isinstance(error, Mapping):
        parts = [str(error[k]) for k in ("class", "message") if error.get(k) not in (None, "")]
        return _one_line(": ".join(parts), glyphs)
    return _one_line(error, glyphs)


def _degraded(event: Event) -> str:
    """``degraded (served by offline-writer)``, or plain ``degraded`` with no agent named."""
    agent = event.get("agent")
    return f"degraded (served by {agent})" if agent else "degraded"


def _breaker_text(event: Event) -> str:
    """What a ``breaker.*`` event says, without its glyph."""
    agent = event.get("agent", "?")
    if event.get("type") == "breaker.closed":
        return f"breaker {agent} closed: its trial call succeeded"
    cooldown = event.get("cooldown_s")
    when = f"{format_duration(cooldown)}" if isinstance(cooldown, int | float) else "a cooldown"
    if event.get("trial"):
        return f"breaker {agent} opened again: its trial call failed; next trial in {when}"
    failures = event.get("failures")
    after = f" after {failures} failures in a row" if failures else ""
    return f"breaker {agent} opened{after}; calls fail fast, trial in {when}"


def _extras(event: Event, glyphs: _Glyphs) -> str:
    """`` · 120 tok · $0.0012 · degraded`` for whichever of these the event carries."""
    text = ""
    tokens = event.get("tokens")
    if tokens:
        text += f"{glyphs.sep}{tokens:,} tok"
    cost = event.get("cost")
    if cost:
        text += f"{glyphs.sep}${cost:.4f}"
    if event.get("degraded"):
        text += f"{glyphs.sep}{_degraded(event)}"
    return text


def _ordered_counts(counts: Mapping[str, Any]) -> list[tuple[str, int]]:
    known = [(s, int(counts[s])) for s in _STATUS_ORDER if counts.get(s)]
    return known + [(s, int(n)) for s, n in counts.items() if n and s not in _STATUS_ORDER]


def summary_line(event: Event, *, ascii: bool = False) -> str:
    """The one-line summary of a ``run.summary`` event, as both text sinks print it.

    ``summary: succeeded · 12 steps (10 succeeded, 2 skipped) · 9.9s · 1,234 tok · $0.0123``
    """
    glyphs = _ASCII if ascii else _UNICODE
    steps = event.get("steps")
    counts = _ordered_counts(steps) if isinstance(steps, Mapping) else []
    total = sum(n for _, n in counts)
    text = f"summary: {event.get('status', '?')}{glyphs.sep}{total} step{'' if total == 1 else 's'}"
    if counts:
        text += " (" + ", ".join(f"{n:,} {s}" for s, n in counts) + ")"
    duration = event.get("duration_s")
    if isinstance(duration, int | float):
        text += glyphs.sep + format_duration(duration)
    return text + _extras({"tokens": event.get("tokens"), "cost": event.get("cost")}, glyphs)


class JsonSink:
    """``run --json``: each event as one compact JSON line, flushed at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._ensure_ascii = _narrow_encoding(stream) is not None

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

    Lines start with the event's offset from the run's start (``mm:ss.s``), measured from
    ``clock_start`` (epoch seconds) or else from the first event's ``ts``. There is no
    colour to switch off, so ``NO_COLOR`` holds trivially. When the stream's encoding
    cannot carry the symbols, ASCII stand-ins are used and other text is replaced.
    """

    def __init__(self, stream: TextIO, *, clock_start: float | None = None) -> None:
        self._stream = stream
        self._start = clock_start
        self._last = 0.0
        self._encoding = _narrow_encoding(stream)
        self._g = _glyphs_for(self._encoding)
        self._ascii = self._g is _ASCII
        self._formats: dict[str, Callable[[Event], str]] = {
            "run.started": self._run_started,
            "run.resumed": self._run_started,
            "step.started": self._step_started,
            "step.succeeded": self._step_succeeded,
            "step.cached": self._step_same,
            "step.kept": self._step_same,
            "step.failed": self._step_failed,
            "step.retrying": self._step_retrying,
            "step.skipped": self._step_skipped,
            "step.cancelled": self._step_skipped,
            "step.log": self._step_log,
            "step.fallback": self._step_fallback,
            "breaker.opened": self._breaker,
            "breaker.closed": self._breaker,
            "run.succeeded": self._run_ended,
            "run.failed": self._run_ended,
            "run.interrupted": self._run_ended,
            "run.waiting": self._run_ended,
        }

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
            try:
                body = self._formats[etype](event)  # type: ignore[index]
            except Exception:  # unknown type, or fields of unexpected shape
                body = self._generic(event)
            line = _offset(self._last - (self._start or 0.0)) + " " + body
        if self._encoding is not None:
            line = line.encode(self._encoding, "replace").decode(self._encoding)
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()

    def _run_started(self, e: Event) -> str:
        steps = e.get("steps")
        planned = f" ({steps} step{'' if steps == 1 else 's'})" if steps is not None else ""
        return f"{e['type']} {e.get('workflow', '?')}{planned} run {e.get('run_id', '?')}"

    def _step_started(self, e: Event) -> str:
        attempt = e.get("attempt")
        text = f"{self._g.start} {e['step']}" + (f" attempt {attempt}" if attempt else "")
        return text + (f" (fallback {e['agent']})" if e.get("degraded") and e.get("agent") else "")

    def _step_succeeded(self, e: Event) -> str:
        duration = e.get("duration_s")
        took = f" {format_duration(duration)}" if duration is not None else ""
        return f"{self._g.ok} {e['step']}{took}{_extras(e, self._g)}"

    def _step_same(self, e: Event) -> str:
        duration = e.get("duration_s")
        took = f" {format_duration(duration)}" if duration is not None else ""
        status = e["type"].partition(".")[2]
        return f"{self._g.same} {e['step']} {status}{took}{_extras(e, self._g)}"

    def _step_failed(self, e: Event) -> str:
        attempt = e.get("attempt")
        text = f"{self._g.fail} {e['step']}" + (f" attempt {attempt}" if attempt else "")
        error = e.get("error")
        if error:
            text += ": " + _error_text(error, self._g)
        if e.get("final") is False:
            return text + " (will retry)"
        if isinstance(error, Mapping) and error.get("hint"):
            text += f" (hint: {_one_line(error['hint'], self._g)})"
        return text

    def _step_retrying(self, e: Event) -> str:
        delay = e.get("delay_s")
        when = f" in {format_duration(delay)}" if delay is not None else ""
        return f"{self._g.retry} {e['step']} retry{when}"

    def _step_skipped(self, e: Event) -> str:
        glyph = self._g.skip if e["type"] == "step.skipped" else self._g.cancel
        reason = e.get("reason")
        why = f": {_one_line(reason, self._g)}" if reason else ""
        return f"{glyph} {e['step']} {e['type'].partition('.')[2]}{why}"

    def _step_fallback(self, e: Event) -> str:
        text = f"{self._g.fallback} {e['step']} falls back to {e.get('fallback', '?')}"
        error = e.get("error")
        why = f": {_error_text(error, self._g)}" if error else ""
        return text + f" ({e.get('agent', '?')}{why})"

    def _breaker(self, e: Event) -> str:
        return f"{self._g.breaker} {_breaker_text(e)}"

    def _step_log(self, e: Event) -> str:
        return f"  {e['step']}: {_one_line(e.get('message', ''), self._g)}"

    def _run_ended(self, e: Event) -> str:
        duration = e.get("duration_s")
        text = str(e["type"]) + (f" in {format_duration(duration)}" if duration is not None else "")
        return text + (f": {_error_text(e['error'], self._g)}" if e.get("error") else "")

    def _generic(self, e: Event) -> str:
        step = e.get("step")
        fields = " ".join(
            f"{k}={_one_line(v, self._g)}" for k, v in e.items() if k not in _BASE_KEYS
        )
        return " ".join(str(p) for p in (e.get("type", "?"), step, fields) if p)


class _Active:
    """A running or retrying step instance, as the live view shows it."""

    __slots__ = ("attempt", "error", "note", "retry_at", "since")

    def __init__(self, attempt: Any, since: float) -> None:
        self.attempt = attempt
        self.since = since
        self.retry_at: float | None = None
        self.error = ""
        self.note = ""


_STYLES = {
    "running": "cyan",
    "retrying": "yellow",
    "succeeded": "green",
    "cached": "green",
    "kept": "green",
    "failed": "red",
    "cancelled": "red",
    "degraded": "yellow",
}

_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("step", "left"),
    ("status", "left"),
    ("attempt", "right"),
    ("time", "right"),
    ("", "left"),
)


class LiveSink:
    """A rich live view of a run, for terminals.

    Events update counters, the running/retrying instances, the last failures and the
    token and cost totals, each in O(1); nothing is drawn per event. rich's own refresh
    thread (at most ``refresh_per_second``) draws `render()`, whose cost is bounded by
    ``max_rows`` whatever the number of steps. The live display starts with the first
    event; `close()` stops it and prints `summary_line`.
    """

    def __init__(
        self,
        console: Console,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_per_second: float = 8,
        max_rows: int = 12,
    ) -> None:
        self._console = console
        self._clock = clock
        self._refresh_per_second = refresh_per_second
        self._max_rows = max_rows
        self._g = _glyphs_for(_narrow_encoding(console))
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._closed = False
        self._seen = False
        self._workflow = ""
        self._run_id = ""
        self._status = ""
        self._planned = 0
        self._done = 0
        self._t0: float | None = None
        self._t_end: float | None = None
        self._counts: dict[str, int] = {}
        self._active: dict[str, _Active] = {}
        self._retrying = 0
        self._failures: deque[tuple[str, str]] = deque(maxlen=3)
        self._notices: deque[tuple[str, str]] = deque(maxlen=3)
        """Recent degraded steps and breaker changes, newest last."""
        self._breakers: dict[str, float] = {}
        """Open breakers: agent → when (our clock) its trial call is due."""
        self._tokens = 0
        self._cost = 0.0
        self._summary: Event | None = None
        self._handlers: dict[str, Callable[[Event], None]] = {
            "run.started": self._on_run_started,
            "run.resumed": self._on_run_started,
            "step.started": self._on_step_started,
            "step.succeeded": self._on_step_done,
            "step.cached": self._on_step_done,
            "step.kept": self._on_step_done,
            "step.skipped": self._on_step_done,
            "step.cancelled": self._on_step_done,
            "step.failed": self._on_step_failed,
            "step.retrying": self._on_step_retrying,
            "step.log": self._on_step_log,
            "step.fallback": self._on_step_fallback,
            "breaker.opened": self._on_breaker,
            "breaker.closed": self._on_breaker,
            "run.succeeded": self._on_run_ended,
            "run.failed": self._on_run_ended,
            "run.interrupted": self._on_run_ended,
            "run.waiting": self._on_run_ended,
            "run.summary": self._on_summary,
        }

    @property
    def live(self) -> Live | None:
        """The rich `Live` once the first event has arrived (None before, and if closed)."""
        return self._live

    def __call__(self, event: Event) -> None:
        if self._live is None and not self._closed:
            self._start_live()
        handler = self._handlers.get(event.get("type"))  # type: ignore[arg-type]
        with self._lock:
            self._seen = True
            if self._t0 is None:
                self._t0 = self._clock()
            if handler is not None:
                handler(event)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.stop()
            if not self._console.is_terminal:
                self._console.line()  # rich ends the final frame with a newline on terminals only
        if not self._seen:
            return
        with self._lock:
            summary = self._summary or {
                "status": self._status or "running",
                "steps": dict(self._counts),
                "duration_s": self._elapsed(self._clock()),
                "tokens": self._tokens,
                "cost": self._cost,
            }
        self._console.print(
            summary_line(summary, ascii=self._g is _ASCII),
            markup=False,
            highlight=False,
            emoji=False,
            soft_wrap=True,
        )

    def _start_live(self) -> None:
        from rich.live import Live

        self._live = Live(
            console=self._console,
            get_renderable=self.render,
            auto_refresh=True,
            refresh_per_second=self._refresh_per_second,
        )
        self._live.start()

    def _elapsed(self, now: float) -> float:
        start = self._t0 if self._t0 is not None else now
        return (self._t_end if self._t_end is not None else now) - start

    # -- event handlers: O(1) each, called under the lock --------------------------------

    def _on_run_started(self, e: Event) -> None:
        self._workflow = str(e.get("workflow", self._workflow))
        self._run_id = str(e.get("run_id", self._run_id))
        self._status = "running"
        self._t_end = None
        if isinstance(e.get("steps"), int):
            self._planned = e["steps"]

    def _on_step_started(self, e: Event) -> None:
        step = str(e.get("step"))
        rec = self._active.get(step)
        if rec is None:
            rec = self._active[step] = _Active(e.get("attempt"), self._clock())
        else:
            if rec.retry_at is not None:
                self._retrying -= 1
            rec.attempt, rec.since, rec.retry_at = e.get("attempt"), self._clock(), None
            rec.note = ""
        if e.get("degraded") and e.get("agent"):
            rec.note = f"served by {e['agent']}"

    def _finish(self, step: str, status: str) -> None:
        rec = self._active.pop(step, None)
        if rec is not None and rec.retry_at is not None:
            self._retrying -= 1
        self._counts[status] = self._counts.get(status, 0) + 1
        self._done += 1

    def _on_step_done(self, e: Event) -> None:
        self._finish(str(e.get("step")), e["type"].partition(".")[2])
        self._add_usage(e)
        if e.get("degraded"):
            self._counts["degraded"] = self._counts.get("degraded", 0) + 1
            self._notices.append((self._g.fallback, f"{e.get('step')} {_degraded(e)}"))

    def _add_usage(self, e: Event) -> None:
        self._tokens += e.get("tokens") or 0
        self._cost += e.get("cost") or 0.0

    def _on_step_failed(self, e: Event) -> None:
        step = str(e.get("step"))
        error = e.get("error") or {}
        self._add_usage(e)
        if e.get("final") is False:
            rec = self._active.get(step)
            if rec is not None:
                rec.error = str(error.get("class", "")) if isinstance(error, Mapping) else ""
            return
        self._finish(step, "failed")
        self._failures.append((step, _error_text(error, self._g)))

    def _on_step_retrying(self, e: Event) -> None:
        step = str(e.get("step"))
        rec = self._active.get(step)
        if rec is None:
            rec = self._active[step] = _Active(e.get("attempt"), self._clock())
        if rec.retry_at is None:
            self._retrying += 1
        rec.retry_at = self._clock() + float(e.get("delay_s") or 0.0)
        error = e.get("error")
        if isinstance(error, Mapping) and error.get("class"):
            rec.error = str(error["class"])

    def _on_step_fallback(self, e: Event) -> None:
        rec = self._active.get(str(e.get("step")))
        if rec is not None:
            rec.note = f"falling back to {e.get('fallback', '?')}"
            error = e.get("error")
            if isinstance(error, Mapping) and error.get("class"):
                rec.error = str(error["class"])

    def _on_breaker(self, e: Event) -> None:
        agent = str(e.get("agent", "?"))
        if e["type"] == "breaker.opened":
            self._breakers[agent] = self._clock() + float(e.get("cooldown_s") or 0.0)
        else:
            self._breakers.pop(agent, None)
        self._notices.append((self._g.breaker, _breaker_text(e)))

    def _on_step_log(self, e: Event) -> None:
        rec = self._active.get(str(e.get("step")))
        if rec is not None:
            rec.note = str(e.get("message", ""))

    def _on_run_ended(self, e: Event) -> None:
        self._status = str(e.get("status") or e["type"].partition(".")[2])
        self._t_end = self._clock()
        if e.get("error"):
            self._failures.append(("run", _error_text(e["error"], self._g)))

    def _on_summary(self, e: Event) -> None:
        self._summary = e
        self._status = str(e.get("status", self._status))
        if self._t_end is None:
            self._t_end = self._clock()

    # -- drawing: called by rich's refresh thread, or by tests ---------------------------

    def render(self) -> RenderableType:
        """The current view; its cost is bounded by ``max_rows``, not by the run's size."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        g = self._g
        with self._lock:
            now = self._clock()
            rows = [
                (step, rec.attempt, rec.since, rec.retry_at, rec.error, rec.note)
                for step, rec in islice(self._active.items(), self._max_rows)
            ]
            n_active, n_retrying = len(self._active), self._retrying
            counts = {"running": n_active - n_retrying, "retrying": n_retrying, **self._counts}
            done, planned = self._done, max(self._planned, self._done + n_active)
            failures, tokens, cost = list(self._failures), self._tokens, self._cost
            notices = list(self._notices)
            breakers = list(islice(self._breakers.items(), self._max_rows))
            elapsed, status = self._elapsed(now), self._status

        header = Text.assemble(
            (self._workflow or "run", "bold"),
            f"{g.sep}run {self._run_id}",
            f"{g.sep}{format_duration(elapsed)}",
            (f"{g.sep}{status}" if status else ""),
        )
        bar = Table.grid(expand=True, padding=(0, 1))
        bar.add_column(ratio=1)
        bar.add_column(justify="right", no_wrap=True)
        percent = f" ({100 * done // planned}%)" if planned else ""
        bar.add_row(
            ProgressBar(total=max(planned, 1), completed=done), f"{done:,}/{planned:,}{percent}"
        )
        parts: list[RenderableType] = [header, bar, self._counts_text(counts)]

        if rows:
            table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
            for name, justify in _COLUMNS:
                table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis")
            for step, attempt, since, retry_at, error, note in rows:
                if retry_at is None:
                    row = ("running", format_duration(now - since), _one_line(note, g)[:80])
                else:
                    left = format_duration(max(retry_at - now, 0.0))
                    row = ("retrying", f"retry in {left}", error)
                table.add_row(
                    Text(step),
                    Text(row[0], style=_STYLES[row[0]]),
                    str(attempt or ""),
                    row[1],
                    Text(row[2], style="dim"),
                )
            parts.append(table)
            if n_active > len(rows):
                parts.append(Text(f"{g.more} and {n_active - len(rows):,} more", style="dim"))
        if tokens or cost:
            parts.append(Text(f"tokens {tokens:,}{g.sep}cost ${cost:.4f}"))
        for agent, trial_at in breakers:
            when = f"trial in {format_duration(trial_at - now)}" if trial_at > now else "trial due"
            parts.append(Text(f"{g.breaker} breaker {agent} open{g.sep}{when}", style="yellow"))
        for glyph, notice in notices:
            parts.append(Text(f"{glyph} {notice}"[:200], style="yellow", no_wrap=True))
        for step, message in failures:
            line = Text(f"{g.fail} {step}  ", style="red", no_wrap=True, overflow="ellipsis")
            line.append(message[:200])
            parts.append(line)
        return Group(*parts)

    def _counts_text(self, counts: Mapping[str, int]) -> Text:
        from rich.text import Text

        text = Text(no_wrap=True, overflow="ellipsis")
        for i, (status, n) in enumerate(_ordered_counts(counts)):
            text.append(self._g.sep if i else "")
            text.append(f"{status} {n:,}", style=_STYLES.get(status, ""))
        return text if text.plain else Text("starting" + self._g.more)


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
) -> Sink:
    """The sink for a run: JSON lines with ``--json``; a live view on a terminal unless
    ``progress`` is False or ``TERM=dumb``; plain lines otherwise (CI, pipes, files).

    ``stream`` defaults to ``sys.stdout`` and ``environ`` to ``os.environ``, read at call time.
    """
    out: TextIO = sys.stdout if stream is None else stream
    env = os.environ if environ is None else environ
    if json_mode:
        return JsonSink(out)
    if progress is not False and _isatty(out) and env.get("TERM") != "dumb":
        from rich.console import Console

        return LiveSink(Console(file=out, _environ=env))
    return PlainSink(out)
