"""One step instance's attempts: retries, breakers, fallbacks and pool slots.

A step is *served* by its agent, then, if that agent fails for good, by each agent of
its fallback chain in turn (`Step.fallbacks`); each server has its own retry policy,
timeout, pool and breaker. For every attempt:

1. If the agent's breaker is open, the attempt fails fast as ``circuit_open`` without
   calling the agent (and without waiting for a pool).
2. Otherwise the attempt takes a slot and a token of the server's pool (a step's first
   attempt got them from the scheduler), then the breaker admits it (as its trial call
   when half-open), then the agent runs, bounded by the timeout.
3. The outcome goes to the breaker. A failure retries as the server's policy says —
   unless the breaker is open now and a fallback remains: then the fallback serves at
   once. The pool slot is given back during a retry delay.

A fallback serving the step makes it *degraded*: its record names the agent that
served; its events carry ``agent`` and ``degraded``. Breaker state changes are events.

`Attempts` knows nothing of the scheduler: it gets a `Serving` — the journal, the
inputs, usage, pool slots, the options (clocks, the executor) and where the run lives —
and the scheduler awaits `Attempts.run` for each instance it launches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storyflow.agents.base import Call, CallCache
from storyflow.engine import retry
from storyflow.engine.breaker import Admission, Breaker
from storyflow.engine.deltas import Deltas
from storyflow.engine.executors import agent_for
from storyflow.engine.inputs import Inputs, Server
from storyflow.engine.replay import NESTED_KINDS, request_of
from storyflow.engine.usage import Usage
from storyflow.errors import (
    AnswerNeeded,
    BudgetExceeded,
    CircuitOpen,
    InvalidOutput,
    PermanentError,
    ReplayMiss,
    StepFailure,
    StepTimeout,
)
from storyflow.events import EventType
from storyflow.spec.limits import json_value
from storyflow.spec.model import Agent
from storyflow.store import redact

if TYPE_CHECKING:
    from storyflow.engine.commit import Journal
    from storyflow.engine.instance import Instance
    from storyflow.engine.options import Options
    from storyflow.engine.pools import Slots
    from storyflow.store import Store


@dataclass(frozen=True, slots=True)
class Serving:
    """What serving a run's attempts needs — and nothing of the scheduler's state."""

    journal: Journal
    """Moves instances through their lifecycle, checkpoints them, emits events."""
    inputs: Inputs
    usage: Usage
    options: Options
    """Clocks, sleep, randomness, the environment and the executor."""
    slots: Slots | None
    """The pools' slots (None: the workflow has no pools)."""
    agents: Mapping[str, Agent]
    """The workflow's agents, for their breakers."""
    store: Store
    """For the output cache (``cache: true``)."""
    run_id: str
    workflow_dir: Path
    run_dir: Path
    seed: int | None
    secret_values: list[str]
    call_cache: CallCache | None


def error_record(exc: StepFailure) -> dict[str, str]:
    """The persisted form of a step failure (the journal redacts secrets from it)."""
    error = {"class": exc.error_class.value, "message": exc.message}
    if exc.hint:
        error["hint"] = exc.hint
    if exc.traceback:
        error["traceback"] = exc.traceback
    return error


class Attempts:
    """Serves step instances for one runner; holds the run's breakers."""

    def __init__(self, serving: Serving) -> None:
        self.s = serving
        self.breakers = {
            name: Breaker(name, agent.breaker)
            for name, agent in serving.agents.items()
            if agent.breaker is not None
        }
        self._validators: dict[int, Any] = {}

    def entry_pool(self, inst: Instance) -> str | None:
        """The pool the scheduler takes for a step's first attempt: its own agent's,
        unless that agent's breaker would refuse it — then the first server's that would
        be let through (no pool at all if every one would fail fast)."""
        step = inst.node.step
        if not self.breakers:
            return step.pool
        now = self.s.options.monotonic()
        servers: tuple[Server, ...] = (step, *step.fallbacks)
        for server in servers:
            breaker = self.breakers.get(server.agent) if server.agent else None
            if breaker is None or breaker.allows(now):
                return server.pool
        return None

    async def run(self, inst: Instance, agent: Any, inputs: dict[str, Any],
                  secrets: dict[str, str]) -> None:
        """Serve ``inst`` by its agent, then by its fallbacks; settle it — or pause it
        (back to ``pending``) when it needs an answer no one can give here."""
        try:
            await self._run(inst, agent, inputs, secrets)
        except AnswerNeeded as need:
            s = self.s
            inst.ended_at = s.options.clock()
            inst.error, inst.degraded = None, False
            inst.waiting = need.questions
            s.journal.move(inst, "pause")
            for q in need.questions:
                s.journal.emit(
                    EventType.STEP_WAITING,
                    step=inst.id,
                    attempt=inst.attempts,
                    answer_step=q["step"],
                    question=q["question"],
                    schema=q["schema"],
                )

    async def _run(self, inst: Instance, agent: Any, inputs: dict[str, Any],
                   secrets: dict[str, str]) -> None:
        s = self.s
        step = inst.node.step
        server: Server = step
        exc = await self._serve(inst, step, agent, inputs, secrets, last=not step.fallbacks)
        for i, fallback in enumerate(step.fallbacks):
            if exc is None:
                break
            s.journal.move(inst, "retry")
            s.journal.emit(
                EventType.STEP_FALLBACK,
                step=inst.id,
                attempt=inst.attempts,
                agent=server.agent or server.uses,
                fallback=fallback.agent,
                error=inst.error,
            )
            server = fallback
            inst.agent, inst.degraded = fallback.agent, True
            last = i == len(step.fallbacks) - 1
            try:
                inputs, secrets = s.inputs.for_server(inst, fallback)
                agent = agent_for(s.options.executor, fallback.uses)
            except StepFailure as failure:
                exc = self._failed_before_call(inst, failure)
                continue
            exc = await self._serve(inst, fallback, agent, inputs, secrets, last=last)
        if exc is not None:
            inst.degraded = False  # nothing was served
            s.journal.move(inst, "fail")
            s.journal.emit(
                EventType.STEP_FAILED,
                step=inst.id,
                attempt=inst.attempts,
                error=inst.error,
                final=True,
                duration_s=round((inst.ended_at or 0.0) - (inst.started_at or 0.0), 6),
                **self._tag(inst),
            )
            return
        s.journal.move(inst, "succeed")
        if step.cache and inst.fingerprint and not inst.degraded and not _holds_secret(
            s.secret_values, inst.output
        ):
            s.store.cache_put(inst.fingerprint, inst.output, s.run_id)
        s.journal.emit(
            EventType.STEP_SUCCEEDED,
            step=inst.id,
            attempt=inst.attempts,
            duration_s=round((inst.ended_at or 0.0) - (inst.started_at or 0.0), 6),
            **self._tag(inst),
        )

    @staticmethod
    def _tag(inst: Instance, *, usage: bool = True) -> dict[str, Any]:
        """Event fields naming a fallback that serves (none while the step's own agent
        does), and (with ``usage``) the tokens and cost of a step whose agent reported
        usage — what its attempts spent so far, told when one ends, not as one starts."""
        tag: dict[str, Any] = {"agent": inst.agent, "degraded": True} if inst.degraded else {}
        if inst.worker:
            tag["worker"] = inst.worker
        if usage and inst.usage:
            tag["tokens"] = inst.usage["tokens"]
            tag["cost"] = inst.usage["cost"]
        return tag

    def _spender(self, inst: Instance) -> Callable[[int], None] | None:
        """Counts reported tokens against the ``tokens`` limit of the pool ``inst`` holds."""
        return self.s.slots.spender(inst) if self.s.slots is not None else None

    def _failed_before_call(self, inst: Instance, exc: StepFailure) -> StepFailure:
        """A fallback could not even be called (a template, a secret): a failed attempt."""
        s = self.s
        inst.attempts += 1
        inst.started_at = inst.ended_at = s.options.clock()
        s.journal.move(inst, "start")
        inst.error = error_record(exc)
        return exc

    async def _serve(self, inst: Instance, server: Server, agent: Any, inputs: dict[str, Any],
                     secrets: dict[str, str], *, last: bool) -> StepFailure | None:
        """Attempts by one server until it succeeds (None) or fails for good (the error).

        On success ``inst.output`` is set; either way the instance is left ``running``.
        """
        s = self.s
        breaker = self.breakers.get(server.agent) if self.breakers and server.agent else None
        policy = server.retry
        tries = 0
        while True:
            tries += 1
            exc: StepFailure | None = None
            admission = Admission.CALL
            if breaker is not None and not breaker.allows(s.options.monotonic()):
                exc = _circuit_open(breaker, s.options.monotonic())
            else:
                if s.slots is not None:
                    await s.slots.hold_for(inst, server.pool)
                if breaker is not None:
                    admission = breaker.admit(s.options.monotonic())
                    if admission is Admission.REFUSED:
                        exc = _circuit_open(breaker, s.options.monotonic())
            inst.attempts += 1
            inst.started_at = s.options.clock()
            inst.worker = None
            inst.request = request_of(server.uses, inputs, inst.node.step.output_schema, s.seed)
            s.journal.move(inst, "start")
            if exc is None:
                exc = await self._attempt(inst, server, agent, inputs, secrets, breaker, admission)
                if exc is None:
                    return None
            inst.ended_at = s.options.clock()
            inst.error = error_record(exc)
            fall_back_now = not last and breaker is not None and not breaker.allows(
                s.options.monotonic()
            )
            if fall_back_now or not retry.should_retry(policy, exc.error_class.value, tries):
                return exc
            delay = retry.delay_s(policy, tries, retry_after_s=exc.retry_after_s,
                                  rand=s.options.rand)
            s.journal.move(inst, "retry")
            s.journal.emit(
                EventType.STEP_RETRYING,
                step=inst.id,
                attempt=inst.attempts,
                delay_s=round(delay, 3),
                error=inst.error,
                **self._tag(inst),
            )
            if s.slots is not None:
                s.slots.release(inst)  # a step waiting out its delay holds no pool slot
            s.journal.flush()
            await s.options.sleep(delay)

    async def _attempt(self, inst: Instance, server: Server, agent: Any,
                       inputs: dict[str, Any], secrets: dict[str, str],
                       breaker: Breaker | None, admission: Admission) -> StepFailure | None:
        """One call of the agent; the outcome goes to the breaker."""
        s = self.s
        step = inst.node.step
        s.journal.emit(
            EventType.STEP_STARTED, step=inst.id, attempt=inst.attempts,
            **self._tag(inst, usage=False),
        )
        # Budgets: the agent reserves before each model call; what it still holds is
        # given back when the attempt ends, however it ends.
        metering = s.usage.attempt(inst, step.budget, self._spender(inst))
        deltas = Deltas(s.journal, inst.id, inst.attempts)
        call = Call(
            run_id=s.run_id,
            step_id=inst.id,
            attempt=inst.attempts,
            inputs=inputs,
            workflow_dir=s.workflow_dir,
            run_dir=s.run_dir,
            secrets=secrets,
            timeout_s=server.timeout_s,
            output_schema=step.output_schema,
            seed=s.seed,
            log=self._logger(inst, deltas),
            meter=metering.meter,
            reserve=metering.reserve,
            cache=s.call_cache,
            placed=lambda worker: setattr(inst, "worker", worker),
            delta=deltas,
        )
        replay = s.options.replay
        s.journal.flush()  # durable before the agent runs
        try:
            if replay is not None and server.uses not in NESTED_KINDS:
                assert inst.request is not None
                found, output = replay.answer(inst.id, inst.request, s.secret_values)
                if not found:
                    output = await self._call(agent, call)
            else:
                output = await self._call(agent, call)
        except AnswerNeeded:
            if breaker is not None:
                breaker.abandoned(admission, s.options.monotonic())
            raise
        except StepFailure as exc:
            exc = metering.over or exc  # a reply landed over a budget, whatever followed
            # The budget's refusal or a replay's miss: not the agent's failure.
            if isinstance(exc, BudgetExceeded | ReplayMiss):
                if breaker is not None:
                    breaker.abandoned(admission, s.options.monotonic())
            elif breaker is not None and breaker.failed(admission, s.options.monotonic()):
                self._opened(inst, breaker, trial=admission is Admission.TRIAL)
            return exc
        except asyncio.CancelledError:
            if breaker is not None:
                breaker.abandoned(admission, s.options.monotonic())
            raise
        finally:
            deltas.close()  # the streamed text before the step's end event
            metering.close()
        if breaker is not None and breaker.succeeded(admission):
            s.journal.emit(EventType.BREAKER_CLOSED, agent=breaker.id, step=inst.id)
        if metering.over is not None:  # recorded and paid for, but over: never a quiet success
            return metering.over
        inst.output = output
        inst.error = None
        inst.ended_at = s.options.clock()
        return None

    def _logger(self, inst: Instance, deltas: Deltas) -> Callable[[str], None]:
        """The ``log`` of one attempt: each line a ``step.log`` event, from any thread
        (a sync python callable runs in a worker thread) — after the text the attempt
        streamed so far, so a line lands where it was said."""
        s = self.s
        loop = asyncio.get_running_loop()
        step_id, attempt = inst.id, inst.attempts

        def emit(message: str) -> None:
            deltas.flush()
            s.journal.emit(EventType.STEP_LOG, step=step_id, attempt=attempt, message=message)
            s.journal.schedule_flush()

        def log(message: str) -> None:
            try:
                here = asyncio.get_running_loop() is loop
            except RuntimeError:
                here = False
            if here:
                emit(str(message))
            else:
                loop.call_soon_threadsafe(emit, str(message))

        return log

    def _opened(self, inst: Instance, breaker: Breaker, *, trial: bool) -> None:
        self.s.journal.emit(
            EventType.BREAKER_OPENED,
            agent=breaker.id,
            step=inst.id,
            failures=breaker.failures,
            trial=trial,
            cooldown_s=breaker.cooldown_s,
        )

    async def _call(self, agent: Any, call: Call) -> Any:
        """Run the agent within the timeout; its output checked against output_schema."""
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
        # The boundary: whatever the kind, an output is kept, cached, sent and rendered as
        # JSON. What JSON cannot hold fails this step here, not the checkpoint after it.
        try:
            output = json_value(output)
        except ValueError as exc:
            raise InvalidOutput(
                f"the output ({type(output).__name__}) cannot be stored as JSON: {exc}",
                hint="a step's output must be text, a number, true/false, null, or lists and "
                "mappings of them (keys are text); in a template make it one with `| list` "
                "or `| tojson`, from a python callable return lists and dicts",
            ) from exc
        if call.output_schema is not None:
            self._check_output(call.output_schema, output)
        return output

    def _check_output(self, schema: dict[str, Any], output: Any) -> None:
        # Map items and loop iterations share their step's schema object: one validator
        # per step, keyed by the object (steps live as long as the run).
        validator = self._validators.get(id(schema))
        if validator is None:
            from jsonschema import Draft202012Validator

            validator = self._validators[id(schema)] = Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(output), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            where = "".join(f"[{p!r}]" for p in e.absolute_path) or "output"
            raise InvalidOutput(f"output does not match output_schema at {where}: {e.message}")


def _holds_secret(secret_values: list[str], value: Any) -> bool:
    return bool(secret_values) and redact(value, secret_values) != value


def _circuit_open(breaker: Breaker, now: float) -> CircuitOpen:
    wait = breaker.retry_in_s(now)
    when = f"a trial call in {wait:.1f}s" if wait > 0 else "a trial call is under way"
    return CircuitOpen(
        f"agent {breaker.id}'s circuit breaker is open after {breaker.failures} failures "
        f"in a row ({when}); the call was not made",
        retry_after_s=wait or None,
    )

