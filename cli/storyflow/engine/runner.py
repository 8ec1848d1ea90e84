"""The scheduler: runs a plan on asyncio, checkpointing every transition.

A step starts as soon as its needs are met (bounded by ``max_parallel``). Each
transition of a step instance goes through the lifecycle machine and is checkpointed.

Group commit: the checkpoints and events of one synchronous turn of the event loop
are buffered and committed together — store first, then events, so a crash never
leaves an event that the store does not back. A flush happens before anything
awaits an agent or a retry delay, and right after any step settles (``call_soon``),
so a step's success is durable before any dependent's agent runs, and a crash loses
at most the attempts in flight. A chain of steps pays one transaction per step.
Per step the work is O(1): counters, not scans.

Ready instances start in the order they became ready, up to ``max_parallel``. With
pools (`storyflow.engine.pools`), an instance whose pool is full or out of tokens is
parked with its pool and the scheduler moves on, so one busy pool never holds up the
others; a pool that can take its oldest parked instance again offers it back, and the
oldest ready instance, parked or not, starts first. What one instance does — retries,
breakers, fallbacks — is `storyflow.engine.attempts`.

Stopping: a signal (`interrupt`) or the workflow's ``timeout`` cancels the running
attempts (a command's process group is killed) and the ready instances; pending ones
stay pending for ``resume``. A timeout ends the run ``failed`` with class ``timeout``;
each process of a run gets the whole ``timeout`` afresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storyflow.engine import lifecycle
from storyflow.engine.attempts import Attempts, Server, error_record
from storyflow.engine.plan import Node, Plan, digest
from storyflow.engine.pools import Pool, Pools
from storyflow.engine.scope import Scope
from storyflow.errors import PermanentError, StepFailure
from storyflow.events import ErrorClass, EventType, RunStatus, StepStatus
from storyflow.spec.model import Workflow
from storyflow.store import RunRecord, StepRecord, Store, redact

Sink = Callable[[dict[str, Any]], None]
_Prepared = tuple[Any, dict[str, Any], dict[str, str]]
"""An instance ready for its attempts: the agent, rendered inputs and its secrets."""
_OK = (StepStatus.SUCCEEDED.value, StepStatus.CACHED.value)


@dataclass
class Options:
    """How a run executes; clocks, sleep and randomness are injected for tests."""

    max_parallel: int = 8
    forced: frozenset[str] = frozenset()
    """Steps that re-run even if a previous attempt succeeded (``--from`` and downstream)."""
    previous: Mapping[str, StepRecord] = field(default_factory=dict)
    """Records of an earlier process of this run (resume)."""
    clock: Callable[[], float] = time.time
    """Wall-clock epoch seconds, for records and events."""
    monotonic: Callable[[], float] = time.monotonic
    """For breaker cooldowns and pool rates."""
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    """Waits out a retry delay."""
    rand: Callable[[], float] = random.random
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    heartbeat: Callable[[], None] | None = None
    heartbeat_every_s: float = 5.0


@dataclass(frozen=True, slots=True)
class _Stop:
    """Why the run is stopping before every step has settled."""

    reason: str
    """The ``reason`` of the ``step.cancelled`` events."""
    error: dict[str, str]
    """The error recorded on each cancelled instance."""
    signum: int | None = None
    """The signal, for an interruption; None for the run's timeout."""


class Instance:
    """One step instance in memory; ``state`` is driven by the lifecycle machine."""

    __slots__ = (
        "agent",
        "attempts",
        "degraded",
        "ended_at",
        "error",
        "fingerprint",
        "grant",
        "id",
        "node",
        "output",
        "ready_at",
        "reason",
        "seq",
        "slot",
        "started_at",
        "state",
        "task",
    )

    def __init__(self, node: Node) -> None:
        self.id = node.step.id
        self.node = node
        self.state = StepStatus.PENDING.value
        self.attempts = 0
        self.output: Any = None
        self.error: dict[str, str] | None = None
        self.fingerprint: str | None = None
        self.ready_at: float | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.agent: str | None = node.step.agent
        self.degraded = False
        self.reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.seq = 0
        """Order in which instances became ready."""
        self.slot: Pool | None = None
        """The pool whose slot this instance holds."""
        self.grant: Pool | None = None
        """The pool the scheduler took a slot and a token from for the first attempt."""

    def record(self, definition: str) -> StepRecord:
        return StepRecord(
            id=self.id,
            status=self.state,
            attempts=self.attempts,
            fingerprint=self.fingerprint,
            output=self.output,
            error=self.error,
            ready_at=self.ready_at,
            started_at=self.started_at,
            ended_at=self.ended_at,
            agent=self.agent,
            degraded=self.degraded,
            meta={"def": definition},
        )


@dataclass
class Result:
    """How a run ended."""

    status: RunStatus
    outputs: dict[str, Any]
    error: dict[str, str] | None
    counts: dict[str, int]


class Runner:
    """Executes one run of a workflow; `execute` returns when every step has settled."""

    def __init__(
        self,
        workflow: Workflow,
        plan: Plan,
        store: Store,
        run: RunRecord,
        sink: Sink,
        options: Options,
    ) -> None:
        from storyflow.spec import template_engine

        self.wf = workflow
        self.plan = plan
        self.store = store
        self.run = run
        self.sink = sink
        self.opt = options
        self.t = template_engine()
        self.scope = Scope(workflow, run.inputs, run.run_id, options.environ)
        self.insts = {sid: Instance(plan.nodes[sid]) for sid in plan.order}
        self.waiting_on = {sid: len(plan.nodes[sid].deps) for sid in plan.order}
        self.queue: deque[Instance] = deque()
        self.fresh: list[Instance] = []
        self.running = 0
        self.seq = 0
        self.unsettled = len(self.insts)
        self.done = asyncio.Event()
        self.stop: _Stop | None = None
        self.workflow_dir = Path(workflow.path).resolve().parent
        self.run_dir = store.run_dir(run.run_id)
        self.secret_values = self._secret_values()
        self.attempts = Attempts(self)
        self.pools = (
            Pools(workflow.pools, options.monotonic, self._pools_ready, self.flush)
            if workflow.pools
            else None
        )
        self.dirty: dict[str, StepRecord] = {}
        self.pending_events: list[dict[str, Any]] = []
        self.flush_handle: asyncio.Handle | None = None

    # -- events and checkpoints ----------------------------------------------------------
    def emit(self, type_: EventType, **fields: Any) -> None:
        event = {"type": type_.value, "run_id": self.run.run_id, "ts": self.opt.clock(), **fields}
        if self.secret_values:
            event = redact(event, self.secret_values)
        if self.dirty:
            self.pending_events.append(event)  # after the checkpoint that backs it
        else:
            self.sink(event)

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
        self.dirty[inst.id] = rec

    def schedule_flush(self) -> None:
        """Flush once the tasks launched in this turn have taken their first step.

        Called at the end of a turn, after `_pump`: the new tasks' first steps are
        already queued, so they run first and their `start` checkpoints join the same
        transaction (they flush before awaiting their agent anyway).
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
            self.store.put_steps(self.run.run_id, records)
        if self.pending_events:
            events = self.pending_events
            self.pending_events = []
            for event in events:
                self.sink(event)

    def move(self, inst: Instance, event: str) -> None:
        lifecycle.step_fire(inst, event)
        self.checkpoint(inst)

    def holds_secret(self, value: Any) -> bool:
        return bool(self.secret_values) and redact(value, self.secret_values) != value

    def _secret_values(self) -> list[str]:
        names = {n for a in self.wf.agents.values() for n in a.secrets}
        return [v for n in names if len(v := self.opt.environ.get(n, "")) >= 4]

    # -- scheduling ------------------------------------------------------------------------
    async def execute(self) -> Result:
        started = self.opt.clock()
        beat = asyncio.ensure_future(self._heartbeat()) if self.opt.heartbeat else None
        deadline = None
        if self.wf.timeout_s is not None:
            deadline = asyncio.get_running_loop().call_later(self.wf.timeout_s, self._time_out)
        try:
            if not self.insts:
                self.done.set()
            for sid in self.plan.order:
                if self.waiting_on[sid] == 0:
                    self._deps_settled(self.insts[sid])
            self._pump()
            self.schedule_flush()
            await self.done.wait()
        finally:
            if beat is not None:
                beat.cancel()
            if deadline is not None:
                deadline.cancel()
            if self.pools is not None:
                self.pools.close()
            self.flush()
        return self._finish(self.opt.clock() - started)

    async def _heartbeat(self) -> None:
        assert self.opt.heartbeat is not None
        while True:
            await asyncio.sleep(self.opt.heartbeat_every_s)
            self.opt.heartbeat()

    def interrupt(self, signum: int) -> None:
        """Cancel running steps; ready ones are cancelled, pending ones stay for resume."""
        error = {"class": ErrorClass.CANCELLED.value, "message": "cancelled by a signal"}
        self._halt(_Stop("interrupted", error, signum))

    def _time_out(self) -> None:
        if self.done.is_set():
            return  # every step settled just in time
        error = {
            "class": ErrorClass.TIMEOUT.value,
            "message": f"stopped when the run's timeout ({self.wf.timeout_s:g}s) elapsed",
        }
        self._halt(_Stop("run timed out", error))

    def _halt(self, stop: _Stop) -> None:
        if self.stop is not None:
            return
        self.stop = stop
        while self.queue:
            inst = self.queue.popleft()
            self._settle_cancelled(inst)
        if self.pools is not None:
            for inst, _ in self.pools.drain():
                self._settle_cancelled(inst)
        for inst in self.insts.values():
            if inst.task is not None and not inst.task.done():
                inst.task.cancel()
        self.schedule_flush()
        if self.running == 0:
            self.done.set()

    def _pump(self) -> None:
        if self.pools is not None:
            self._pump_pools(self.pools)
        else:
            while self.queue and self.running < self.opt.max_parallel and self.stop is None:
                inst = self.queue.popleft()
                prepared = self._prepare(inst)
                if prepared is None:  # kept, cached or failed here: no task, no slot
                    self._after(inst)
                    continue
                self._launch(inst, prepared)
        # Instances made ready since the last pump that must wait for a slot: make
        # `ready` durable once (amortised O(1): each instance passes here once).
        for inst in self.fresh:
            if inst.task is None and inst.state == StepStatus.READY.value:
                self.checkpoint(inst)
        self.fresh.clear()

    def _launch(self, inst: Instance, prepared: _Prepared) -> None:
        self.running += 1
        inst.task = asyncio.ensure_future(self._run_instance(inst, prepared))

    def _pump_pools(self, pools: Pools) -> None:
        """`_pump` when the workflow has pools: the oldest ready instance that can start
        does, parked or not; one that cannot is parked with its pool."""
        while self.running < self.opt.max_parallel and self.stop is None:
            parked = pools.next_seq()
            if self.queue and (parked is None or self.queue[0].seq < parked):
                inst = self.queue.popleft()
                prepared = self._prepare(inst)
                if prepared is None:
                    self._after(inst)
                    continue
                pool = pools.get(self.attempts.entry_pool(inst))
                if pool is not None:
                    if not pools.admits_now(pool):
                        pools.park(pool, inst.seq, (inst, prepared))
                        continue
                    pools.take(pool)
                    inst.slot = inst.grant = pool
                self._launch(inst, prepared)
            elif parked is not None:
                (inst, prepared), pool = pools.pop()
                inst.slot = inst.grant = pool
                self._launch(inst, prepared)
            else:
                return

    def _pools_ready(self) -> None:
        """A pool can take a parked instance again (called from its timer)."""
        self._pump()
        self.schedule_flush()

    async def pool_for(self, inst: Instance, name: str | None) -> None:
        """Hold what the next attempt needs from pool ``name`` (a slot and a token)."""
        assert self.pools is not None
        pool = self.pools.get(name)
        grant, inst.grant = inst.grant, None
        if grant is not None and grant is pool:
            return  # the scheduler took both for this attempt
        if inst.slot is not pool:
            self.release_slot(inst)
            if pool is not None:
                await self.pools.acquire(pool, slot=True)
                inst.slot = pool
        elif pool is not None and pool.bucket is not None:
            await self.pools.acquire(pool, slot=False)  # the slot is held: a token

    def release_slot(self, inst: Instance, *, pump: bool = True) -> None:
        """Give back the pool slot ``inst`` holds; a parked instance may start (``pump``)."""
        if inst.slot is not None and self.pools is not None:
            slot, inst.slot, inst.grant = inst.slot, None, None
            self.pools.release(slot)
            if pump and slot.waiting:
                self._pump()
                self.schedule_flush()

    def _deps_settled(self, first: Instance) -> None:
        """All needs of ``first`` have settled: skip it or make it ready (iteratively)."""
        work = deque([first])
        while work:
            inst = work.popleft()
            reason = self._blocked_reason(inst)
            if reason is None and inst.node.step.when is not None:
                try:
                    if not self.t.evaluate(inst.node.step.when, self.scope.for_step()):
                        reason = "when was false"
                except StepFailure as exc:
                    self._fail_before_start(inst, exc)
                    work.extend(self._settled(inst))
                    continue
            if reason is not None:
                inst.reason = reason
                inst.ended_at = self.opt.clock()
                self.move(inst, "skip")
                self.emit(EventType.STEP_SKIPPED, step=inst.id, reason=reason)
                work.extend(self._settled(inst))
                continue
            inst.ready_at = self.opt.clock()
            inst.seq = self.seq
            self.seq += 1
            # Checkpointed in _pump only if it has to wait for a slot: a crash between
            # ready and running is the same as pending, so launching at once saves a write.
            lifecycle.step_fire(inst, "ready")
            self.queue.append(inst)
            self.fresh.append(inst)

    def _blocked_reason(self, inst: Instance) -> str | None:
        deps = [self.insts[d] for d in inst.node.deps]
        join = inst.node.step.join
        if join == "all_done" or not deps:
            return None
        ok = [d.state in _OK for d in deps]
        if join == "any_succeeded":
            return None if any(ok) else "none of its needs succeeded"
        for d, good in zip(deps, ok, strict=True):
            if not good:
                return f"{d.id} {d.state}"
        return None

    def _settled(self, inst: Instance) -> list[Instance]:
        """Record a finished instance; return dependents whose needs are now all settled."""
        self.scope.record(
            inst.id,
            output=inst.output,
            status=inst.state,
            attempts=inst.attempts,
            error=inst.error,
            agent=inst.agent,
            degraded=inst.degraded,
        )
        self.unsettled -= 1
        if self.unsettled == 0:
            self.done.set()
        out: list[Instance] = []
        if self.stop is not None:
            return out
        for dep_id in inst.node.dependents:
            self.waiting_on[dep_id] -= 1
            if self.waiting_on[dep_id] == 0:
                out.append(self.insts[dep_id])
        return out

    def _after(self, inst: Instance) -> None:
        ready = self._settled(inst)
        for nxt in ready:
            self._deps_settled(nxt)

    def _settle_cancelled(self, inst: Instance) -> None:
        assert self.stop is not None
        inst.ended_at = self.opt.clock()
        inst.error = dict(self.stop.error)
        self.move(inst, "cancel")
        self.emit(EventType.STEP_CANCELLED, step=inst.id, reason=self.stop.reason)
        self._settled(inst)

    def _fail_before_start(self, inst: Instance, exc: StepFailure) -> None:
        inst.error = error_record(exc)
        inst.ended_at = self.opt.clock()
        if inst.state == StepStatus.PENDING.value:
            self.move(inst, "ready")
        self.move(inst, "fail")
        self.emit(
            EventType.STEP_FAILED, step=inst.id, attempt=inst.attempts, error=inst.error, final=True
        )

    # -- one instance --------------------------------------------------------------------
    async def _run_instance(self, inst: Instance, prepared: _Prepared) -> None:
        try:
            await self.attempts.run(inst, *prepared)
        except asyncio.CancelledError:
            if not StepStatus(inst.state).done:
                stop = self.stop or _Stop(
                    "interrupted",
                    {"class": ErrorClass.CANCELLED.value, "message": "cancelled by a signal"},
                )
                inst.ended_at = self.opt.clock()
                inst.error = dict(stop.error)
                inst.degraded = False
                self.move(inst, "cancel")
                self.emit(
                    EventType.STEP_CANCELLED,
                    step=inst.id,
                    attempt=inst.attempts,
                    reason=stop.reason,
                )
        finally:
            self.running -= 1
            self.release_slot(inst, pump=False)  # the pump below starts what it can
            self._after(inst)
            self._pump()
            self.schedule_flush()
            if self.stop is not None and self.running == 0:
                self.done.set()

    def inputs_for(
        self, inst: Instance, server: Server
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The rendered ``with`` (and ``prompt``) of a server of ``inst``, and its secrets."""
        step = inst.node.step
        agent = self.wf.agents.get(server.agent) if server.agent else None
        secrets = {}
        for name in agent.secrets if agent else ():
            value = self.opt.environ.get(name)
            if value is None:
                raise PermanentError(
                    f"secret {name} is not set", hint=f"export {name}=... before running"
                )
            secrets[name] = value
        scope = self.scope.for_step(secrets)
        inputs = self.t.render(server.with_, scope) if server.with_ else {}
        if step.prompt is not None:
            inputs["prompt"] = self.t.render(step.prompt, scope)
        return inputs, secrets

    def _prepare(self, inst: Instance) -> _Prepared | None:
        """The synchronous part before any attempt: render, fingerprint, keep or cache.

        Returns what the attempts need, or None when the instance settled here: a kept
        step (resume) costs no task and no store write — its record is already there.
        """
        from storyflow.agents import registry

        step = inst.node.step
        try:
            if step.kind != "task":
                raise PermanentError(
                    f"{'for_each' if step.kind == 'map' else 'loop'} steps "
                    "are not available in this version of storyflow"
                )
            inputs, secrets = self.inputs_for(inst, step)
            agent = registry.get(step.uses or "")
        except StepFailure as exc:
            self._fail_before_start(inst, exc)
            return None
        inst.fingerprint = digest([inst.node.fingerprint, inputs])
        prev = self.opt.previous.get(inst.id)
        if (
            prev is not None
            and prev.status in _OK
            and prev.fingerprint == inst.fingerprint
            and inst.id not in self.opt.forced
            and not prev.meta.get("redacted")
        ):
            inst.output, inst.attempts = prev.output, prev.attempts
            inst.started_at, inst.ended_at = prev.started_at, prev.ended_at
            inst.agent, inst.degraded = prev.agent, prev.degraded
            lifecycle.step_fire(inst, "keep")  # the stored record already says so
            self.emit(EventType.STEP_KEPT, step=inst.id, attempt=inst.attempts)
            return None
        if step.cache:
            found, output = self.store.cache_get(inst.fingerprint)
            if found:
                inst.output = output
                inst.ended_at = self.opt.clock()
                self.move(inst, "cache")
                self.emit(EventType.STEP_CACHED, step=inst.id, attempt=inst.attempts)
                return None
        return agent, inputs, secrets

    # -- the end ---------------------------------------------------------------------------
    def _finish(self, duration_s: float) -> Result:
        counts: dict[str, int] = {}
        failed = []
        for inst in self.insts.values():
            counts[inst.state] = counts.get(inst.state, 0) + 1
            if inst.state == StepStatus.FAILED.value and not inst.node.step.allow_failure:
                failed.append(inst)
        if self.stop is not None and self.stop.signum is not None:
            return Result(RunStatus.INTERRUPTED, {}, None, counts)
        if self.stop is not None:
            error = {
                "class": ErrorClass.TIMEOUT.value,
                "message": f"run timed out after {self.wf.timeout_s:g}s",
            }
            return Result(RunStatus.FAILED, {}, error, counts)
        if failed:
            first = failed[0]
            err = {
                "class": (first.error or {}).get("class", "permanent"),
                "message": f"step {first.id} failed: {(first.error or {}).get('message', '')}",
            }
            return Result(RunStatus.FAILED, {}, err, counts)
        try:
            scope = self.scope.for_step()
            outputs = {k: self.t.render(v, scope) for k, v in self.wf.outputs.items()}
            self._write_artifacts(scope)
        except StepFailure as exc:
            return Result(
                RunStatus.FAILED,
                {},
                {"class": exc.error_class.value, "message": exc.message},
                counts,
            )
        if self.secret_values:
            outputs = redact(outputs, self.secret_values)
        return Result(RunStatus.SUCCEEDED, outputs, None, counts)

    def _write_artifacts(self, scope: dict[str, Any]) -> None:
        root = self.run_dir.resolve()
        for rel, template in self.wf.artifacts.items():
            target = (root / rel).resolve()
            if not target.is_relative_to(root) or target == root:
                raise PermanentError(
                    f"artifact {rel!r} would be written outside the run folder",
                    hint="use a relative path without '..'",
                )
            value = self.t.render(template, scope)
            text = (
                value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
            )
            if self.secret_values:
                text = redact(text, self.secret_values)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
