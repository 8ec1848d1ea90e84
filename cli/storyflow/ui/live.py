"""`LiveSink`: a rich live view of a run, for terminals.

The only sink that draws with ``rich``, and it imports rich lazily, inside the functions
that draw, so that merely importing this module (as `storyflow.ui.progress` does) never
loads it. Its table of running rows is `storyflow.ui.rows`; streamed replies (rows'
notes, the ``--follow`` panel) are `storyflow.ui.stream`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any

from storyflow.ui.lines import (
    ASCII,
    WORKERS_SHOWN,
    Event,
    breaker_text,
    degraded_text,
    error_text,
    executor_text,
    failure_text,
    format_duration,
    glyphs_for,
    narrow_encoding,
    one_line,
    ordered_counts,
    summary_line,
    worker_label,
    workers_text,
)
from storyflow.ui.rows import STYLES, rows_table
from storyflow.ui.stream import Streams
from storyflow.ui.tally import Tally

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live
    from rich.text import Text

__all__ = ["LiveSink"]


class _Active:
    """A running or retrying step instance, as the live view shows it."""

    __slots__ = ("attempt", "error", "note", "retry_at", "since")

    def __init__(self, attempt: Any, since: float) -> None:
        self.attempt = attempt
        self.since = since
        self.retry_at: float | None = None
        self.error = ""
        self.note = ""


_ENDED_STYLES = {"failed": "red", "interrupted": "red", "waiting": "yellow"}
"""The progress bar's colour for a run that ended short of success."""


class LiveSink:
    """A rich live view of a run, for terminals.

    Events update counters, the running/retrying instances, the last failures and the
    token and cost totals, each in O(1); nothing is drawn per event. rich's own refresh
    thread (at most ``refresh_per_second``) draws `render()`, whose cost is bounded by
    ``max_rows`` whatever the number of steps. The live display starts with the first
    event; `close()` stops it and prints `summary_line`. With ``follow`` (see
    `storyflow.ui.stream.follows`), a panel shows the followed reply as it streams, and
    the whole reply is printed above the view when its attempt ends.
    """

    def __init__(
        self,
        console: Console,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_per_second: float = 8,
        max_rows: int = 12,
        follow: str | None = None,
    ) -> None:
        self._console = console
        self._clock = clock
        self._refresh_per_second = refresh_per_second
        self._max_rows = max_rows
        self._g = glyphs_for(narrow_encoding(console))
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._closed = False
        self._seen = False
        self._workflow = ""
        self._run_id = ""
        self._status = ""
        self._tally = Tally()
        """Steps and instances: planned, known, settled (see `storyflow.ui.tally`)."""
        self._degraded = 0
        self._t0: float | None = None
        self._t_end: float | None = None
        self._active: dict[str, _Active] = {}
        """Running and retrying instances that do work (not maps and loops), oldest first."""
        self._retrying = 0
        self._failures: deque[tuple[str, str]] = deque(maxlen=3)
        self._notices: deque[tuple[str, str]] = deque(maxlen=3)
        """Recent degraded steps and breaker changes, newest last."""
        self._breakers: dict[str, float] = {}
        """Open breakers: agent → when (our clock) its trial call is due."""
        self._tokens = 0
        self._cost = 0.0
        self._executor = ""
        """Where the steps run (a cluster), from ``run.started``; empty for a local run."""
        self._executor_note = ""
        self._workers: dict[str, list[int]] = {}
        """A cluster's workers (by label) → [steps succeeded, steps failed] on each."""
        self._summary: Event | None = None
        self._streams = Streams(follow)
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
            "step.waiting": self._on_step_waiting,
            "loop.iteration": self._on_loop_iteration,
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
            container = self._tally.add(event)
            if container is not None:
                self._drop(container)  # a map or a loop: its parts have rows
            if handler is not None:
                handler(event)
            finished = self._streams.see(event)
        if finished is not None and not self._closed:  # printed above the view, unlocked
            self._console.print(finished.printable(self._g))

    def suspend(self) -> None:
        """Stop drawing (a question is being asked on the terminal)."""
        if self._live is not None:
            self._live.stop()

    def resume(self) -> None:
        """Draw again after `suspend`."""
        if self._live is not None and not self._closed:
            self._live.start()

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
            steps, instances = self._tally.summary()
            summary = self._summary or {
                "status": self._status or "running",
                "steps": steps,
                "instances": instances,
                "duration_s": self._elapsed(self._clock()),
                "tokens": self._tokens,
                "cost": self._cost,
            }
        self._console.print(
            summary_line(summary, ascii=self._g is ASCII),
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
        executor = e.get("executor")
        if isinstance(executor, Mapping) and executor.get("kind", "local") != "local":
            self._executor = executor_text(executor)
            self._executor_note = str(executor.get("note") or "")
            workers = executor.get("workers")  # once a run: O(workers) is fine
            for worker in workers if isinstance(workers, list) else ():
                self._workers.setdefault(worker_label(str(worker)), [0, 0])

    def _ended_on(self, e: Event, outcome: int | None) -> str:
        """`` on LABEL`` for an event naming the worker of its attempt (else empty); an
        ``outcome`` (0 succeeded, 1 failed) is counted for that worker."""
        worker = e.get("worker")
        if not isinstance(worker, str) or not worker:
            return ""
        label = worker_label(worker)
        if outcome is not None:
            self._workers.setdefault(label, [0, 0])[outcome] += 1
        return f" on {label}"

    def _on_step_started(self, e: Event) -> None:
        step = str(e.get("step"))
        if step in self._tally.containers:
            return  # a map: its items have rows
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

    def _drop(self, step: str) -> None:
        """``step`` no longer has a row (it settled, paused, or is a map or a loop)."""
        rec = self._active.pop(step, None)
        if rec is not None and rec.retry_at is not None:
            self._retrying -= 1

    def _on_step_done(self, e: Event) -> None:
        self._drop(str(e.get("step")))
        if e["type"] == "step.succeeded":
            self._ended_on(e, 0)
        self._add_usage(e)
        if e.get("degraded"):
            self._degraded += 1
            self._notices.append((self._g.fallback, f"{e.get('step')} {degraded_text(e)}"))

    def _on_loop_iteration(self, e: Event) -> None:
        self._drop(str(e.get("step")))

    def _on_step_waiting(self, e: Event) -> None:
        step = str(e.get("step"))
        self._drop(step)
        asks = e.get("answer_step", step)
        self._notices.append(("?", f"{asks} waits for an answer: {e.get('question', '')}"))

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
        self._drop(step)
        self._failures.append((step + self._ended_on(e, 1), failure_text(e, self._g)))

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
            rec.error = str(error["class"]) + self._ended_on(e, None)

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
        self._notices.append((self._g.breaker, breaker_text(e)))

    def _on_step_log(self, e: Event) -> None:
        rec = self._active.get(str(e.get("step")))
        if rec is not None:
            rec.note = str(e.get("message", ""))

    def _on_run_ended(self, e: Event) -> None:
        self._status = str(e.get("status") or e["type"].partition(".")[2])
        self._t_end = self._clock()
        if e.get("error"):
            self._failures.append(("run", error_text(e["error"], self._g)))

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
                (step, rec.attempt, rec.since, rec.retry_at, rec.error, rec.note,
                 self._streams.note(step, g))
                for step, rec in islice(self._active.items(), self._max_rows)
            ]
            panel = self._streams.panel(g)
            n_active, n_retrying = len(self._active), self._retrying
            tally = self._tally
            counts = {"running": n_active - n_retrying, "retrying": n_retrying, **tally.counts,
                      "degraded": self._degraded}
            planned = max(tally.total, tally.done + n_active)
            done = min(tally.done, planned)
            # A run that ended short of success shows no percentage (the header says how
            # it ended); a run still going never reads 100%.
            style = _ENDED_STYLES.get(self._status)
            bar_text = tally.label(self._status, g.sep, planned=planned, percent=not style)
            failures, tokens, cost = list(self._failures), self._tokens, self._cost
            notices = list(self._notices)
            breakers = list(islice(self._breakers.items(), self._max_rows))
            elapsed, status = self._elapsed(now), self._status
            workers = [
                label + (f" {g.ok}{ok:,}" if ok else "")
                + (f" {g.fail}{failed:,}" if failed else "")
                for label, (ok, failed) in islice(self._workers.items(), WORKERS_SHOWN)
            ]
            n_workers = len(self._workers)
            executor, executor_note = self._executor, self._executor_note

        header = Text.assemble(
            (self._workflow or "run", "bold"),
            f"{g.sep}run {self._run_id}",
            f"{g.sep}{format_duration(elapsed)}",
            (f"{g.sep}{status}" if status else ""),
        )
        bar = Table.grid(expand=True, padding=(0, 1))
        bar.add_column(ratio=1)
        bar.add_column(justify="right", no_wrap=True)
        bar.add_row(
            ProgressBar(total=max(planned, 1), completed=done, complete_style=style or
                        "bar.complete", finished_style=style or "bar.finished"),
            bar_text,
        )
        parts: list[RenderableType] = [header]
        if executor:
            parts.append(Text(f"executor: {executor}", style="dim", no_wrap=True,
                              overflow="ellipsis"))
        if n_workers:  # at most WORKERS_SHOWN named: a line or two, whatever the cluster
            parts.append(Text(workers_text(workers, n_workers, g), style="dim"))
        if executor_note:
            note = f"executor note: {one_line(executor_note, g)}"[:200]
            parts.append(Text(note, style="yellow", no_wrap=True, overflow="ellipsis"))
        parts += [bar, self._counts_text(counts)]

        if rows:
            parts.append(rows_table(rows, now, g))
            if n_active > len(rows):
                parts.append(Text(f"{g.more} and {n_active - len(rows):,} more", style="dim"))
        if panel is not None:
            parts.append(panel)
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
        for i, (status, n) in enumerate(ordered_counts(counts)):
            text.append(self._g.sep if i else "")
            text.append(f"{status} {n:,}", style=STYLES.get(status, ""))
        if not text.plain:
            return Text("starting" + self._g.more)
        return Text("instances: ", no_wrap=True, overflow="ellipsis").append_text(text)
