"""Statuses and event types. These strings are persisted: never rename a value."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """Where a whole run stands."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    WAITING = "waiting"


class StepStatus(StrEnum):
    """Where one step instance stands."""

    PENDING = "pending"
    READY = "ready"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    CACHED = "cached"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in _DONE

    @property
    def ok(self) -> bool:
        return self in (StepStatus.SUCCEEDED, StepStatus.CACHED)


_DONE = frozenset(
    {
        StepStatus.SUCCEEDED,
        StepStatus.CACHED,
        StepStatus.FAILED,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
    }
)


class ErrorClass(StrEnum):
    """Why an attempt failed; `retry.on` selects classes by these names."""

    TRANSIENT = "transient"
    TIMEOUT = "timeout"
    INVALID_OUTPUT = "invalid_output"
    PERMANENT = "permanent"
    CANCELLED = "cancelled"
    CIRCUIT_OPEN = "circuit_open"
    BUDGET_EXCEEDED = "budget_exceeded"
    WORKER_LOST = "worker_lost"
    """The executor's worker died during the attempt; transient: retried by ``retry.on``
    naming ``worker_lost`` or ``transient``."""
    REPLAY_MISS = "replay_miss"
    """``storyflow replay --strict``: the call's request is not in the recorded run."""


class EventType(StrEnum):
    """The `type` field of every event line."""

    RUN_STARTED = "run.started"
    RUN_RESUMED = "run.resumed"
    RUN_SUCCEEDED = "run.succeeded"
    RUN_FAILED = "run.failed"
    RUN_INTERRUPTED = "run.interrupted"
    RUN_WAITING = "run.waiting"
    RUN_SUMMARY = "run.summary"
    STEP_STARTED = "step.started"
    STEP_SUCCEEDED = "step.succeeded"
    STEP_FAILED = "step.failed"
    STEP_RETRYING = "step.retrying"
    STEP_SKIPPED = "step.skipped"
    STEP_CACHED = "step.cached"
    STEP_CANCELLED = "step.cancelled"
    STEP_KEPT = "step.kept"
    STEP_DELTA = "step.delta"
    STEP_FALLBACK = "step.fallback"
    STEP_LOG = "step.log"
    STEP_WAITING = "step.waiting"
    LOOP_ITERATION = "loop.iteration"
    LOOP_ITERATED = "loop.iterated"
    BREAKER_OPENED = "breaker.opened"
    BREAKER_CLOSED = "breaker.closed"


class BreakerState(StrEnum):
    """Where an agent's circuit breaker stands (in memory, for one process of a run)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
