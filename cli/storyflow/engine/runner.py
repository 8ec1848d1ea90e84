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

from storyflow.agents.base import Call
from storyflow.engine import lifecycle, retry
from storyflow.engine.plan import Node, Plan, digest
from storyflow.engine.scope import Scope
from storyflow.errors import InvalidOutput, PermanentError, StepFailure, StepTimeout
from storyflow.events import ErrorClass, EventType, RunStatus, StepStatus
from storyflow.spec.model import Workflow
from storyflow.store import RunRecord, StepRecord, Store, redact

Sink = Callable[[dict[str, Any]], None]
_Prepared = tuple[Any, dict[str, Any], dict[str, str]]
"""An instance ready for its attempts: the agent, rendered inputs and its secrets."""
_OK = (StepStatus.SUCCEEDED.value, StepStatus.CACHED.value)


@dataclass
class Options:
    """How a run executes; clock, sleep and randomness are injected for tests."""

    max_parallel: int = 8
    forced: frozenset[str] = frozenset()
    """Steps that re-run even if a previous attempt succeeded (``--from`` and downstream)."""
    previous: Mapping[str, StepRecord] = field(default_factory=dict)
    """Records of an earlier process of this run (resume)."""
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rand: Callable[[], float] = random.random
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    heartbeat: Callable[[], None] | None = None
    heartbeat_every_s: float = 5.0


def _error(exc: StepFailure) -> dict[str, str]:
    """The persisted form of a step failure."""
    error = {"class": exc.error_class.value, "message": exc.message}
    if exc.hint:
        error["hint"] = exc.hint
    return error


class Instance:
    """One step instance in memory; ``state`` is driven by the lifecycle machine."""

    __slots__ = (
        "agent",
        "attempts",
        "degraded",
        "ended_at",
        "error",
        "fingerprint",
        "id",
        "node",
        "output",
        "ready_at",
        "reason",
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
        self.unsettled = len(self.insts)
        self.done = asyncio.Event()
        self.interrupted: int | None = None
        self.workflow_dir = Path(workflow.path).resolve().parent
        self.run_dir = store.run_dir(run.run_id)
        self.secret_values = self._secret_values()
        self._validators: dict[str, Any] = {}
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

    def _holds_secret(self, value: Any) -> bool:
        return bool(self.secret_values) and redact(value, self.secret_values) != value

    def _secret_values(self) -> list[str]:
        names = {n for a in self.wf.agents.values() for n in a.secrets}
        return [v for n in names if len(v := self.opt.environ.get(n, "")) >= 4]

    # -- scheduling ------------------------------------------------------------------------
    async def execute(self) -> Result:
        started = self.opt.clock()
        beat = asyncio.ensure_future(self._heartbeat()) if self.opt.heartbeat else None
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
            self.flush()
        return self._finish(self.opt.clock() - started)

    async def _heartbeat(self) -> None:
        assert self.opt.heartbeat is not None
        while True:
            await asyncio.sleep(self.opt.heartbeat_every_s)
            self.opt.heartbeat()

    def interrupt(self, signum: int) -> None:
        """Cancel running steps; ready ones are cancelled, pending ones stay for resume."""
        if self.interrupted is not None:
            return
        self.interrupted = signum
        while self.queue:
            inst = self.queue.popleft()
            self._settle_cancelled(inst)
        for inst in self.insts.values():
            if inst.task is not None and not inst.task.done():
                inst.task.cancel()
        self.schedule_flush()
        if self.running == 0:
            self.done.set()

    def _pump(self) -> None:
        while self.queue and self.running < self.opt.max_parallel and self.interrupted is None:
            inst = self.queue.popleft()
            prepared = self._prepare(inst)
            if prepared is None:  # kept, cached or failed here: no task, no slot
                self._after(inst)
                continue
            self.running += 1
            inst.task = asyncio.ensure_future(self._run_instance(inst, prepared))
        # Instances made ready since the last pump that must wait for a slot: make
        # `ready` durable once (amortised O(1): each instance passes here once).
        for inst in self.fresh:
            if inst.task is None and inst.state == StepStatus.READY.value:
                self.checkpoint(inst)
        self.fresh.clear()

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
        if self.interrupted is not None:
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
        inst.ended_at = self.opt.clock()
        inst.error = {"class": ErrorClass.CANCELLED.value, "message": "cancelled by a signal"}
        self.move(inst, "cancel")
        self.emit(EventType.STEP_CANCELLED, step=inst.id, reason="interrupted")
        self._settled(inst)

    def _fail_before_start(self, inst: Instance, exc: StepFailure) -> None:
        inst.error = _error(exc)
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
            await self._attempts(inst, *prepared)
        except asyncio.CancelledError:
            if not StepStatus(inst.state).done:
                inst.ended_at = self.opt.clock()
                inst.error = {
                    "class": ErrorClass.CANCELLED.value,
                    "message": "cancelled by a signal",
                }
                self.move(inst, "cancel")
                self.emit(
                    EventType.STEP_CANCELLED,
                    step=inst.id,
                    attempt=inst.attempts,
                    reason="interrupted",
                )
        finally:
            self.running -= 1
            self._after(inst)
            self._pump()
            self.schedule_flush()
            if self.interrupted is not None and self.running == 0:
                self.done.set()

    def _inputs(self, inst: Instance) -> tuple[dict[str, Any], dict[str, str]]:
        step = inst.node.step
        agent = self.wf.agents.get(step.agent) if step.agent else None
        secrets = {}
        for name in agent.secrets if agent else ():
            value = self.opt.environ.get(name)
            if value is None:
                raise PermanentError(
                    f"secret {name} is not set", hint=f"export {name}=... before running"
                )
            secrets[name] = value
        scope = self.scope.for_step(secrets)
        inputs = self.t.render(step.with_, scope) if step.with_ else {}
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
            inputs, secrets = self._inputs(inst)
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

    async def _attempts(
        self, inst: Instance, agent: Any, inputs: dict[str, Any], secrets: dict[str, str]
    ) -> None:
        step = inst.node.step
        while True:
            inst.attempts += 1
            inst.started_at = self.opt.clock()
            self.move(inst, "start")
            self.emit(EventType.STEP_STARTED, step=inst.id, attempt=inst.attempts)
            call = Call(
                run_id=self.run.run_id,
                step_id=inst.id,
                attempt=inst.attempts,
                inputs=inputs,
                workflow_dir=self.workflow_dir,
                run_dir=self.run_dir,
                secrets=secrets,
                timeout_s=step.timeout_s,
                output_schema=step.output_schema,
                seed=self.wf.seed,
            )
            self.flush()  # durable before the agent runs
            try:
                output = await self._call(agent, call)
            except StepFailure as exc:
                inst.ended_at = self.opt.clock()
                inst.error = _error(exc)
                if retry.should_retry(step.retry, exc.error_class.value, inst.attempts):
                    delay = retry.delay_s(
                        step.retry,
                        inst.attempts,
                        retry_after_s=exc.retry_after_s,
                        rand=self.opt.rand,
                    )
                    self.move(inst, "retry")
                    self.emit(
                        EventType.STEP_RETRYING,
                        step=inst.id,
                        attempt=inst.attempts,
                        delay_s=round(delay, 3),
                        error=inst.error,
                    )
                    self.flush()
                    await self.opt.sleep(delay)
                    continue
                self.move(inst, "fail")
                self.emit(
                    EventType.STEP_FAILED,
                    step=inst.id,
                    attempt=inst.attempts,
                    error=inst.error,
                    final=True,
                    duration_s=round(inst.ended_at - inst.started_at, 6),
                )
                return
            inst.output = output
            inst.error = None
            inst.ended_at = self.opt.clock()
            self.move(inst, "succeed")
            if step.cache and inst.fingerprint and not self._holds_secret(output):
                self.store.cache_put(inst.fingerprint, output, self.run.run_id)
            self.emit(
                EventType.STEP_SUCCEEDED,
                step=inst.id,
                attempt=inst.attempts,
                duration_s=round(inst.ended_at - inst.started_at, 6),
            )
            return

    async def _call(self, agent: Any, call: Call) -> Any:
        step_schema = call.output_schema
        try:
            if call.timeout_s is not None:
                output = await asyncio.wait_for(agent.run(call), call.timeout_s)
            else:
                output = await agent.run(call)
        except TimeoutError as exc:
            raise StepTimeout(f"timed out after {call.timeout_s:g}s") from exc
        except (StepFailure, asyncio.CancelledError):
            raise
        except Exception as exc:  # an agent bug must fail the step, not the engine
            raise PermanentError(f"{type(exc).__name__}: {exc}") from exc
        if step_schema is not None:
            self._check_output(call.step_id, step_schema, output)
        return output

    def _check_output(self, step_id: str, schema: dict[str, Any], output: Any) -> None:
        validator = self._validators.get(step_id)
        if validator is None:
            from jsonschema import Draft202012Validator

            validator = self._validators[step_id] = Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(output), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            where = "".join(f"[{p!r}]" for p in e.absolute_path) or "output"
            raise InvalidOutput(f"output does not match output_schema at {where}: {e.message}")

    # -- the end ---------------------------------------------------------------------------
    def _finish(self, duration_s: float) -> Result:
        counts: dict[str, int] = {}
        failed = []
        for inst in self.insts.values():
            counts[inst.state] = counts.get(inst.state, 0) + 1
            if inst.state == StepStatus.FAILED.value and not inst.node.step.allow_failure:
                failed.append(inst)
        if self.interrupted is not None:
            return Result(RunStatus.INTERRUPTED, {}, None, counts)
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
