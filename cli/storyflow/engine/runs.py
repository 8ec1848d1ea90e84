"""A run's beginning and end as records: what a resume keeps, how a run is closed, and
how a run stands as seen from outside (`view`).

Shared by the ``run``/``resume`` commands and by sub-workflow steps, whose child runs
start, end and resume the same way in the parent's process.

A run's time (``meta["active_s"]``) is the time its processes ran, summed when each
ends: the idle time between a failure and its resume is not in it. A process that
ended without a word (``kill -9``, a crash) is counted from its event log, from its
start event to its last event, when the next process of the run ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
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
    removed: list[str]
    """Steps the run had that the workflow file no longer has (their records stay)."""
    damaged: tuple[str, ...] = ()
    """Steps whose record does not read back: treated as never run, so they run again."""


def resume_plan(
    store: Store,
    record: RunRecord,
    compiled: Plan,
    from_steps: Iterable[str] = (),
    *,
    warn: Callable[[str], None] | None = None,
) -> ResumePlan:
    """What a resume keeps and runs. A step whose record is damaged counts as never
    run, and ``warn`` (default: a line on stderr) is told of it."""
    previous, damaged = store.read_steps(record.run_id, compiled.order)
    for damage in damaged.values():
        (warn or _stderr_line)(f"warning: {damage.describe()}; it runs again")
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
    removed = [sid for sid in record.meta.get("steps") or [] if sid not in compiled.nodes]
    return ResumePlan(previous, changed, frozenset(forced), kept, todo, removed,
                      tuple(damaged))


def _stderr_line(text: str) -> None:
    import sys

    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def what_changed(record: RunRecord, changed: list[str], sets: Iterable[str]) -> str:
    """What changed since the run's last process started, in one line for the resume plan:
    the workflow file (its bytes), the settings (``sets``, the new ``--set`` values), the
    steps whose definition changed; empty when nothing did."""
    parts = []
    if _file_changed(record):
        parts.append("the workflow file changed since the run started")
    settings = _new_settings(record.sets, sets)
    if settings:
        parts.append("settings changed: " + ", ".join(settings))
    if changed:
        parts.append("changed steps: " + ", ".join(changed))
    elif parts:
        parts.append("no step changed")
    return "; ".join(parts)


def _file_changed(record: RunRecord) -> bool:
    """Whether the file's bytes differ from those the run's ``source_hash`` was made from
    (hashed with the run's own ``--env`` and ``--set``, so new settings do not count)."""
    from storyflow.spec import _source_hash  # the one definition of a run's source hash

    try:
        text = Path(record.workflow_path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return True
    return _source_hash(text, record.environment, record.sets) != record.source_hash


def _new_settings(before: Iterable[str], sets: Iterable[str]) -> list[str]:
    """The ``path=value`` of each new ``--set`` that changes what the run had."""
    had: dict[str, str] = {}
    for item in before:
        path, _, raw = item.partition("=")
        had[path.strip()] = raw
    new: dict[str, str] = {}
    for item in sets:
        path, _, raw = item.partition("=")
        path = path.strip()
        new.pop(path, None)  # the last --set of a path is the one that counts
        if had.get(path) != raw:
            new[path] = raw
    return [f"{path}={raw}" for path, raw in new.items()]


def end_run(
    emit: Any, store: Store, record: RunRecord, result: Result, life: RunLife, started: float
) -> float:
    """Record how the run ended, then emit its end event and summary; the duration."""
    trigger, end_type = _END_EVENT[result.status]
    run_fire(life, trigger)
    request = record.meta.pop("cancel", None)  # `storyflow cancel`, in memory only
    if result.status is RunStatus.INTERRUPTED and result.error is None and request is not None:
        result.error = cancel_error(record.run_id, request)
    accounted = record.ended_at  # the end of the last process that said how it ended
    record.status = life.state
    record.outputs = result.outputs
    record.error = result.error
    record.ended_at = record.updated_at = store.clock()
    duration = record.ended_at - started
    log = store.run_dir(record.run_id) / "events.jsonl"
    log_at = record.meta.get("log_at")
    lost = _unaccounted_s(log, log_at if isinstance(log_at, int) else 0,
                          after=accounted, before=started)
    active = record.meta.get("active_s")
    active = float(active) if isinstance(active, int | float) else 0.0
    record.meta["active_s"] = round(active + lost + duration, 3)
    try:
        record.meta["log_at"] = log.stat().st_size  # the next process's count starts here
    except OSError:
        record.meta.pop("log_at", None)
    record.meta["counts"] = result.counts
    if result.usage is not None:
        record.meta["usage"] = result.usage
    if result.waiting:
        record.meta["waiting"] = result.waiting
    else:
        record.meta.pop("waiting", None)
    store.put_run(record)
    extra: dict[str, Any] = {"error": result.error} if result.error else {}
    if result.waiting:
        extra["waiting"] = result.waiting
    if isinstance(record.meta.get("replay"), dict):
        extra["replay"] = record.meta["replay"]  # calls answered from the record, live
    if result.usage and result.usage.get("calls"):
        extra["tokens"] = result.usage["tokens"]
        extra["cost"] = result.usage["cost"]
    emit(end_type, status=result.status.value, duration_s=round(duration, 3), **extra)
    emit(
        EventType.RUN_SUMMARY,
        status=result.status.value,
        outputs=result.outputs,
        steps=result.steps,
        instances=result.counts,
        duration_s=round(duration, 3),
        run_dir=str(store.run_dir(record.run_id)),
        **extra,
    )
    return duration


_STARTS = (b'"type":"run.started"', b'"type":"run.resumed"')


def _ts(line: bytes) -> float | None:
    try:
        event = json.loads(line)
    except ValueError:  # a line torn by a crash
        return None
    ts = event.get("ts") if isinstance(event, dict) else None
    return float(ts) if isinstance(ts, int | float) else None


def _unaccounted_s(log: Path, offset: int, *, after: float | None, before: float) -> float:
    """The time run by processes that ended without a word (``kill -9``): each one that
    started after ``after`` (the last process that ended properly) and before ``before``
    (this process), from its start event to its last event. Reads the log from byte
    ``offset``, parsing only start events and the last lines before them."""
    lost = 0.0
    start: float | None = None
    tail: list[bytes] = []
    try:
        f = log.open("rb")
    except OSError:
        return 0.0
    with f:
        f.seek(offset)
        for line in f:
            if not any(mark in line for mark in _STARTS):
                if start is not None:
                    tail = [*tail[-1:], line]
                continue
            ts = _ts(line)
            if ts is None:
                continue
            if start is not None:
                last = next((t for t in map(_ts, reversed(tail)) if t is not None), start)
                lost += max(0.0, last - start)
            start, tail = None, []
            if ts >= before:
                break  # this process's own start
            if after is None or ts > after:
                start = ts
    return lost


@dataclass(frozen=True, slots=True)
class RunView:
    """A run as `runs` and `show` present it, read without writing anything."""

    status: str
    """The run's status; ``interrupted`` for a ``running`` run whose process is gone."""
    holder_gone: bool
    """The store says ``running`` but no live process holds the run (killed, crashed)."""
    active_s: float | None
    """The time its processes ran (idle time between them left out); None if unknown."""


def view(store: Store, record: RunRecord, top: RunRecord | None = None) -> RunView:
    """How ``record`` stands. A child run lives in its top-level run's process: ``top``
    is that run (looked up when not given)."""
    active = record.meta.get("active_s")
    done = float(active) if isinstance(active, int | float) else None
    if record.status != RunStatus.RUNNING.value:
        if done is None and record.ended_at is not None:  # a run from before active_s
            done = max(0.0, record.ended_at - record.created_at)
        return RunView(record.status, False, done)
    top = top or top_run(store, record)
    holder = store.holder(top.run_id)
    alive = holder is not None and holder.alive
    status = RunStatus.RUNNING.value if alive else RunStatus.INTERRUPTED.value
    if holder is not None and holder.since is not None and top.run_id == record.run_id:
        until = store.clock() if alive else max(holder.heartbeat, _last_event_at(store, record))
        done = (done or 0.0) + max(0.0, until - holder.since)
    return RunView(status, not alive, done)


def _last_event_at(store: Store, record: RunRecord) -> float:
    """When the run's event log was last written (0 without one); reads only (``run_dir``
    would create a missing folder)."""
    try:
        return (store.root / "runs" / record.run_id / "events.jsonl").stat().st_mtime
    except OSError:
        return 0.0


def top_run(store: Store, record: RunRecord) -> RunRecord:
    """The top-level run whose process runs ``record`` (itself, unless a child run)."""
    seen = {record.run_id}
    while record.parent_run is not None and record.parent_run not in seen:
        parent = store.get_run(record.parent_run)
        if parent is None:
            break
        seen.add(parent.run_id)
        record = parent
    return record


def cancel_error(run_id: str, request: Any) -> dict[str, str]:
    """The error of a run stopped by ``storyflow cancel`` (``request``: the ``reason``,
    ``by`` and ``at`` it wrote into the lease)."""
    from storyflow.events import ErrorClass

    reason = request.get("reason") if isinstance(request, dict) else None
    message = "cancelled by storyflow cancel" + (f": {reason}" if reason else "")
    return {"class": ErrorClass.CANCELLED.value, "message": message,
            "hint": f"storyflow resume {run_id} continues it"}


def end_crashed(store: Store, record: RunRecord, exc: BaseException, sink: Any,
                started: float, *, cancel: Any = None) -> Exception | None:
    """Close a run whose process leaves on an error no step caught (a bug, a store that
    fails): it ends ``failed`` (``interrupted`` for a Ctrl-C that got through), never
    ``running`` with no holder, and so do the child runs it was running; ``resume``
    continues it. ``cancel``: the ``storyflow cancel`` request that stopped it (an
    interruption, with its reason: `cancel_error`). Its end event and summary go to
    ``sink``. Best effort: the store may be what failed. Returns the error to report
    instead of a bug's own (None: report ``exc``). A run the store already shows ended
    (the error came after) is left as is."""
    from storyflow.errors import StoryflowError
    from storyflow.events import ErrorClass

    failed = isinstance(exc, Exception)
    bug = failed and not isinstance(exc, StoryflowError)
    message = f"internal error: {type(exc).__name__}: {exc}" if bug else (
        exc.message if isinstance(exc, StoryflowError) else "interrupted")
    report = StoryflowError(
        message, hint=f"the run is recorded as failed; `storyflow resume {record.run_id}` "
        "continues it. Run with --debug for a traceback, and report it") if bug else None
    try:
        stored = store.get_run(record.run_id)
    except Exception:
        stored = None
    if stored is not None and stored.status != RunStatus.RUNNING.value:
        return report
    error = {"class": (ErrorClass.PERMANENT if failed else ErrorClass.CANCELLED).value,
             "message": message, "hint": f"storyflow resume {record.run_id} continues it"}
    if cancel is not None and not failed:
        error = cancel_error(record.run_id, cancel)
    status = (RunStatus.FAILED if failed else RunStatus.INTERRUPTED).value
    prefix = record.run_id + "."
    try:
        children = [r for r in store.list_runs() if r.run_id.startswith(prefix)
                    and r.status == RunStatus.RUNNING.value]
    except Exception:  # the store is what failed: nothing more can be recorded
        children = []
    for rec in (record, *children):
        rec.status, rec.error = status, dict(error)
        rec.ended_at = rec.updated_at = store.clock()
        for keep_outputs in (True, False):
            if not keep_outputs:
                rec.outputs = {}  # perhaps what could not be stored
            try:
                store.put_run(rec)
                break
            except Exception:
                continue
    ended = {"run_id": record.run_id, "status": status, "error": error,
             "duration_s": round(store.clock() - started, 3)}
    try:
        sink({"type": f"run.{status}", "ts": store.clock(), **ended})
        sink({"type": EventType.RUN_SUMMARY.value, "ts": store.clock(), "outputs": {},
              "steps": {}, "run_dir": str(store.run_dir(record.run_id)), **ended})
    except Exception:  # the log or the display is what failed
        pass
    return report
