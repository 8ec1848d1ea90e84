"""The scheduler: runs a plan on asyncio, checkpointing every transition.

A step starts as soon as its needs are met (bounded by ``max_parallel``). Each
transition of a step instance goes through the lifecycle machine and is checkpointed.

Checkpoints and events go through the run's `Journal` (`storyflow.engine.commit`):
committed together once per turn, and before anything awaits. Per step the work is
O(1): counters, not scans.

Ready instances start in the order they became ready, up to ``max_parallel``. With
pools (`storyflow.engine.pools`), an instance whose pool is full or out of tokens is
parked with its pool and the scheduler moves on, so one busy pool never holds up the
others; a pool that can take its oldest parked instance again offers it back, and the
oldest ready instance, parked or not, starts first. Before its first attempt an
instance may be kept or cached (`storyflow.engine.prepare`); what it does then —
retries, breakers, fallbacks — is `storyflow.engine.attempts`; how the run ends,
`storyflow.engine.finish`.

Stopping: a signal (`interrupt`) or the workflow's ``timeout`` cancels the running
attempts (a command's process group is killed) and the ready instances; pending ones
stay pending for ``resume``. A timeout ends the run ``failed`` with class ``timeout``;
each process of a run gets the whole ``timeout`` afresh.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storyflow.engine import lifecycle
from storyflow.engine.attempts import Attempts
from storyflow.engine.commit import Journal, Sink
from storyflow.engine.finish import Result, Stop, finish
from storyflow.engine.instance import OK, Instance, LoopInstance, MapInstance
from storyflow.engine.plan import Node, Plan, digest
from storyflow.engine.pools import Pools
from storyflow.engine.prepare import Prepared, fail_before_start, prepare
from storyflow.engine.scope import Scope
from storyflow.engine.usage import StoreCallCache, Usage
from storyflow.errors import PermanentError, StepFailure
from storyflow.events import ErrorClass, EventType, StepStatus
from storyflow.spec.model import Workflow
from storyflow.store import RunRecord, StepRecord, Store, redact

__all__ = ["Options", "Result", "Runner", "Sink"]


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
    answers: Mapping[str, Any] = field(default_factory=dict)
    """Answers for ``human`` steps by instance id (``resume --answer``), checked already."""
    ask: Callable[[str, str, dict[str, Any]], Awaitable[Any]] | None = None
    """Asks a person on the terminal ``(step, question, schema) -> answer``; None when
    there is no terminal: a ``human`` step then pauses the run."""
    depth: int = 0
    """How many parent runs this run has (a sub-workflow's is 1)."""
    ancestry: tuple[str, ...] = ()
    """Workflow files of the runs above this one, to refuse a workflow that runs itself."""
    no_cache: bool = False
    """Bypass the call cache (``--no-cache``)."""


CURRENT: ContextVar[Runner] = ContextVar("storyflow_runner")
"""The runner whose step is being served: agents that need the engine (``workflow``,
``human``) read it."""


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
        self.opt = options
        self.t = template_engine()
        self.scope = Scope(workflow, run.inputs, run.run_id, options.environ)
        self.insts: dict[str, Instance] = {}
        """Every instance, by id: the plan's steps, then map items as maps expand."""
        for sid in plan.order:
            self.insts[sid] = _instance(plan.nodes[sid])
        self.nested_previous: dict[str, StepRecord] = {}
        """Records of map items and loop iterations from an earlier process of this run
        (resume), read as each map expands and each iteration begins."""
        self.waiting_on = {sid: len(plan.nodes[sid].deps) for sid in plan.order}
        self.queue: deque[Instance] = deque()
        self.fresh: list[Instance] = []
        self.running = 0
        self.seq = 0
        self.unsettled = len(self.insts)
        self.done = asyncio.Event()
        self.stop: Stop | None = None
        self.paused: list[Instance] = []
        """Instances waiting for an answer: they block their dependents until resume."""
        self.workflow_dir = Path(workflow.path).resolve().parent
        self.run_dir = store.run_dir(run.run_id)
        self.secret_values = self._secret_values()
        self.journal = Journal(store, run.run_id, sink, options.clock, self.secret_values)
        # The journal's own bound methods, so `runner.emit` costs no extra call.
        self.emit = self.journal.emit
        self.flush = self.journal.flush
        self.usage = Usage(workflow.config, workflow.budget, run.meta.get("usage"))
        self.scope.base["run"]["usage"] = self.usage.totals  # live: `run.usage.tokens`
        self.call_cache = None if options.no_cache else StoreCallCache(store, run.run_id)
        self.attempts = Attempts(self)
        self.pools = (
            Pools(workflow.pools, options.monotonic, self._pools_ready, self.flush)
            if workflow.pools
            else None
        )

    def move(self, inst: Instance, event: str) -> None:
        lifecycle.step_fire(inst, event)
        self.journal.checkpoint(inst)

    def holds_secret(self, value: Any) -> bool:
        return bool(self.secret_values) and redact(value, self.secret_values) != value

    def _secret_values(self) -> list[str]:
        names = {n for a in self.wf.agents.values() for n in a.secrets}
        return [v for n in names if len(v := self.opt.environ.get(n, "")) >= 4]

    # -- scheduling ------------------------------------------------------------------------
    async def execute(self) -> Result:
        CURRENT.set(self)
        beat = asyncio.ensure_future(self._heartbeat()) if self.opt.heartbeat else None
        deadline = None
        if self.wf.timeout_s is not None:
            deadline = asyncio.get_running_loop().call_later(self.wf.timeout_s, self._time_out)
        try:
            if not self.insts:
                self.done.set()
            # The roots first, all of them: settling one (a skip) may make others ready.
            roots = [sid for sid in self.plan.order if self.waiting_on[sid] == 0]
            for sid in roots:
                self._deps_settled(self.insts[sid])
            self._pump()
            self.journal.schedule_flush()
            await self.done.wait()
        finally:
            if beat is not None:
                beat.cancel()
            if deadline is not None:
                deadline.cancel()
            if self.pools is not None:
                self.pools.close()
            self.flush()
        result = finish(
            self.wf,
            self.insts.values(),
            self.stop,
            paused=self.paused,
            templates=self.t,
            scope=self.scope,
            run_dir=self.run_dir,
            secret_values=self.secret_values,
        )
        result.usage = dict(self.usage.totals)
        return result

    async def _heartbeat(self) -> None:
        assert self.opt.heartbeat is not None
        while True:
            await asyncio.sleep(self.opt.heartbeat_every_s)
            self.opt.heartbeat()

    def interrupt(self, signum: int) -> None:
        """Cancel running steps; ready ones are cancelled, pending ones stay for resume."""
        error = {"class": ErrorClass.CANCELLED.value, "message": "cancelled by a signal"}
        self._halt(Stop("interrupted", error, signum))

    def _time_out(self) -> None:
        if self.done.is_set():
            return  # every step settled just in time
        error = {
            "class": ErrorClass.TIMEOUT.value,
            "message": f"stopped when the run's timeout ({self.wf.timeout_s:g}s) elapsed",
        }
        self._halt(Stop("run timed out", error))

    def _halt(self, stop: Stop) -> None:
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
            elif isinstance(inst, (MapInstance, LoopInstance)) and (
                inst.state == StepStatus.RUNNING.value
            ):
                # Its running parts are cancelled above; those not yet ready stay pending.
                inst.ended_at = self.opt.clock()
                inst.error = dict(stop.error)
                self.move(inst, "cancel")
                self.emit(EventType.STEP_CANCELLED, step=inst.id, reason=stop.reason)
        self.journal.schedule_flush()
        if self.running == 0:
            self.done.set()

    def _pump(self) -> None:
        if self.pools is not None:
            self._pump_pools(self.pools)
        else:
            while self.queue and self.running < self.opt.max_parallel and self.stop is None:
                inst = self.queue.popleft()
                prepared = prepare(self, inst)
                if prepared is None:  # kept, cached or failed here: no task, no slot
                    self._after(inst)
                    continue
                self._launch(inst, prepared)
        # Instances made ready since the last pump that must wait for a slot: make
        # `ready` durable once (amortised O(1): each instance passes here once).
        for inst in self.fresh:
            if inst.task is None and inst.state == StepStatus.READY.value:
                self.journal.checkpoint(inst)
        self.fresh.clear()

    def _launch(self, inst: Instance, prepared: Prepared) -> None:
        self.running += 1
        inst.task = asyncio.ensure_future(self._run_instance(inst, prepared))

    def _pump_pools(self, pools: Pools) -> None:
        """`_pump` when the workflow has pools: the oldest ready instance that can start
        does, parked or not; one that cannot is parked with its pool."""
        while self.running < self.opt.max_parallel and self.stop is None:
            parked = pools.next_seq()
            if self.queue and (parked is None or self.queue[0].seq < parked):
                inst = self.queue.popleft()
                prepared = prepare(self, inst)
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
        self.journal.schedule_flush()

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
                self.journal.schedule_flush()

    def forced(self, inst: Instance) -> bool:
        """Whether ``inst`` must re-run: its top-level step is forced (``--from``, changed)."""
        while inst.parent is not None:
            inst = inst.parent
        return inst.id in self.opt.forced

    def previous_record(self, inst: Instance) -> StepRecord | None:
        """The record of ``inst`` from an earlier process of this run, if any."""
        if inst.parent is None:
            return self.opt.previous.get(inst.id)
        return self.nested_previous.get(inst.id)

    def _deps_settled(self, first: Instance) -> None:
        """All needs of ``first`` have settled: skip it or make it ready (iteratively)."""
        work = deque([first])
        while work:
            inst = work.popleft()
            reason = self._blocked_reason(inst)
            if reason is None and inst.node.step.when is not None:
                try:
                    scope = self.scope.for_step(None, inst.extra)
                    if not self.t.evaluate(inst.node.step.when, scope):
                        reason = "when was false"
                except StepFailure as exc:
                    fail_before_start(self, inst, exc)
                    work.extend(self._settled(inst))
                    continue
            if reason is not None:
                inst.reason = reason
                inst.ended_at = self.opt.clock()
                self.move(inst, "skip")
                self.emit(EventType.STEP_SKIPPED, step=inst.id, reason=reason)
                work.extend(self._settled(inst))
                continue
            if isinstance(inst, MapInstance):
                work.extend(self._expand(inst))
                continue
            if isinstance(inst, LoopInstance):
                work.extend(self._begin_loop(inst))
                continue
            self._enqueue(inst)

    def _enqueue(self, inst: Instance) -> None:
        """Make ``inst`` ready and queue it, numbered in the order it became ready.

        Its `ready` state is checkpointed in `_pump` only if it has to wait for a slot:
        a crash between ready and running is the same as pending, so launching at once
        saves a write.
        """
        inst.ready_at = self.opt.clock()
        inst.seq = self.seq
        self.seq += 1
        lifecycle.step_fire(inst, "ready")
        self.queue.append(inst)
        self.fresh.append(inst)

    def _blocked_reason(self, inst: Instance) -> str | None:
        siblings = inst.parent.current if isinstance(inst.parent, LoopInstance) else self.insts
        deps = [siblings[d] for d in inst.node.deps]
        join = inst.node.step.join
        if join == "all_done" or not deps:
            return None
        ok = [d.state in OK for d in deps]
        if join == "any_succeeded":
            return None if any(ok) else "none of its needs succeeded"
        for d, good in zip(deps, ok, strict=True):
            if not good:
                return f"{d.id} {d.state}"
        return None

    def _settled(self, inst: Instance) -> list[Instance]:
        """Record a finished instance; return dependents whose needs are now all settled."""
        parent = inst.parent
        if isinstance(parent, MapInstance):
            return self._item_settled(inst, parent)
        self.scope.record(
            inst.node.step.id,
            output=inst.output,
            status=inst.state,
            attempts=inst.attempts,
            error=inst.error,
            agent=inst.agent,
            degraded=inst.degraded,
            usage=inst.usage,
        )
        self.unsettled -= 1
        if self.unsettled == 0:
            self.done.set()
        out: list[Instance] = []
        if self.stop is not None:
            return out
        if isinstance(parent, LoopInstance):
            return self._inner_settled(inst, parent)
        for dep_id in inst.node.dependents:
            self.waiting_on[dep_id] -= 1
            if self.waiting_on[dep_id] == 0:
                out.append(self.insts[dep_id])
        return out

    # -- maps ----------------------------------------------------------------------------
    def _expand(self, m: MapInstance) -> list[Instance]:
        """A map whose needs are met and whose ``when`` holds: evaluate ``for_each`` and
        make its first items ready; dependents ready at once if it settled here."""
        step = m.node.step
        m.ready_at = self.opt.clock()
        try:
            scope = self.scope.for_step(None, m.extra)
            fe = step.for_each
            values = self.t.evaluate(fe, scope) if isinstance(fe, str) else self.t.render(fe, scope)
            if not isinstance(values, (list, tuple)):
                raise PermanentError(
                    f"for_each gave {type(values).__name__}, not a list",
                    hint="for_each must be an expression giving a list, or a literal list",
                )
        except StepFailure as exc:
            fail_before_start(self, m, exc)
            return self._settled(m)
        values = list(values)
        m.fingerprint = digest([m.node.fingerprint, values])
        m.attempts = 1
        m.started_at = self.opt.clock()
        as_name = step.as_
        for i, value in enumerate(values):
            item = Instance(m.node)
            item.id = f"{m.id}[{i}]"
            item.parent = m
            item.extra = {**(m.extra or {}), as_name: value, "index": i, "previous": None}
            m.items.append(item)
            self.insts[item.id] = item
        self.unsettled += len(values)
        lifecycle.step_fire(m, "ready")
        self.move(m, "start")
        self.emit(EventType.STEP_STARTED, step=m.id, attempt=m.attempts)
        if not values:
            return self._close_map(m)
        if self.opt.previous and not self.forced(m):
            ids = [item.id for item in m.items]
            self.nested_previous.update(self.store.get_steps(self.run.run_id, ids))
        self._release(m)
        return []

    def _release(self, m: MapInstance) -> None:
        """Make ready the next items of ``m`` its ``max_parallel`` (or order) allows."""
        items, limit = m.items, m.limit
        sequential = m.node.step.sequential
        while m.next < len(items) and (limit is None or m.active < limit):
            item = items[m.next]
            if sequential and m.next:
                assert item.extra is not None
                item.extra["previous"] = items[m.next - 1].output
            m.next += 1
            m.active += 1
            self._enqueue(item)

    def _item_settled(self, item: Instance, m: MapInstance) -> list[Instance]:
        """A map item has settled: release the next, or settle the map after the last."""
        self.unsettled -= 1
        m.active -= 1
        m.settled += 1
        if self.stop is not None or m.state != StepStatus.RUNNING.value:
            return []
        if m.settled == len(m.items):
            return self._close_map(m)
        self._release(m)
        return []

    def _close_map(self, m: MapInstance) -> list[Instance]:
        """Every item of ``m`` has settled: its output is their outputs, in item order;
        it fails if an item did."""
        m.output = [item.output for item in m.items]
        m.ended_at = self.opt.clock()
        duration = round(m.ended_at - (m.started_at or m.ended_at), 6)
        failed = [item for item in m.items if item.state not in OK]
        if not failed:
            self.move(m, "succeed")
            self.emit(
                EventType.STEP_SUCCEEDED, step=m.id, attempt=m.attempts, duration_s=duration
            )
        else:
            first = failed[0].error or {}
            m.error = {
                "class": first.get("class", "permanent"),
                "message": f"{len(failed)} of {len(m.items)} items failed; "
                f"{failed[0].id}: {first.get('message', '')}",
            }
            self.move(m, "fail")
            self.emit(
                EventType.STEP_FAILED,
                step=m.id,
                attempt=m.attempts,
                error=m.error,
                final=True,
                duration_s=duration,
            )
        return self._settled(m)

    # -- loops ---------------------------------------------------------------------------
    def _begin_loop(self, lp: LoopInstance) -> list[Instance]:
        """A loop whose needs are met and whose ``when`` holds: keep it whole when an
        earlier process finished it with the same inputs, else start its first iteration."""
        lp.ready_at = self.opt.clock()
        steps = self.scope.steps
        lp.fingerprint = digest(
            [lp.node.fingerprint, {d: steps[d]["output"] for d in lp.node.deps if d in steps}]
        )
        prev = self.previous_record(lp)
        if (
            prev is not None
            and prev.status in OK
            and prev.fingerprint == lp.fingerprint
            and not self.forced(lp)
            and not prev.meta.get("redacted")
        ):
            lp.output, lp.attempts = prev.output, prev.attempts
            lp.started_at, lp.ended_at = prev.started_at, prev.ended_at
            lp.iteration = int(prev.meta.get("iterations", 0))
            lp.scores = list(prev.meta.get("scores", []))
            lp.history = [{}] * lp.iteration  # only the count matters once it is kept
            lifecycle.step_fire(lp, "ready")
            lifecycle.step_fire(lp, "keep")
            self.emit(EventType.STEP_KEPT, step=lp.id, attempt=lp.attempts)
            return self._settled(lp)
        lp.attempts = 1
        lp.started_at = self.opt.clock()
        lifecycle.step_fire(lp, "ready")
        self.move(lp, "start")
        self.emit(EventType.STEP_STARTED, step=lp.id, attempt=lp.attempts)
        return self._next_iteration(lp)

    def _next_iteration(self, lp: LoopInstance) -> list[Instance]:
        """Make the instances of the loop's next iteration; return those with no needs."""
        body = lp.node.body
        assert body is not None
        lp.iteration += 1
        n = lp.iteration
        previous = lp.history[-1] if lp.history else dict.fromkeys(body.order)
        extra = {**(lp.extra or {}), "loop": {"iteration": n, "previous": previous}}
        lp.current = {}
        for sid in body.order:
            inner = _instance(body.nodes[sid])
            inner.id = f"{lp.id}#{n}.{sid}"
            inner.parent = lp
            inner.extra = extra
            lp.current[sid] = inner
            self.insts[inner.id] = inner
        lp.needs = {sid: len(body.nodes[sid].deps) for sid in body.order}
        lp.left = len(body.order)
        self.unsettled += lp.left
        if self.opt.previous and not self.forced(lp):
            ids = [inner.id for inner in lp.current.values()]
            self.nested_previous.update(self.store.get_steps(self.run.run_id, ids))
        if n > 1:
            self.journal.checkpoint(lp)  # the iteration under way, for `show`
        self.emit(EventType.LOOP_ITERATION, step=lp.id, iteration=n)
        return [lp.current[sid] for sid in body.order if lp.needs[sid] == 0]

    def _inner_settled(self, inst: Instance, lp: LoopInstance) -> list[Instance]:
        """A step of the iteration under way has settled: its dependents in the
        iteration may be ready; after the last, the iteration ends."""
        lp.left -= 1
        out: list[Instance] = []
        for dep_id in inst.node.dependents:
            lp.needs[dep_id] -= 1
            if lp.needs[dep_id] == 0:
                out.append(lp.current[dep_id])
        if lp.left == 0:
            out.extend(self._end_iteration(lp))
        return out

    def _end_iteration(self, lp: LoopInstance) -> list[Instance]:
        """Every step of the iteration has settled: fail, end, or begin the next one."""
        loop = lp.node.step.loop
        assert loop is not None
        n = lp.iteration
        lp.history.append({sid: inner.output for sid, inner in lp.current.items()})
        broken = [
            inner
            for inner in lp.current.values()
            if inner.state == StepStatus.CANCELLED.value
            or (inner.state == StepStatus.FAILED.value and not inner.node.step.allow_failure)
        ]
        if broken:
            err = broken[0].error or {}
            return self._close_loop(
                lp,
                {
                    "class": err.get("class", ErrorClass.PERMANENT.value),
                    "message": f"iteration {n}: step {broken[0].node.step.id} failed: "
                    f"{err.get('message', '')}",
                },
            )
        scope = self.scope.for_step(None, lp.current[next(iter(lp.current))].extra)
        what = "best_by"
        try:
            if loop.best_by is not None:
                lp.scores.append(self.t.evaluate(loop.best_by, scope))
            what = "until"
            done = loop.until is not None and bool(self.t.evaluate(loop.until, scope))
        except StepFailure as exc:
            return self._close_loop(
                lp, {"class": exc.error_class.value, "message": f"{what}: {exc.message}"}
            )
        self.emit(
            EventType.LOOP_ITERATED,
            step=lp.id,
            iteration=n,
            done=done,
            **({"score": lp.scores[-1]} if loop.best_by is not None else {}),
        )
        if done:
            return self._close_loop(lp, None)
        if n >= loop.max_iterations:
            if loop.on_exhausted == "fail":
                cond = f" ({loop.until})" if loop.until else ""
                return self._close_loop(
                    lp,
                    {
                        "class": ErrorClass.PERMANENT.value,
                        "message": f"until{cond} was still false after {n} iterations",
                    },
                )
            return self._close_loop(lp, None)
        return self._next_iteration(lp)

    def _close_loop(self, lp: LoopInstance, error: dict[str, str] | None) -> list[Instance]:
        """Settle the loop: its output is the chosen iteration's outputs by step id."""
        lp.ended_at = self.opt.clock()
        duration = round(lp.ended_at - (lp.started_at or lp.ended_at), 6)
        if error is None:
            lp.output = lp.history[lp.best() - 1]
            self.move(lp, "succeed")
            self.emit(
                EventType.STEP_SUCCEEDED, step=lp.id, attempt=lp.attempts, duration_s=duration
            )
        else:
            lp.output = lp.history[-1] if lp.history else None
            lp.error = error
            self.move(lp, "fail")
            self.emit(
                EventType.STEP_FAILED,
                step=lp.id,
                attempt=lp.attempts,
                error=error,
                final=True,
                duration_s=duration,
            )
        return self._settled(lp)

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

    # -- one instance --------------------------------------------------------------------
    async def _run_instance(self, inst: Instance, prepared: Prepared) -> None:
        try:
            await self.attempts.run(inst, *prepared)
        except asyncio.CancelledError:
            if not StepStatus(inst.state).done:
                stop = self.stop or Stop(
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
            if inst.state == StepStatus.PENDING.value:
                self.paused.append(inst)  # its dependents wait for the answer
            else:
                self._after(inst)
            self._pump()
            self.journal.schedule_flush()
            if self.running == 0 and (self.stop is not None or self._stalled()):
                self.done.set()

    def _stalled(self) -> bool:
        """Nothing runs or can start, yet steps are unsettled: they wait for answers."""
        return bool(self.paused) and not self.queue and (
            self.pools is None or self.pools.next_seq() is None
        )


def _instance(node: Node) -> Instance:
    """The in-memory instance of a plan node: a map, a loop or a plain step."""
    if node.step.loop is not None:
        return LoopInstance(node)
    if node.step.for_each is not None:
        return MapInstance(node)
    return Instance(node)
