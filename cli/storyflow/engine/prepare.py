"""Before a step instance's first attempt: kept, cached, failed, or ready to be served.

All of it is synchronous, done by the scheduler as it takes a ready instance: the
step's inputs are rendered and fingerprinted; a step that succeeded with the same
fingerprint in an earlier process of the run is *kept* (resume) — no task and no store
write, its record is already there — unless it is forced or its stored output was
redacted; a ``cache`` step found in the output cache is *cached*. A step whose inputs
cannot be rendered (or whose ``when`` cannot be evaluated) fails without an attempt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storyflow.engine import lifecycle
from storyflow.engine.attempts import error_record
from storyflow.engine.instance import OK
from storyflow.engine.plan import digest
from storyflow.errors import StepFailure
from storyflow.events import EventType, StepStatus

if TYPE_CHECKING:
    from storyflow.engine.instance import Instance
    from storyflow.engine.runner import Runner
    from storyflow.store import StepRecord

Prepared = tuple[Any, dict[str, Any], dict[str, str]]
"""An instance ready for its attempts: the agent, rendered inputs and its secrets."""


def prepare(r: Runner, inst: Instance) -> Prepared | None:
    """What the attempts of ``inst`` need, or None when it settled here."""
    step = inst.node.step
    try:
        inputs, secrets = r.attempts.inputs_for(inst, step)
        agent = r.attempts.agent_for(step.uses or "")
    except StepFailure as exc:
        fail_before_start(r, inst, exc)
        return None
    inst.fingerprint = digest([inst.node.fingerprint, inputs])
    if keep(r, inst) is not None:
        return None
    if step.cache:
        found, output = r.store.cache_get(inst.fingerprint)
        if found:
            inst.output = output
            inst.ended_at = r.opt.clock()
            r.move(inst, "cache")
            r.emit(EventType.STEP_CACHED, step=inst.id, attempt=inst.attempts)
            return None
    return agent, inputs, secrets


def keep(r: Runner, inst: Instance) -> StepRecord | None:
    """Settle the ready ``inst`` as kept when an earlier process of the run finished it
    with this fingerprint (and it is not forced, and its output was not redacted): no
    store write, its record already says so. The record kept, else None."""
    prev = r.previous_record(inst)
    if (
        prev is None
        or prev.status not in OK
        or prev.fingerprint != inst.fingerprint
        or r.forced(inst)
        or prev.meta.get("redacted")
    ):
        return None
    inst.output, inst.attempts = prev.output, prev.attempts
    inst.started_at, inst.ended_at = prev.started_at, prev.ended_at
    inst.agent, inst.degraded = prev.agent, prev.degraded
    lifecycle.step_fire(inst, "keep")
    r.emit(EventType.STEP_KEPT, step=inst.id, attempt=inst.attempts)
    return prev


def fail_before_start(r: Runner, inst: Instance, exc: StepFailure) -> None:
    """Settle ``inst`` as failed without an attempt."""
    inst.error = error_record(exc)
    inst.ended_at = r.opt.clock()
    if inst.state == StepStatus.PENDING.value:
        r.move(inst, "ready")
    r.move(inst, "fail")
    r.emit(
        EventType.STEP_FAILED, step=inst.id, attempt=inst.attempts, error=inst.error, final=True
    )
