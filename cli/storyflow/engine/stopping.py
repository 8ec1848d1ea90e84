"""How a step instance ends early: cancelled by a stop (a signal, the run's timeout), or
failed by a bug in the engine itself — settled, checkpointed and announced either way.

Each function takes the journal and the clock, nothing of the scheduler.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

from storyflow.engine.finish import Stop
from storyflow.events import ErrorClass, EventType, StepStatus

if TYPE_CHECKING:
    from storyflow.engine.commit import Journal
    from storyflow.engine.instance import Instance

INTERRUPTED = Stop(
    "interrupted", {"class": ErrorClass.CANCELLED.value, "message": "cancelled by a signal"}
)
"""The stop of an attempt cancelled from outside the run (its parent stopping)."""


def cancelled(journal: Journal, clock: Callable[[], float], inst: Instance,
              stop: Stop, *, attempt: bool = True) -> None:
    """Settle ``inst`` as cancelled by ``stop`` (unless it settled already)."""
    if StepStatus(inst.state).done:
        return
    inst.ended_at = clock()
    inst.error = dict(stop.error)
    inst.degraded = False
    journal.move(inst, "cancel")
    if attempt:
        journal.emit(EventType.STEP_CANCELLED, step=inst.id, attempt=inst.attempts,
                     reason=stop.reason)
    else:
        journal.emit(EventType.STEP_CANCELLED, step=inst.id, reason=stop.reason)


def internal_error(exc: BaseException) -> dict[str, str]:
    """The error record of a step failed by a bug in storyflow, not by its own failure."""
    return {
        "class": ErrorClass.PERMANENT.value,
        "message": f"internal error: {type(exc).__name__}: {exc}",
        "hint": "run again with --debug for a traceback, and report it",
    }


def broken(journal: Journal, clock: Callable[[], float], inst: Instance,
           exc: Exception) -> None:
    """Fail ``inst`` for an exception that is a bug, not the step's failure, saying so."""
    if StepStatus(inst.state).done:
        return
    inst.ended_at = clock()
    inst.error = internal_error(exc)
    inst.degraded = False
    if inst.state == StepStatus.RETRYING.value:
        journal.move(inst, "start")
    journal.move(inst, "fail")
    journal.emit(EventType.STEP_FAILED, step=inst.id, attempt=inst.attempts,
                 error=inst.error, final=True)


def cancel_task(task: asyncio.Task[None]) -> None:
    """Cancel an instance's task. One launched in this very turn has not taken its first
    step: cancelled now it would never run its body — its `finally` that settles the
    instance included — and the run would wait for it for ever. It is cancelled next
    turn, once started (its first step is already queued, so it runs first)."""
    coro = task.get_coro()
    if inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
        asyncio.get_running_loop().call_soon(task.cancel)
    else:
        task.cancel()
