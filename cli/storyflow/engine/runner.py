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
retries, breakers, fallbacks — is `storyflow.engine.attempts`, which hands each attempt
to the agent object the executor chose (`storyflow.engine.executors`: this process, or
a Dask worker); how the run ends, `storyflow.engine.finish`. Those helpers get the
narrow things they need (`Preparer`, `Serving`), never the runner. Maps and loops are
`storyflow.engine.maps` and `storyflow.engine.loops`, parts of the scheduler that work
on its instance table and counters; a step paused for an answer
(`storyflow.engine.human`) stays unsettled, and the run ends once nothing else can run.

Stopping (`storyflow.engine.stopping`): a signal (`interrupt`) or the workflow's
``timeout`` cancels the running attempts (a command's process group is killed) and the
ready instances; pending ones stay pending for ``resume``. A timeout ends the run
``failed`` with class ``timeout``; each process of a run gets the whole ``timeout``
afresh.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextvars import ContextVar
from pathlib import Path

from storyflow.engine import lifecycle
from storyflow.engine.attempts import Attempts, Serving, error_record
from storyflow.engine.commit import Journal, Sink
from storyflow.engine.finish import Result, Stop, finish, not_started
from storyflow.engine.inputs import Inputs
from storyflow.engine.instance import (
    Instance,
    LoopInstance,
    MapInstance,
    blocked_reason,
    new_instance,
)
from storyflow.engine.loops import Loops
from storyflow.engine.maps import Maps
from storyflow.engine.options import Options
from storyflow.engine.plan import Plan
from storyflow.engine.pools import Pools, Slots
from storyflow.engine.prepare import Prepared, Preparer
from storyflow.engine.scope import Scope
from storyflow.engine.stopping import INTERRUPTED, broken, cancel_task, cancelled
from storyflow.engine.usage import StoreCallCache, Usage
from storyflow.errors import StepFailure
from storyflow.events import ErrorClass, EventType, StepStatus
from storyflow.spec.model import Workflow
from storyflow.store import RunRecord, StepRecord, Store

__all__ = ["Options", "Result", "Runner", "Sink"]


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
            self.insts[sid] = new_instance(plan.nodes[sid])
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
        self.move = self.journal.move
        self.usage = Usage(workflow.config, workflow.budget, run.meta.get("usage"))
        self.scope.base["run"]["usage"] = self.usage.totals  # live: `run.usage.tokens`
        self.pools = (
            Pools(workflow.pools, options.monotonic, self._pools_ready, self.flush)
            if workflow.pools
            else None
        )
        self.slots = Slots(self.pools, self._pools_ready) if self.pools is not None else None
        inputs = Inputs(self.scope, self.t, workflow.agents, options.environ)
        self.prep = Preparer(
            inputs=inputs,
            executor=options.executor,
            journal=self.journal,
            store=store,
            clock=options.clock,
            previous_record=self.previous_record,
            forced=self.forced,
            origin=options.origin,
        )
        self.attempts = Attempts(Serving(
            journal=self.journal,
            inputs=inputs,
            usage=self.usage,
            options=options,
            slots=self.slots,
            agents=workflow.agents,
            store=store,
            run_id=run.run_id,
            workflow_dir=self.workflow_dir,
            run_dir=self.run_dir,
            seed=workflow.seed,
            secret_values=self.secret_values,
            call_cache=None if options.no_cache else StoreCallCache(store, run.run_id),
        ))
        self.maps = Maps(self)
        self.loops = Loops(self)

    def _secret_values(self) -> list[str]:
        """Declared secrets' values, and those of variables named like secrets
        (`storyflow.engine.secrets`) that no agent declares: all redacted."""
        from storyflow.engine.secrets import redacted_values

        names = {n for a in self.wf.agents.values() for n in a.secrets}
        return redacted_values(self.opt.environ, names)

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

    def fail_to_start(self, exc: StepFailure) -> Result:
        """The run cannot start (its executor cannot be reached): it fails, nothing ran,
        every step stays as it was for ``resume``."""
        return not_started(self.insts.values(), error_record(exc), dict(self.usage.totals))

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
                cancel_task(inst.task)
            elif isinstance(inst, (MapInstance, LoopInstance)) and (
                inst.state == StepStatus.RUNNING.value
            ):
                # Its running parts are cancelled above; those not yet ready stay pending.
                cancelled(self.journal, self.opt.clock, inst, stop, attempt=False)
        self.journal.schedule_flush()
        if self.running == 0:
            self.done.set()

    def _pump(self) -> None:
        if self.pools is not None:
            self._pump_pools(self.pools)
        else:
            while self.queue and self.running < self.opt.max_parallel and self.stop is None:
                inst = self.queue.popleft()
                prepared = self.prep.prepare(inst)
                if prepared is None:  # kept, cached or failed here: no task, no slot
                    self._after(inst)
                    continue
                self._launch(inst, prepared)
        # Instances made ready since the last pump that must wait for a slot: make
        # `ready` durable once (amortised O(1): each instance passes here once), with
        # the limit that holds them (`--max-parallel` unless a pool parked them).
        for inst in self.fresh:
            if inst.task is None and inst.state == StepStatus.READY.value:
                inst.queued = inst.queued or "max_parallel"
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
                prepared = self.prep.prepare(inst)
                if prepared is None:
                    self._after(inst)
                    continue
                pool = pools.get(self.attempts.entry_pool(inst))
                if pool is not None:
                    if not pools.admits_now(pool):
                        inst.queued = f"pool:{pool.name}"
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

    def release_slot(self, inst: Instance, *, pump: bool = True) -> None:
        """Give back the pool slot ``inst`` holds (if any)."""
        if self.slots is not None:
            self.slots.release(inst, pump=pump)

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
            reason = blocked_reason(inst, self.insts)
            if reason is None and inst.node.step.when is not None:
                try:
                    scope = self.scope.for_step(None, inst.extra)
                    if not self.t.evaluate(inst.node.step.when, scope):
                        reason = "when was false"
                except Exception as exc:  # StepFailure, or a bug (an internal error)
                    self.prep.fail_before_start(inst, exc)
                    work.extend(self.settled(inst))
                    continue
            if reason is not None:
                inst.reason = reason
                inst.ended_at = self.opt.clock()
                self.move(inst, "skip")
                self.emit(EventType.STEP_SKIPPED, step=inst.id, reason=reason)
                work.extend(self.settled(inst))
                continue
            if isinstance(inst, MapInstance):
                work.extend(self.maps.expand(inst))
                continue
            if isinstance(inst, LoopInstance):
                work.extend(self.loops.begin(inst))
                continue
            self.enqueue(inst)

    def enqueue(self, inst: Instance) -> None:
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

    def settled(self, inst: Instance) -> list[Instance]:
        """Record a finished instance; return dependents whose needs are now all settled."""
        parent = inst.parent
        if isinstance(parent, MapInstance):
            return self.maps.item_settled(inst, parent)
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
            return self.loops.inner_settled(inst, parent)
        for dep_id in inst.node.dependents:
            self.waiting_on[dep_id] -= 1
            if self.waiting_on[dep_id] == 0:
                out.append(self.insts[dep_id])
        return out

    def end_container(self, inst: Instance, error: dict[str, str] | None) -> list[Instance]:
        """Settle a map or a loop whose parts have all settled (its output already set):
        succeeded, or failed with ``error``."""
        inst.ended_at = self.opt.clock()
        duration = round(inst.ended_at - (inst.started_at or inst.ended_at), 6)
        if error is None:
            self.move(inst, "succeed")
            self.emit(
                EventType.STEP_SUCCEEDED, step=inst.id, attempt=inst.attempts, duration_s=duration
            )
        else:
            inst.error = error
            self.move(inst, "fail")
            self.emit(
                EventType.STEP_FAILED,
                step=inst.id,
                attempt=inst.attempts,
                error=error,
                final=True,
                duration_s=duration,
            )
        return self.settled(inst)

    def _after(self, inst: Instance) -> None:
        ready = self.settled(inst)
        for nxt in ready:
            self._deps_settled(nxt)

    def _settle_cancelled(self, inst: Instance) -> None:
        assert self.stop is not None
        cancelled(self.journal, self.opt.clock, inst, self.stop, attempt=False)
        self.settled(inst)

    # -- one instance --------------------------------------------------------------------
    async def _run_instance(self, inst: Instance, prepared: Prepared) -> None:
        try:
            await self.attempts.run(inst, *prepared)
        except asyncio.CancelledError:
            cancelled(self.journal, self.opt.clock, inst, self.stop or INTERRUPTED)
        except Exception as exc:  # a bug, not the step's failure: fail the step, say so
            broken(self.journal, self.opt.clock, inst, exc)
        finally:
            inst.task = None  # a finished task keeps its coroutine: ~0.7 KB a step, let go
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

