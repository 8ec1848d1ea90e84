"""Group commit: the checkpoints and events of a run, buffered and committed together.

The checkpoints and events of one synchronous turn of the event loop are buffered and
committed together — store first, then events, so a crash never leaves an event that
the store does not back. The scheduler keeps two rules:

- `Journal.flush` before anything awaits an agent, a pool or a retry delay, so what
  led to the wait is durable and a crash loses at most the attempts in flight;
- `Journal.schedule_flush` at the end of a turn (after the scheduler has started what
  it can): the flush runs once the tasks launched in that turn have taken their first
  step, so a step's success is durable before any dependent's agent runs, and a chain
  of steps pays one transaction per step.

Secret values are redacted from every event and checkpoint on the way in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from storyflow.engine.instance import Instance
from storyflow.engine.lifecycle import step_fire
from storyflow.events import EventType
from storyflow.store import StepRecord, Store, redact

Sink = Callable[[dict[str, Any]], None]
"""Where events go once the checkpoints that back them are committed."""


class Journal:
    """The write side of one run: buffered checkpoints, held-back events, one flush."""

    __slots__ = (
        "clock",
        "dirty",
        "flush_handle",
        "pending_events",
        "run_id",
        "secret_values",
        "sink",
        "store",
    )

    def __init__(
        self,
        store: Store,
        run_id: str,
        sink: Sink,
        clock: Callable[[], float],
        secret_values: list[str],
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.sink = sink
        self.clock = clock
        self.secret_values = secret_values
        self.dirty: dict[str, StepRecord] = {}
        """Checkpoints not yet committed, by instance id (the latest one wins)."""
        self.pending_events: list[dict[str, Any]] = []
        """Events held back until the checkpoints before them are committed."""
        self.flush_handle: asyncio.Handle | None = None

    def emit(self, type_: EventType, **fields: Any) -> None:
        event = {"type": type_.value, "run_id": self.run_id, "ts": self.clock(), **fields}
        if self.secret_values:
            event = redact(event, self.secret_values)
        if self.dirty:
            self.pending_events.append(event)  # after the checkpoint that backs it
        else:
            self.sink(event)

    def move(self, inst: Instance, event: str) -> None:
        """Fire ``event`` on the instance's lifecycle machine and checkpoint it."""
        step_fire(inst, event)
        self.checkpoint(inst)

    def checkpoint(self, inst: Instance) -> None:
        rec = inst.record(inst.node.fingerprint)
        if self.secret_values:
            output = redact(rec.output, self.secret_values)
            if output != rec.output:
                # Only the redacted form is stored, so this output cannot be restored:
                # resume re-runs the step instead of handing `***` downstream.
                rec.meta["redacted"] = True
            rec.output = output
            rec.error = redact(rec.error, self.secret_values)
            if rec.request is not None:
                rec.request = redact(rec.request, self.secret_values)
        self.dirty[inst.id] = rec

    def copy(self, records: list[StepRecord]) -> None:
        """Checkpoint records made elsewhere (a fork's copies of its parent's)."""
        for rec in records:
            self.dirty[rec.id] = rec

    def schedule_flush(self) -> None:
        """Flush once the tasks launched in this turn have taken their first step.

        Called at the end of a turn, after the scheduler's pump: the new tasks' first
        steps are already queued, so they run first and their `start` checkpoints join
        the same transaction (they flush before awaiting their agent anyway).
        """
        if self.dirty and self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Commit buffered checkpoints in one transaction, then release their events."""
        if self.flush_handle is not None:
            # A flush queued by an earlier turn would otherwise run before the tasks
            # launched since, splitting one transaction in two.
            self.flush_handle.cancel()
            self.flush_handle = None
        if self.dirty:
            records = list(self.dirty.values())
            self.dirty.clear()
            self.store.put_steps(self.run_id, records)
        if self.pending_events:
            events = self.pending_events
            self.pending_events = []
            for event in events:
                self.sink(event)
