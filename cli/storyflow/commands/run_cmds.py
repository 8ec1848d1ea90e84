"""Commands that execute runs: run and resume."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from storyflow.commands.answers import interactive, parse_answers, print_questions, terminal_ask
from storyflow.commands.app import G, app, err, guarded, pick_run, silence_stdout, state_dir
from storyflow.commands.spec_cmds import known_kinds
from storyflow.commands.stopping import Stopping, ignore_signals
from storyflow.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_WAITING,
    StepFailure,
    UsageError,
)
from storyflow.events import EventType, RunStatus

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@app.command()
@guarded
def run(
    file: Path = typer.Argument(..., help="Workflow file.", show_default=False),
    inputs: list[str] = typer.Option(
        [], "-i", "--input", help="An input as key=value (repeatable)."
    ),
    inputs_file: Path | None = typer.Option(
        None, "--inputs", help="Inputs from a JSON or YAML file."
    ),
    env: str | None = typer.Option(None, "--env", help="Apply the file's environments.NAME."),
    sets: list[str] = typer.Option([], "--set", help="Override a value: path=value (repeatable)."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Use this run id instead of a new one."
    ),
    max_parallel: int = typer.Option(8, "--max-parallel", min=1, help="Steps running at once."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate and show the plan; run nothing."
    ),
    json_mode: bool = typer.Option(False, "--json", help="One JSON event per line on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Plain lines, no live display."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Bypass the LLM call cache."),
    executor_opt: str | None = typer.Option(
        None,
        "--executor",
        help="Where steps run: local, dask (a temporary local cluster) or a Dask "
        "scheduler address like tcp://HOST:8786.",
    ),
) -> None:
    """Validate, compile and run a workflow."""
    from storyflow.engine import executors
    from storyflow.engine.plan import plan
    from storyflow.spec import load_workflow
    from storyflow.spec.params import resolve_inputs

    if run_id is not None and not _RUN_ID.fullmatch(run_id):
        raise UsageError(
            f"invalid run id {run_id!r}",
            hint="use letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(at most 64 characters)",
        )
    if dry_run:
        from storyflow.ui.graph import render

        wf = load_workflow(file, kinds=known_kinds(), environment=env, sets=sets)
        values = resolve_inputs(wf, inputs, inputs_file)
        compiled = plan(wf)
        typer.echo(f"{wf.name}: valid, {len(compiled)} steps")
        typer.echo("inputs: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
        typer.echo(render(compiled, "text"), nl=False)
        return
    from storyflow.store import RunRecord, Store

    with Store(state_dir()) as store:
        wf = load_workflow(
            file,
            kinds=known_kinds(),
            environment=env,
            sets=sets,
            known_valid=store.known_valid,
            parsed=store.parsed_files,
        )
        values = resolve_inputs(wf, inputs, inputs_file)
        compiled = plan(wf)
        chosen = executors.setting(wf.executor, executor_opt)
        executors.require_dask(chosen)
        store.remember_valid(wf.source_hash)
        rid = run_id or store.new_run_id()
        if run_id is not None and store.get_run(run_id) is not None:
            raise UsageError(
                f"run {run_id} already exists", hint=f"continue it with: storyflow resume {run_id}"
            )
        now = store.clock()
        record = RunRecord(
            run_id=rid,
            workflow=wf.name,
            workflow_path=str(Path(file).resolve()),
            workflow_version=wf.version,
            source_hash=wf.source_hash,
            status=RunStatus.RUNNING.value,
            inputs=values,
            environment=env,
            sets=list(sets),
            created_at=now,
            updated_at=now,
            meta={"steps": list(compiled.order)},
        )
        if executor_opt is not None:
            record.meta["executor"] = executor_opt  # resume uses it unless told otherwise
        store.put_run(record)
        code = execute(
            store,
            wf,
            compiled,
            record,
            json_mode=json_mode,
            progress=not no_progress,
            max_parallel=max_parallel,
            no_cache=no_cache,
            executor=chosen,
        )
    leave(code)


@app.command()
@guarded
def resume(
    run_ref: str | None = typer.Argument(
        None, help="Run id or a unique prefix.", show_default=False
    ),
    last: bool = typer.Option(False, "--last", help="Resume the newest run."),
    from_steps: list[str] = typer.Option([], "--from", help="Re-run this step and its dependents."),
    answer_specs: list[str] = typer.Option(
        [],
        "--answer",
        help="Answer a waiting human step: STEP=JSON, STEP=text or STEP=@file (repeatable).",
    ),
    max_parallel: int = typer.Option(8, "--max-parallel", min=1, help="Steps running at once."),
    sets: list[str] = typer.Option(
        [], "--set", help="Override a value from now on, e.g. budget.tokens=N (repeatable)."
    ),
    json_mode: bool = typer.Option(False, "--json", help="One JSON event per line on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Plain lines, no live display."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Bypass the LLM call cache."),
    executor_opt: str | None = typer.Option(
        None,
        "--executor",
        help="Where steps run: local, dask (a temporary local cluster) or a Dask "
        "scheduler address like tcp://HOST:8786.",
    ),
) -> None:
    """Continue a failed, interrupted or waiting run from its checkpoint."""
    from storyflow.store import Store

    with Store(state_dir()) as store:
        record = pick_run(store, run_ref, last)
        if record.parent_run:
            raise UsageError(
                f"run {record.run_id} is a child of run {record.parent_run}",
                hint=f"resume the parent: storyflow resume {record.parent_run}",
            )
        # Answers are checked before anything is touched: a bad one changes nothing.
        answers = parse_answers(record, answer_specs)
        # Hold the run before printing a plan or touching its record (exit 4 if live).
        lease = store.acquire_lease(record.run_id)
        try:
            code = _resume(
                store, record, lease, from_steps, answers, sets, max_parallel, json_mode,
                no_progress, no_cache, executor_opt,
            )
        finally:
            lease.release()
    leave(code)


def _resume(
    store: Any,
    record: Any,
    lease: Any,
    from_steps: list[str],
    answers: dict[str, Any],
    sets: list[str],
    max_parallel: int,
    json_mode: bool,
    no_progress: bool,
    no_cache: bool,
    executor_opt: str | None,
) -> int:
    from storyflow.engine import executors
    from storyflow.engine.plan import plan
    from storyflow.engine.runs import resume_plan
    from storyflow.spec import load_workflow
    from storyflow.spec.units import did_you_mean

    wf = load_workflow(
        record.workflow_path,
        kinds=known_kinds(),
        environment=record.environment,
        sets=[*record.sets, *sets],
        # The run was validated when it started; an unchanged file needs no schema pass.
        known_valid=lambda h: h == record.source_hash or store.known_valid(h),
        parsed=store.parsed_files,
    )
    compiled = plan(wf)
    for step in from_steps:
        if step not in compiled.nodes:
            raise UsageError(
                f"--from: unknown step {step!r}",
                hint=did_you_mean(step, compiled.nodes, what="steps"),
            )
    if executor_opt is None:
        executor_opt = record.meta.get("executor")
    chosen = executors.setting(wf.executor, executor_opt)
    executors.require_dask(chosen)
    plan_ = resume_plan(store, record, compiled, from_steps)
    changed, kept, todo = plan_.changed, plan_.kept, plan_.todo
    if not json_mode:
        from storyflow.engine.runs import what_changed

        err(f"resuming run {record.run_id} ({wf.name})")
        news = what_changed(record, changed, sets)
        if news:
            err(f"  {news}")
        if plan_.removed:
            err(f"  removed: {', '.join(plan_.removed)} (no longer in the workflow file)")
        err(
            f"  kept: {len(kept)} step{'s' if len(kept) != 1 else ''}"
            + (f" · re-run or run: {', '.join(todo)}" if todo else " · nothing left to run")
        )
    previous_status = record.status
    record.status = RunStatus.RUNNING.value
    record.source_hash = wf.source_hash
    record.sets = [*record.sets, *sets]
    record.meta["steps"] = list(compiled.order)
    if executor_opt is not None:
        record.meta["executor"] = executor_opt
    record.error = None
    store.put_run(record)
    code = execute(
        store,
        wf,
        compiled,
        record,
        json_mode=json_mode,
        progress=not no_progress,
        max_parallel=max_parallel,
        previous=plan_.previous,
        forced=plan_.forced,
        answers=answers,
        no_cache=no_cache,
        resumed={"kept": kept, "rerun": todo, "changed": changed},
        previous_status=previous_status,
        lease=lease,
        executor=chosen,
    )
    return code


def execute(
    store: Any,
    wf: Any,
    compiled: Any,
    record: Any,
    *,
    json_mode: bool,
    progress: bool,
    max_parallel: int,
    previous: Any = None,
    forced: frozenset[str] = frozenset(),
    resumed: dict[str, Any] | None = None,
    previous_status: str | None = None,
    lease: Any = None,
    answers: dict[str, Any] | None = None,
    no_cache: bool = False,
    executor: Any = None,
) -> int:
    """Hold the lease, run the plan with events to the log and the display; the exit code."""
    import asyncio

    from storyflow.agents.python_agent import set_thread_pool_size
    from storyflow.engine.executors import LOCAL_SETTING, open_executor
    from storyflow.engine.lifecycle import RunLife
    from storyflow.engine.runner import Options, Runner
    from storyflow.engine.runs import end_run
    from storyflow.store import EventLog
    from storyflow.ui.progress import make_sink

    lease = lease or store.acquire_lease(record.run_id)
    stopping = Stopping(store, record, debug=G.debug)
    stopping.install(lease)  # SIGINT/SIGTERM are ours until the exit
    log = EventLog(store.run_dir(record.run_id) / "events.jsonl")
    ui = make_sink(json_mode=json_mode, progress=progress, stream=sys.stdout)

    display = [ui]

    def sink(event: dict[str, Any]) -> None:
        log.write(event)
        if display:
            try:
                display[0](event)
            except BrokenPipeError:
                # `storyflow run … | head`: the reader left. The run goes on, logged.
                display.clear()
                silence_stdout()

    set_thread_pool_size(max_parallel)
    chosen = executor or LOCAL_SETTING
    where = open_executor(chosen, private=(Path(store.root),), verbose=G.debug)
    # Every secret leaves the process environment, declared or named like one (a child
    # workflow's agents load later): python steps run in this process. The run's private
    # copy keeps them for the agents that declare them, and for redaction.
    from storyflow.engine.secrets import take_secrets

    environ = dict(os.environ)
    take_secrets(os.environ, {n for a in wf.agents.values() for n in a.secrets})
    options = Options(
        environ=environ,
        max_parallel=max_parallel,
        forced=forced,
        previous=previous or {},
        clock=store.clock,
        heartbeat=lease.heartbeat,
        answers=answers or {},
        no_cache=no_cache,
        ask=terminal_ask(ui) if not json_mode and interactive() else None,
        executor=where,
    )
    runner = Runner(wf, compiled, store, record, sink, options)
    loop = asyncio.new_event_loop()
    stopping.attach(loop, runner.interrupt, settled=runner.done.is_set)
    head: dict[str, Any] = {
        "workflow": wf.name,
        "steps": len(compiled),
        "inputs": record.inputs,
        "workflow_version": wf.version,
    }
    life = RunLife(resumed_from=previous_status)
    started = store.clock()

    async def drive() -> Any:
        """Start the executor, run, stop the executor (a cluster it started goes too)."""
        failed: StepFailure | None = None
        try:
            described = await where.start()
        except StepFailure as exc:
            failed, described = exc, {"kind": chosen.kind}
            if chosen.address:
                described["address"] = chosen.address
        if chosen.kind != "local":
            head["executor"] = described
        if resumed is not None:
            runner.emit(EventType.RUN_RESUMED, **head, **resumed)
        else:
            runner.emit(EventType.RUN_STARTED, **head)
        if failed is not None:
            return runner.fail_to_start(failed)
        try:
            return await runner.execute()
        finally:
            await where.close()

    lost: list[BaseException] = []

    def on_loop_error(loop_: Any, context: dict[str, Any]) -> None:
        # A task that died of an error nothing awaited (a step's, in the runner): no
        # traceback unless --debug, and the run cannot have succeeded.
        exc = context.get("exception")
        if G.debug or not isinstance(exc, BaseException):
            loop_.default_exception_handler(context)
        else:
            lost.append(exc)

    try:
        loop.set_exception_handler(on_loop_error)
        result = loop.run_until_complete(drive())
        if lost:
            raise lost[0]
        end_run(runner.emit, store, record, result, life, started)
    except BaseException as exc:
        # Whatever went wrong, the run must not stay `running` with no holder.
        from storyflow.engine.runs import end_crashed

        report = end_crashed(store, record, exc, sink, started)
        if report is not None and not G.debug:
            raise report from exc
        raise
    finally:
        stopping.detach()
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())  # closes LLM connections
        finally:
            loop.close()
        if display:
            try:
                ui.close()
            except BrokenPipeError:
                silence_stdout()
        log.close()
        lease.release()
    if not json_mode and result.status is RunStatus.SUCCEEDED and wf.artifacts:
        folder = store.run_dir(record.run_id)
        for rel in wf.artifacts:
            typer.echo(f"artifact: {folder / rel}")
    if not json_mode and result.status is RunStatus.WAITING:
        print_questions(record.run_id, result.waiting or [])
    elif not json_mode and result.status is not RunStatus.SUCCEEDED:
        if result.error:
            err(f"error: {result.error['message']}")
            if result.error.get("hint"):
                err(f"  hint: {result.error['hint']}")
        err(f"  continue with: storyflow resume {record.run_id}")
    if result.status is RunStatus.SUCCEEDED:
        return EXIT_OK
    if result.status is RunStatus.WAITING:
        return EXIT_WAITING
    if result.status is RunStatus.INTERRUPTED:
        return stopping.code
    return EXIT_FAILED


def leave(code: int) -> NoReturn:
    """Exit with ``code``; the run's outcome is decided, so a signal from here on is
    ignored (it would turn a success into -2/-15). A synchronous python callable
    cancelled by a timeout or a signal still runs in its worker thread (threads cannot
    be stopped), and Python would wait for it at exit: everything is committed and
    closed by now, so leave without waiting."""
    ignore_signals()
    agent = sys.modules.get("storyflow.agents.python_agent")
    if agent is not None and agent.calls_in_flight():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)
