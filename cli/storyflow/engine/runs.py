"""A run's beginning and end as records: what a resume keeps, and how a run is closed.

Shared by the ``run``/``resume`` commands and by sub-workflow steps, whose child runs
start, end and resume the same way in the parent's process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from storyflow.engine.finish import Result
from storyflow.engine.lifecycle import RunLife, run_fire
from storyflow.engine.plan import Plan
from storyflow.events import EventType, RunStatus, StepStatus
from storyflow.store import RunRecord, StepRecord, Store

_END_EVENT = {
    RunStatus.SUCCEEDED: ("succeed", EventType.RUN_SUCCEEDED),
    RunStatus.FAILED: ("fail", EventType.RUN_FAILED),
    RunStatus.INTERRUPTED: ("interrupt", EventType.RUN_INTERRUPTED),
    RunStatus.WAITING: ("wait", EventType.RUN_WAITING),
}
_OK = (StepStatus.SUCCEEDED.value, StepStatus.CACHED.value)


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What a resume does with each top-level step."""

    previous: dict[str, StepRecord]
    """The records of the earlier processes of the run."""
    changed: list[str]
    """Steps whose definition changed since their record was written."""
    forced: frozenset[str]
    """Steps that re-run: changed, ``--from`` and everything downstream of them."""
    kept: list[str]
    """Steps whose output stands."""
    todo: list[str]
    """Steps that run (or re-run)."""


def resume_plan(
    store: Store, record: RunRecord, compiled: Plan, from_steps: Iterable[str] = ()
) -> ResumePlan:
    previous = store.get_steps(record.run_id, compiled.order)
    changed = [
        sid
        for sid in compiled.order
        if sid in previous and previous[sid].meta.get("def") != compiled.nodes[sid].fingerprint
    ]
    forced = compiled.downstream([*changed, *from_steps])
    kept = [
        sid
        for sid in compiled.order
        if sid not in forced
        and sid in previous
        and previous[sid].status in _OK
        and not previous[sid].meta.get("redacted")  # cannot be restored: re-runs
    ]
    todo = [sid for sid in compiled.order if sid not in kept]
    return ResumePlan(previous, changed, frozenset(forced), kept, todo)


def end_run(
    emit: Any, store: Store, record: RunRecord, result: Result, life: RunLife, started: float
) -> float:
    """Record how the run ended, then emit its end event and summary; the duration."""
    trigger, end_type = _END_EVENT[result.status]
    run_fire(life, trigger)
    record.status = life.state
    record.outputs = result.outputs
    record.error = result.error
    record.ended_at = record.updated_at = store.clock()
    record.meta["counts"] = result.counts
    if result.usage is not None:
        record.meta["usage"] = result.usage
    if result.waiting:
        record.meta["waiting"] = result.waiting
    else:
        record.meta.pop("waiting", None)
    store.put_run(record)
    duration = record.ended_at - started
    extra: dict[str, Any] = {"error": result.error} if result.error else {}
    if result.waiting:
        extra["waiting"] = result.waiting
    if result.usage and result.usage.get("calls"):
        extra["tokens"] = result.usage["tokens"]
        extra["cost"] = result.usage["cost"]
    emit(end_type, status=result.status.value, duration_s=round(duration, 3), **extra)
    emit(
        EventType.RUN_SUMMARY,
        status=result.status.value,
        outputs=result.outputs,
        steps=result.counts,
        duration_s=round(duration, 3),
        run_dir=str(store.run_dir(record.run_id)),
        **extra,
    )
    return duration
