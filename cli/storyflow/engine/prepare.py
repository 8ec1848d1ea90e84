"""Before a step instance's first attempt: kept, cached, failed, or ready to be served.

All of it is synchronous, done by the scheduler as it takes a ready instance: the
step's inputs are rendered and fingerprinted; a step that succeeded with the same
fingerprint in an earlier process of the run is *kept* (resume) — no task and no store
write, its record is already there — unless it is forced or its stored output was
redacted. A fork keeps the same way against its parent's records — only what was made
under the fork's seed — and copies each kept record into the new run (``forked_from``).
A ``cache`` step found in the output cache is *cached*; its record keeps the request
it stands for, so a replay can answer it once the cache entry is gone. A step whose
inputs cannot be rendered (or whose ``when`` cannot be evaluated) fails without an
attempt.

A `Preparer` holds only what that takes: the inputs, the executor that decides which
agent object serves a kind, the journal, the output cache and the earlier records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storyflow.engine import lifecycle
from storyflow.engine.attempts import error_record
from storyflow.engine.executors import Executor, agent_for
from storyflow.engine.forking import FROM
from storyflow.engine.inputs import Inputs
from storyflow.engine.instance import OK
from storyflow.engine.plan import digest
from storyflow.engine.replay import request_of
from storyflow.engine.stopping import internal_error
from storyflow.errors import StepFailure
from storyflow.events import EventType, StepStatus
from storyflow.store import descendants

if TYPE_CHECKING:
    from storyflow.engine.commit import Journal
    from storyflow.engine.instance import Instance
    from storyflow.store import StepRecord, Store

Prepared = tuple[Any, dict[str, Any], dict[str, str]]
"""An instance ready for its attempts: the agent, rendered inputs and its secrets."""


@dataclass(frozen=True, slots=True)
class Preparer:
    """Settles what needs no attempt; hands the rest to the scheduler as `Prepared`."""

    inputs: Inputs
    executor: Executor
    journal: Journal
    store: Store
    """For the output cache (``cache: true``)."""
    clock: Callable[[], float]
    previous_record: Callable[[Instance], StepRecord | None]
    """The record of an instance from an earlier process of the run, if any."""
    forced: Callable[[Instance], bool]
    """Whether an instance must re-run (``--from``, a changed definition)."""
    origin: str | None = None
    """The run a fork keeps from. Its records carry the mark `FROM` (the run's own do
    not): a kept instance whose record has it is copied into the run."""

    def prepare(self, inst: Instance) -> Prepared | None:
        """What the attempts of ``inst`` need, or None when it settled here — failed as
        an internal error when preparing it raised something no step failure explains
        (a bug): the scheduler settles it like any other, so the run never waits on an
        instance that can no longer start."""
        try:
            return self._prepare(inst)
        except Exception as exc:  # a bug, not the step's failure: fail the step, say so
            if StepStatus(inst.state).done:  # it settled before the bug struck
                return None
            self.fail_before_start(inst, exc)
            return None

    def _prepare(self, inst: Instance) -> Prepared | None:
        step = inst.node.step
        try:
            inputs, secrets = self.inputs.for_server(inst, step)
            agent = agent_for(self.executor, step.uses or "")
        except StepFailure as exc:
            self.fail_before_start(inst, exc)
            return None
        inst.fingerprint = digest([inst.node.fingerprint, inputs])
        prev = self.previous_record(inst)
        if prev is not None:
            if self.keep(inst, prev) is not None:
                return None
            if FROM not in prev.meta:  # a fork's attempts are its own, not its parent's
                # It runs again: its attempts go on counting from an earlier process's,
                # and so does what they spent.
                inst.attempts = max(inst.attempts, prev.attempts)
                spent = prev.meta.get("usage")
                if inst.usage is None and isinstance(spent, dict):
                    inst.usage = dict(spent)
        if step.cache:
            found, output = self.store.cache_get(inst.fingerprint)
            if found:
                inst.output = output
                # The call it stands for: a replay of this run answers it from here.
                inst.request = request_of(step.uses, inputs, step.output_schema, self._seed)
                inst.ended_at = self.clock()
                self.journal.move(inst, "cache")
                self.journal.emit(EventType.STEP_CACHED, step=inst.id, attempt=inst.attempts)
                return None
        return agent, inputs, secrets

    def keep(self, inst: Instance, prev: StepRecord | None = None) -> StepRecord | None:
        """Settle the ready ``inst`` as kept when an earlier process of the run finished
        it with this fingerprint (and it is not forced, and its output was not
        redacted): no store write, its record already says so. The record kept, else
        None. ``prev``: its earlier record, when the caller has it."""
        if prev is None:
            prev = self.previous_record(inst)
        if (
            prev is None
            or prev.status not in OK
            or prev.fingerprint != inst.fingerprint
            or self.forced(inst)
            or prev.meta.get("redacted")
        ):
            return None
        copies: list[StepRecord] = []
        origin = prev.meta.get(FROM)  # the run a fork keeps this record from, else None
        if origin is not None:
            # A fork keeps only what was made under its own seed (the seed is no part
            # of a fingerprint: a resume keeps what it made under an earlier one).
            if inst.node.step.loop is not None:
                copies = descendants(self.store, origin, prev)
            if any(rec.request is not None and rec.request.get("seed") != self._seed
                   for rec in (prev, *copies)):
                return None
        inst.output, inst.attempts = prev.output, prev.attempts
        inst.started_at, inst.ended_at = prev.started_at, prev.ended_at
        inst.agent, inst.degraded = prev.agent, prev.degraded
        inst.worker = prev.meta.get("worker")
        lifecycle.step_fire(inst, "keep")
        if origin is None:  # its own record from an earlier process: already there
            self.journal.emit(EventType.STEP_KEPT, step=inst.id, attempt=inst.attempts)
            return prev
        # A fork: the parent's record is copied into the new run (the parent is untouched);
        # what it spent was spent by the parent, so the copy carries no usage.
        inst.forked_from, inst.request = origin, prev.request
        self.journal.checkpoint(inst)
        if copies:  # a loop is kept whole: its iterations too, with no usage either
            for rec in copies:
                rec.forked_from = origin
                rec.meta.pop("usage", None)
            self.journal.copy(copies)
        self.journal.emit(EventType.STEP_KEPT, step=inst.id, attempt=inst.attempts,
                          forked_from=origin)
        return prev

    @property
    def _seed(self) -> Any:
        """The run's seed (every request records it)."""
        return self.inputs.scope.base["run"]["seed"]

    def fail_before_start(self, inst: Instance, exc: Exception) -> None:
        """Settle ``inst`` as failed without an attempt: by ``exc``, a step failure, or
        an internal error when ``exc`` is anything else (a bug in storyflow)."""
        inst.error = error_record(exc) if isinstance(exc, StepFailure) else internal_error(exc)
        inst.ended_at = self.clock()
        if inst.state == StepStatus.PENDING.value:
            self.journal.move(inst, "ready")
        self.journal.move(inst, "fail")
        self.journal.emit(
            EventType.STEP_FAILED, step=inst.id, attempt=inst.attempts, error=inst.error,
            final=True,
        )
