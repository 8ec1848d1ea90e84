"""Run events as one-line text: the glyphs, the shared helpers and the plain line formats.

Both text sinks draw on this module: `PlainSink` prints `LINE_FORMATS` lines (and the
`EXTRA_LINES` of a run on a cluster), and the live view reuses the helpers (durations,
error, breaker and executor text, `summary_line`). Standard library only, so importing
it never loads ``rich``.
"""

from __future__ import annotations

import codecs
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storyflow.events import StepStatus

__all__ = [
    "ASCII",
    "EXTRA_LINES",
    "LINE_FORMATS",
    "UNICODE",
    "WORKERS_SHOWN",
    "Event",
    "Glyphs",
    "breaker_text",
    "counted",
    "degraded_text",
    "error_text",
    "executor_lines",
    "executor_text",
    "failure_line",
    "failure_text",
    "format_duration",
    "generic_line",
    "glyphs_for",
    "narrow_encoding",
    "offset_text",
    "one_line",
    "ordered_counts",
    "summary_line",
    "traceback_lines",
    "worker_label",
    "workers_text",
]

Event = Mapping[str, Any]
"""One event as the engine emits it: ``type``, ``run_id``, ``ts`` and per-type fields."""


@dataclass(frozen=True, slots=True)
class Glyphs:
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
    write: str


UNICODE = Glyphs("▶", "✓", "✗", "↻", "⤼", "⊘", "≡", " · ", "…", " ⏎ ", "↪", "◆", "✎")
ASCII = Glyphs(">", "+", "x", "~", "-", "/", "=", " | ", "...", " / ", "->", "*", ">>")
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


def narrow_encoding(stream: object) -> str | None:
    """The stream's codec name when it is not a UTF codec; None when anything encodes."""
    encoding = getattr(stream, "encoding", None)
    if not isinstance(encoding, str):
        return None
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return "ascii"
    return None if name.startswith("utf") else name


def glyphs_for(encoding: str | None) -> Glyphs:
    """`UNICODE` when ``encoding`` (None: any) can carry every symbol, else `ASCII`."""
    if encoding is None:
        return UNICODE
    try:
        "".join(getattr(UNICODE, f) for f in UNICODE.__slots__).encode(encoding)
    except UnicodeEncodeError:
        return ASCII
    return UNICODE


def format_duration(seconds: float) -> str:
    """``1.6s`` under a minute, ``2m05s`` under an hour, ``1h02m05s`` beyond."""
    if seconds < 59.95:
        return f"{max(seconds, 0.0):.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def offset_text(seconds: float) -> str:
    """An offset from the run's start as ``mm:ss.s``."""
    tenths = round(seconds * 10) if seconds > 0 else 0
    minutes, tenths = divmod(tenths, 600)
    return f"{minutes:02d}:{tenths // 10:02d}.{tenths % 10}"


def one_line(text: object, glyphs: Glyphs) -> str:
    """``text`` as one line: its non-blank lines joined by the ``newline`` glyph."""
    text = str(text)
    if "\n" in text or "\r" in text:
        return glyphs.newline.join(line for line in text.splitlines() if line.strip())
    return text


def error_text(error: object, glyphs: Glyphs) -> str:
    """``class: message`` from an event's ``error`` (a mapping, or anything printable)."""
    if isinstance(error, Mapping):
        parts = [str(error[k]) for k in ("class", "message") if error.get(k) not in (None, "")]
        return one_line(": ".join(parts), glyphs)
    return one_line(error, glyphs)


def degraded_text(event: Event) -> str:
    """``degraded (served by offline-writer)``, or plain ``degraded`` with no agent named."""
    agent = event.get("agent")
    return f"degraded (served by {agent})" if agent else "degraded"


def breaker_text(event: Event) -> str:
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


def worker_label(address: str) -> str:
    """A worker's address for people: ``tcp://127.0.0.1:38135`` → ``127.0.0.1:38135``."""
    return address.partition("://")[2] or address


WORKERS_SHOWN = 8
"""At most this many workers are named on a line; the rest are counted."""


def workers_text(names: Sequence[str], total: int, glyphs: Glyphs) -> str:
    """``2 workers: 127.0.0.1:38135, 127.0.0.1:38933``, naming at most `WORKERS_SHOWN`
    of ``total`` (``names`` are the first ones, already labelled)."""
    text = f"{total:,} worker{'' if total == 1 else 's'}"
    shown = list(names[:WORKERS_SHOWN])
    if shown:
        text += ": " + ", ".join(shown)
    if total > len(shown) and shown:
        text += f", {glyphs.more} and {total - len(shown):,} more"
    return text


def executor_text(executor: Mapping[str, Any]) -> str:
    """Where a run's steps run, from a ``run.started`` event's ``executor``:
    ``dask tcp://127.0.0.1:8786 (local cluster)``."""
    text = str(executor.get("kind", "?"))
    if executor.get("address"):
        text += f" {executor['address']}"
    cluster = executor.get("cluster")
    if cluster == "local":
        text += " (local cluster)"
    elif cluster == "external":
        text += " (external scheduler)"
    return text


def executor_lines(event: Event, glyphs: Glyphs) -> list[str]:
    """The lines a ``run.started``/``run.resumed`` adds for a run on a cluster: the
    executor and its workers, then its note; none for a local run."""
    executor = event.get("executor")
    if not isinstance(executor, Mapping) or executor.get("kind", "local") == "local":
        return []
    text = "executor: " + executor_text(executor)
    workers = executor.get("workers")
    if isinstance(workers, list):
        names = [worker_label(str(w)) for w in workers[:WORKERS_SHOWN]]
        text += glyphs.sep + workers_text(names, len(workers), glyphs)
    lines = [one_line(text, glyphs)]
    if executor.get("note"):
        lines.append("executor note: " + one_line(executor["note"], glyphs))
    return lines


def _on(event: Event) -> str:
    """`` on 127.0.0.1:38135`` for an event that names the worker of its attempt."""
    worker = event.get("worker")
    return f" on {worker_label(worker)}" if isinstance(worker, str) and worker else ""


def _extras(event: Event, glyphs: Glyphs) -> str:
    """`` · 120 tok · $0.0012 · degraded`` for whichever of these the event carries."""
    text = ""
    tokens = event.get("tokens")
    if tokens:
        text += f"{glyphs.sep}{tokens:,} tok"
    cost = event.get("cost")
    if cost:
        text += f"{glyphs.sep}${cost:.4f}"
    if event.get("degraded"):
        text += f"{glyphs.sep}{degraded_text(event)}"
    return text


def ordered_counts(counts: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Non-zero status counts in display order; statuses we do not know come last."""
    known = [(s, int(counts[s])) for s in _STATUS_ORDER if counts.get(s)]
    return known + [(s, int(n)) for s, n in counts.items() if n and s not in _STATUS_ORDER]


def counted(counts: object, noun: str) -> str:
    """``12 steps (10 succeeded, 2 skipped)`` from status → count (``noun`` singular)."""
    pairs = ordered_counts(counts) if isinstance(counts, Mapping) else []
    total = sum(n for _, n in pairs)
    text = f"{total:,} {noun}{'' if total == 1 else 's'}"
    if pairs:
        text += " (" + ", ".join(f"{n:,} {s}" for s, n in pairs) + ")"
    return text


def summary_line(event: Event, *, ascii: bool = False) -> str:
    """The one-line summary of a ``run.summary`` event, as both text sinks print it.

    ``summary: succeeded · 14 steps (14 succeeded) · 26 instances (24 succeeded, 2
    skipped) · 9.9s · 1,234 tok · $0.0123``: the plan's top-level steps by status, then
    every instance (map items, loop iterations' steps) when they differ from the steps.
    """
    glyphs = ASCII if ascii else UNICODE
    steps, instances = event.get("steps"), event.get("instances")
    text = f"summary: {event.get('status', '?')}{glyphs.sep}{counted(steps, 'step')}"
    if isinstance(instances, Mapping) and (
        not isinstance(steps, Mapping) or ordered_counts(instances) != ordered_counts(steps)
    ):
        text += glyphs.sep + counted(instances, "instance")
    duration = event.get("duration_s")
    if isinstance(duration, int | float):
        text += glyphs.sep + format_duration(duration)
    return text + _extras({"tokens": event.get("tokens"), "cost": event.get("cost")}, glyphs)


# -- the plain line of each event type, without its offset ---------------------------------


def _run_started(e: Event, g: Glyphs) -> str:
    steps = e.get("steps")
    planned = f" ({steps} step{'' if steps == 1 else 's'})" if steps is not None else ""
    return f"{e['type']} {e.get('workflow', '?')}{planned} run {e.get('run_id', '?')}"


def _step_started(e: Event, g: Glyphs) -> str:
    attempt = e.get("attempt")
    text = f"{g.start} {e['step']}" + (f" attempt {attempt}" if attempt else "")
    return text + (f" (fallback {e['agent']})" if e.get("degraded") and e.get("agent") else "")


def _step_succeeded(e: Event, g: Glyphs) -> str:
    duration = e.get("duration_s")
    took = f" {format_duration(duration)}" if duration is not None else ""
    return f"{g.ok} {e['step']}{took}{_on(e)}{_extras(e, g)}"


def _step_same(e: Event, g: Glyphs) -> str:
    duration = e.get("duration_s")
    took = f" {format_duration(duration)}" if duration is not None else ""
    status = e["type"].partition(".")[2]
    return f"{g.same} {e['step']} {status}{took}{_extras(e, g)}"


def failure_text(e: Event, g: Glyphs, *, pointer: bool = True) -> str:
    """``class: message`` of a failed attempt's event, for one line.

    An error with more than fits on a line (a traceback, a message of several lines)
    shows its message's first and last lines and, with ``pointer``, where the rest is:
    ``(see: storyflow show RUN --step plot)``."""
    error = e.get("error")
    if not error:
        return ""
    if not isinstance(error, Mapping):
        return error_text(error, g)
    lines = [line for line in str(error.get("message") or "").splitlines() if line.strip()]
    if len(lines) > 1:
        error = {**error, "message": f"{lines[0]} {g.more} {lines[-1]}"}
    text = error_text(error, g)
    if pointer and (len(lines) > 1 or error.get("traceback")) and e.get("run_id"):
        text += f" (see: storyflow show {e['run_id']} --step {shlex.quote(str(e['step']))})"
    return text


def failure_line(e: Event, g: Glyphs, *, pointer: bool = True) -> str:
    """The line of a ``step.failed`` event: ``✗ plot attempt 3: transient: …`` (see
    `failure_text`; a failure that will be retried points nowhere)."""
    attempt = e.get("attempt")
    text = f"{g.fail} {e['step']}" + (f" attempt {attempt}" if attempt else "") + _on(e)
    final = e.get("final") is not False
    why = failure_text(e, g, pointer=pointer and final)
    if why:
        text += ": " + why
    if not final:
        return text + " (will retry)"
    error = e.get("error")
    hint = error.get("hint") if isinstance(error, Mapping) else None
    if hint:
        text += f" (hint: {one_line(hint, g)})"
    return text


def traceback_lines(e: Event) -> list[str]:
    """The lines of the traceback an event's ``error`` carries (none without one)."""
    error = e.get("error")
    tb = error.get("traceback") if isinstance(error, Mapping) else None
    return str(tb).rstrip("\n").splitlines() if tb else []


def _step_retrying(e: Event, g: Glyphs) -> str:
    delay = e.get("delay_s")
    when = f" in {format_duration(delay)}" if delay is not None else ""
    text = f"{g.retry} {e['step']} retry{when}"
    on = _on(e)
    if on:  # where the failed attempt ran, and why it failed
        error = e.get("error")
        why = error.get("class") if isinstance(error, Mapping) else None
        text += f" ({why or 'failed'}{on})"
    return text


def _step_skipped(e: Event, g: Glyphs) -> str:
    glyph = g.skip if e["type"] == "step.skipped" else g.cancel
    reason = e.get("reason")
    why = f": {one_line(reason, g)}" if reason else ""
    return f"{glyph} {e['step']} {e['type'].partition('.')[2]}{why}"


def _step_fallback(e: Event, g: Glyphs) -> str:
    text = f"{g.fallback} {e['step']} falls back to {e.get('fallback', '?')}"
    error = e.get("error")
    why = f": {error_text(error, g)}" if error else ""
    return text + f" ({e.get('agent', '?')}{why})"


def _breaker(e: Event, g: Glyphs) -> str:
    return f"{g.breaker} {breaker_text(e)}"


def _step_log(e: Event, g: Glyphs) -> str:
    return f"  {e['step']}: {one_line(e.get('message', ''), g)}"


def _step_waiting(e: Event, g: Glyphs) -> str:
    asks = e.get("answer_step", e["step"])
    via = f" (via {e['step']})" if asks != e["step"] else ""
    return f"? {asks}{via} waits for an answer: {one_line(e.get('question', ''), g)}"


def _loop_iteration(e: Event, g: Glyphs) -> str:
    return f"{g.retry} {e['step']} iteration {e.get('iteration', '?')}"


def _loop_iterated(e: Event, g: Glyphs) -> str:
    verdict = "until holds" if e.get("done") else "until not yet"
    score = f"{g.sep}score {one_line(e['score'], g)}" if "score" in e else ""
    return f"  {e['step']} iteration {e.get('iteration', '?')} ended: {verdict}{score}"


def _run_ended(e: Event, g: Glyphs) -> str:
    duration = e.get("duration_s")
    text = str(e["type"]) + (f" in {format_duration(duration)}" if duration is not None else "")
    return text + (f": {error_text(e['error'], g)}" if e.get("error") else "")


def generic_line(e: Event, g: Glyphs) -> str:
    """The line of an event type with no format of its own, or of fields of unexpected shape."""
    step = e.get("step")
    fields = " ".join(f"{k}={one_line(v, g)}" for k, v in e.items() if k not in _BASE_KEYS)
    return " ".join(str(p) for p in (e.get("type", "?"), step, fields) if p)


LINE_FORMATS: Mapping[str, Callable[[Event, Glyphs], str]] = {
    "run.started": _run_started,
    "run.resumed": _run_started,
    "step.started": _step_started,
    "step.succeeded": _step_succeeded,
    "step.cached": _step_same,
    "step.kept": _step_same,
    "step.failed": failure_line,
    "step.retrying": _step_retrying,
    "step.skipped": _step_skipped,
    "step.cancelled": _step_skipped,
    "step.log": _step_log,
    "step.fallback": _step_fallback,
    "breaker.opened": _breaker,
    "breaker.closed": _breaker,
    "step.waiting": _step_waiting,
    "loop.iteration": _loop_iteration,
    "loop.iterated": _loop_iterated,
    "run.succeeded": _run_ended,
    "run.failed": _run_ended,
    "run.interrupted": _run_ended,
    "run.waiting": _run_ended,
}
"""Event type → its plain line (without the offset); `generic_line` covers the rest."""

EXTRA_LINES: Mapping[str, Callable[[Event, Glyphs], list[str]]] = {
    "run.started": executor_lines,
    "run.resumed": executor_lines,
}
"""Event type → the lines printed after its own (each with the same offset)."""
