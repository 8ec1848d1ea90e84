"""The ``workflow`` agent: a step that runs another workflow file as a child run.

``with: {path: chapter.yaml, inputs: {...}}``. The child run's id is the parent's id
and the step instance's, so a step that runs again — a retry, a resume after a crash
or an interruption, a changed child file or changed inputs — finds its child and
resumes it, keeping what the child finished with the same definition and inputs; a
child that succeeded with the same file and inputs is not run again. The
child runs in this process, on this event loop, with the parent's store and options;
its events go to its own log. The parent's ``--env`` applies to a child that defines
that environment, and the parent's ``--set`` values whose path starts with one of
`INHERITED_SETS` (``config``, ``budget``, ``defaults``, ``seed``: settings every
workflow has) apply to the child too, recorded as the child's own ``sets`` — a
resumed parent passes its child the same, plus any it was resumed with. Its inputs
are checked against its own ``inputs`` schema; its outputs are the step's output.
Each model call of the child also reserves and reports through the parent's step
(`Usage.outer`), so the parent's budgets hold over the child and the parent's step
and run count what the child uses as it uses it; a child that fails as
``budget_exceeded`` fails the step so too. A child that pauses for an answer pauses
the parent step with the child's questions (``resume PARENT --answer STEP=...``
reaches the child). In a replay the child answers its calls from the recorded run's
child of the same step, so a change inside the child file is replayed too.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storyflow.agents.base import Call
from storyflow.engine.runner import CURRENT, Options, Runner
from storyflow.errors import (
    AnswerNeeded,
    BudgetExceeded,
    InputError,
    PermanentError,
    ReplayMiss,
    StepFailure,
    TransientError,
    WorkflowError,
)
from storyflow.events import ErrorClass, EventType, RunStatus
from storyflow.store import EventLog, RunRecord

if TYPE_CHECKING:
    from storyflow.engine.replay import ReplayBook

MAX_DEPTH = 8
INHERITED_SETS = frozenset({"config", "budget", "defaults", "seed"})
"""The first parts of the ``--set`` paths a child run inherits from its parent."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def child_sets(sets: list[str]) -> list[str]:
    """The parent's ``--set`` values a child run takes: those whose path starts with
    one of `INHERITED_SETS` (``config.prices=...``, ``budget.tokens=N``), in order.
    A step, an agent or a pool is the parent's own: none of those is passed on."""
    return [item for item in sets
            if item.partition("=")[0].strip().split(".", 1)[0] in INHERITED_SETS]


def child_run_id(parent_run_id: str, step_instance: str) -> str:
    """``PARENT.step``: ``batch[3]`` → ``PARENT.batch-3``,
    ``polish#2.revise`` → ``PARENT.polish-2.revise``."""
    return f"{parent_run_id}.{_UNSAFE.sub('-', step_instance).strip('-')}"


def source_child(store: Any, run_id: str, step_instance: str) -> RunRecord | None:
    """The child run step instance ``step_instance`` of run ``run_id`` made; for a step
    that run kept from a fork's parent, the child that parent's step made (all the
    way back). None when there is none."""
    seen: set[str] = set()
    while run_id not in seen:
        seen.add(run_id)
        child: RunRecord | None = store.get_run(child_run_id(run_id, step_instance))
        if child is not None:
            return child
        rec = store.get_steps(run_id, [step_instance]).get(step_instance)
        if rec is None or rec.forked_from is None:
            return None
        run_id = rec.forked_from
    return None


class WorkflowAgent:
    """Runs a child workflow; see the module docstring."""

    kind = "workflow"
    required: tuple[str, ...] = ("path",)

    async def run(self, call: Call) -> Any:
        from storyflow.agents.registry import kinds
        from storyflow.engine.forking import FORCED, FROM, fork_resume
        from storyflow.engine.lifecycle import RunLife
        from storyflow.engine.plan import plan
        from storyflow.engine.runs import end_run, resume_plan
        from storyflow.spec import load_workflow
        from storyflow.spec.params import resolve_inputs

        parent = CURRENT.get()
        store = parent.store
        rel = call.inputs.get("path")
        if not isinstance(rel, str) or not rel:
            raise PermanentError("with.path of a workflow step must name a workflow file")
        path = (call.workflow_dir / rel).resolve()
        here = str(Path(parent.wf.path).resolve())
        if str(path) in (*parent.opt.ancestry, here) or parent.opt.depth >= MAX_DEPTH:
            raise PermanentError(
                f"workflow {rel} would run inside itself",
                hint="a sub-workflow cannot run the workflow that contains it",
            )
        if not path.is_file():
            raise PermanentError(f"workflow file {rel} not found (looked for {path})")
        given = call.inputs.get("inputs") or {}
        if not isinstance(given, dict):
            raise PermanentError("with.inputs of a workflow step must be a mapping")
        try:
            wf = load_workflow(
                path, kinds=kinds(), known_valid=store.known_valid, parsed=store.parsed_files
            )
            env = parent.run.environment
            if env is not None and env not in wf.environments:
                env = None  # --env reaches a child that defines it
            sets = child_sets(parent.run.sets)
            if env is not None or sets:
                wf = load_workflow(path, kinds=kinds(), environment=env, sets=sets,
                                   known_valid=store.known_valid, parsed=store.parsed_files)
            values = resolve_inputs(wf, given=given)
        except WorkflowError as exc:
            first = exc.problems[0].format() if exc.problems else str(exc)
            more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
            raise PermanentError(f"child workflow {rel} is invalid: {first}{more}",
                                 hint=f"storyflow validate {path}") from exc
        except InputError as exc:
            raise PermanentError(f"child workflow {rel}: {exc.message}", hint=exc.hint) from exc
        store.remember_valid(wf.source_hash)
        compiled = plan(wf)
        book = None
        if parent.opt.replay is not None:
            found, book, output = _replay(parent, call)
            if found:
                return output
        rid = child_run_id(parent.run.run_id, call.step_id)
        record = store.get_run(rid)
        origin: str | None = None
        now = store.clock()
        if record is not None:
            same = record.inputs == values and record.source_hash == wf.source_hash
            if same and record.status == RunStatus.SUCCEEDED.value:
                call.log(f"child run {rid} already succeeded: its outputs stand")
                return record.outputs or {}
            # Resumed like any run: steps whose definition or inputs changed re-run (with
            # what depends on them), the rest is kept.
            # A child fork goes on keeping from its source what it had not reached.
            rp, origin = fork_resume(store, record, compiled, resume_plan(store, record, compiled))
            previous, forced, previous_status = rp.previous, rp.forced, record.status
            record.inputs = values
            record.workflow_version = wf.version
            record.environment = env
            record.sets = sets
        else:
            previous, forced, previous_status = {}, frozenset(), None
            # In a fork, the child forks the parent run's child of the same step.
            source = (source_child(store, parent.opt.origin, call.step_id)
                      if parent.opt.origin is not None else None)
            if source is not None:
                rp = resume_plan(store, source, compiled, warn=lambda _: None)
                previous, forced, origin = rp.previous, rp.forced, source.run_id
                for rec in previous.values():
                    rec.meta[FROM] = origin  # kept, a record is copied into the child
            record = RunRecord(
                run_id=rid,
                workflow=wf.name,
                workflow_path=str(path),
                workflow_version=wf.version,
                source_hash=wf.source_hash,
                status=RunStatus.RUNNING.value,
                inputs=values,
                environment=env,
                sets=sets,
                created_at=now,
                updated_at=now,
                parent_run=parent.run.run_id,
                parent_step=call.step_id,
                forked_from=origin,
                fork=None if source is None else {
                    "kind": "fork", "from": [], "sets": [], "file": None,
                    "inputs": sorted(k for k in set(values) | set(source.inputs)
                                     if values.get(k) != source.inputs.get(k))},
            )
            if source is not None:
                record.meta[FORCED] = sorted(forced)
        record.status = RunStatus.RUNNING.value
        record.source_hash = wf.source_hash
        record.error = None
        record.meta["steps"] = list(compiled.order)
        store.put_run(record)
        children = parent.run.meta.setdefault("children", {})
        if children.get(call.step_id) != rid:  # the link, for `show` of the parent
            children[call.step_id] = rid
            store.put_run(parent.run)
        po = parent.opt
        options = Options(
            max_parallel=po.max_parallel,
            forced=forced,
            previous=previous,
            origin=origin,
            clock=po.clock,
            monotonic=po.monotonic,
            sleep=po.sleep,
            rand=po.rand,
            environ=po.environ,
            answers=po.answers,
            ask=po.ask,
            depth=po.depth + 1,
            ancestry=(*po.ancestry, here),
            no_cache=po.no_cache,
            executor=po.executor,
            replay=book,
        )
        log = EventLog(store.run_dir(rid) / "events.jsonl")
        child = Runner(wf, compiled, store, record, log.write, options)
        child.usage.outer = call  # its calls reserve and report through this step too
        head = {"workflow": wf.name, "steps": len(compiled), "inputs": values,
                "workflow_version": wf.version}
        verb = "resumes" if previous_status is not None else "starts"
        call.log(f"child run {rid} {verb}")
        life = RunLife(resumed_from=previous_status)
        started = store.clock()
        try:
            if previous_status is not None:
                rerun = [s for s in compiled.order if s not in previous or s in forced]
                child.emit(EventType.RUN_RESUMED, **head, kept=[], rerun=rerun, changed=[])
            else:
                child.emit(EventType.RUN_STARTED, **head)
            task = asyncio.ensure_future(_execute(child))
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                child.interrupt(signal.SIGINT)  # checkpoint the child, then stop
                result = await task
                end_run(child.emit, store, record, result, life, started)
                raise
            end_run(child.emit, store, record, result, life, started)
        finally:
            log.close()
        call.log(f"child run {rid} {result.status.value}")
        if result.status is RunStatus.SUCCEEDED:
            return result.outputs
        if result.status is RunStatus.WAITING:
            raise AnswerNeeded(list(result.waiting or ()))
        error = result.error or {}
        message = f"child run {rid} {result.status.value}: {error.get('message', '')}"
        hint = f"storyflow show {rid}"
        if error.get("class") in (ErrorClass.TRANSIENT.value, ErrorClass.TIMEOUT.value):
            raise TransientError(message, hint=hint)
        if error.get("class") == ErrorClass.BUDGET_EXCEEDED.value:
            raise BudgetExceeded(message, hint=(
                f"`storyflow show {rid}` names the budget; raise it and resume this run: "
                f"storyflow resume {parent.run.run_id} --set budget.tokens=N "
                "(budget.* reaches child runs)"))
        if error.get("class") == ErrorClass.REPLAY_MISS.value:
            raise ReplayMiss(message, hint=hint)
        raise PermanentError(message, hint=hint)


def _replay(parent: Runner, call: Call) -> tuple[bool, ReplayBook | None, Any]:
    """In a replay: the book the child run answers from — the recorded run's child of
    the same step — as ``(False, book, None)``. Without such a child (another step
    made it, or it is gone) the step is answered whole when the recorded run made the
    same call: ``(True, None, output)``; else it runs live, ``(False, None, None)``,
    or fails as ``replay_miss`` when strict."""
    from storyflow.engine.replay import request_of
    from storyflow.store import instance_records

    book = parent.opt.replay
    assert book is not None
    source = source_child(parent.store, book.source, call.step_id)
    if source is not None:
        _, records = instance_records(parent.store, source)
        return False, book.nested(source.run_id, records.values()), None
    request = request_of("workflow", call.inputs, call.output_schema, call.seed)
    found, output = book.answer(call.step_id, request, parent.secret_values)
    return found, None, output


async def _execute(child: Runner) -> Any:
    """Run the child in a task of its own, so the parent's ``CURRENT`` stays the parent's."""
    return await child.execute()


__all__ = ["INHERITED_SETS", "StepFailure", "WorkflowAgent", "child_run_id", "child_sets",
           "source_child"]
