"""Lifecycle state machines for runs, step instances and breakers. The only transitions importer.

One `transitions.Machine` per kind is built once per process and drives every
instance through its events directly (``Event.trigger(instance)``), so no instance
is ever registered with the machine: registering costs ~110 µs and ~60 KiB per
model, a direct trigger ~12 µs. There are no auto-transitions, so an illegal move
(say, ``succeed`` from ``pending``) raises `IllegalTransition` by construction.

    pending ─ready→ ready ─start→ running ─succeed→ succeeded
       │              │  ╲cache→ cached     │ ╲fail→ failed
       │              │  ╲keep→ succeeded   ╰─retry→ retrying ─start→ running
       ╰─skip─────────┴──→ skipped      (any unfinished) ─cancel→ cancelled

An agent's circuit breaker (`storyflow.engine.breaker`) is the third kind:

    closed ─trip→ open ─probe→ half_open ─close→ closed
                   ↑                │
                   ╰──────trip──────╯
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from storyflow.events import BreakerState, RunStatus, StepStatus

_S = StepStatus
STEP_TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "ready", "source": _S.PENDING.value, "dest": _S.READY.value},
    {"trigger": "start", "source": [_S.READY.value, _S.RETRYING.value], "dest": _S.RUNNING.value},
    {"trigger": "succeed", "source": _S.RUNNING.value, "dest": _S.SUCCEEDED.value},
    {"trigger": "fail", "source": [_S.RUNNING.value, _S.READY.value], "dest": _S.FAILED.value},
    {"trigger": "retry", "source": _S.RUNNING.value, "dest": _S.RETRYING.value},
    {"trigger": "cache", "source": _S.READY.value, "dest": _S.CACHED.value},
    {"trigger": "keep", "source": _S.READY.value, "dest": _S.SUCCEEDED.value},
    {"trigger": "skip", "source": [_S.PENDING.value, _S.READY.value], "dest": _S.SKIPPED.value},
    # A `human` step with no answer yet: back to pending, asked again on resume.
    {"trigger": "pause", "source": _S.RUNNING.value, "dest": _S.PENDING.value},
    {
        "trigger": "cancel",
        "source": [_S.PENDING.value, _S.READY.value, _S.RUNNING.value, _S.RETRYING.value],
        "dest": _S.CANCELLED.value,
    },
]

_R = RunStatus
RUN_TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "succeed", "source": _R.RUNNING.value, "dest": _R.SUCCEEDED.value},
    {"trigger": "fail", "source": _R.RUNNING.value, "dest": _R.FAILED.value},
    {"trigger": "interrupt", "source": _R.RUNNING.value, "dest": _R.INTERRUPTED.value},
    {"trigger": "wait", "source": _R.RUNNING.value, "dest": _R.WAITING.value},
    {
        "trigger": "resume",
        "source": [
            _R.FAILED.value,
            _R.INTERRUPTED.value,
            _R.WAITING.value,
            _R.RUNNING.value,
            _R.SUCCEEDED.value,
        ],
        "dest": _R.RUNNING.value,
    },
]


_B = BreakerState
BREAKER_TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "trip", "source": [_B.CLOSED.value, _B.HALF_OPEN.value], "dest": _B.OPEN.value},
    {"trigger": "probe", "source": _B.OPEN.value, "dest": _B.HALF_OPEN.value},
    {"trigger": "close", "source": _B.HALF_OPEN.value, "dest": _B.CLOSED.value},
]


class IllegalTransition(RuntimeError):
    """An event was triggered from a state that does not allow it (a bug, never user input)."""


@cache
def _machine(kind: str) -> Any:
    from transitions import Machine

    # transitions logs every transition at INFO; that alone makes them ~4.6x dearer.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    if kind == "step":
        states, table, initial = [s.value for s in StepStatus], STEP_TRANSITIONS, "pending"
    elif kind == "breaker":
        states, table, initial = [s.value for s in BreakerState], BREAKER_TRANSITIONS, "closed"
    else:
        states, table, initial = [s.value for s in RunStatus], RUN_TRANSITIONS, "running"
    return Machine(
        model=None,
        states=states,
        transitions=table,
        initial=initial,
        auto_transitions=False,
        model_attribute="state",
    )


@cache
def _events(kind: str) -> dict[str, Any]:
    return dict(_machine(kind).events)


def fire(kind: str, obj: Any, event: str) -> str:
    """Move ``obj`` (anything with a ``state`` attribute) by ``event``; returns the new state."""
    from transitions import MachineError

    try:
        _events(kind)[event].trigger(obj)
    except MachineError as exc:
        raise IllegalTransition(f"{kind} {getattr(obj, 'id', '?')}: {exc.value}") from exc
    state: str = obj.state
    return state


def step_fire(obj: Any, event: str) -> str:
    """`fire` for step instances (the hot path: one dict lookup, one trigger)."""
    return fire("step", obj, event)


def run_fire(obj: Any, event: str) -> str:
    return fire("run", obj, event)


class RunLife:
    """A run's lifecycle in this process: `running`, or re-entered from where it stopped."""

    __slots__ = ("id", "state")

    def __init__(self, resumed_from: str | None = None, run_id: str = "") -> None:
        self.id = run_id
        self.state = resumed_from or RunStatus.RUNNING.value
        if resumed_from is not None:
            run_fire(self, "resume")
