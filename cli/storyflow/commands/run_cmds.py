"""Commands that execute runs: run and resume."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from storyflow.commands import run_options as opt
from storyflow.commands.answers import parse_answers
from storyflow.commands.app import app, err, guarded, pick_run, state_dir
from storyflow.commands.executing import check_follow, execute, leave
from storyflow.commands.spec_cmds import known_kinds
from storyflow.errors import UsageError
from storyflow.events import RunStatus

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
    max_parallel: int = opt.MAX_PARALLEL,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate and show the plan; run nothing."
    ),
    json_mode: bool = opt.JSON,
    follow: str | None = opt.FOLLOW,
    stream_events: bool = opt.STREAM_EVENTS,
    no_progress: bool = opt.NO_PROGRESS,
    no_cache: bool = opt.NO_CACHE,
    executor_opt: str | None = opt.EXECUTOR,
) -> None:
    """Validate, compile and run a workflow."""
    opt.check_output_flags(json_mode=json_mode, stream_events=stream_events)
    from storyflow.engine import executors
    from storyflow.engine.plan import plan
    from storyflow.spec import load_workflow
    from storyflow.spec.params import resolve_inputs

    if run_id is not None and not RUN_ID.fullmatch(run_id):
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
        check_follow(follow, compiled)
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
            follow=follow,
            stream_events=stream_events,
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
    max_parallel: int = opt.MAX_PARALLEL,
    sets: list[str] = typer.Option(
        [], "--set", help="Override a value from now on, e.g. budget.tokens=N (repeatable)."
    ),
    json_mode: bool = opt.JSON,
    follow: str | None = opt.FOLLOW,
    stream_events: bool = opt.STREAM_EVENTS,
    no_progress: bool = opt.NO_PROGRESS,
    no_cache: bool = opt.NO_CACHE,
    executor_opt: str | None = opt.EXECUTOR,
) -> None:
    """Continue a failed, interrupted or waiting run from its checkpoint."""
    opt.check_output_flags(json_mode=json_mode, stream_events=stream_events)
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
                no_progress, no_cache, executor_opt, follow, stream_events,
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
    follow: str | None,
    stream_events: bool,
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
    check_follow(follow, compiled)
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
    replay = None
    fork = record.fork or {}
    if fork.get("kind") == "replay" and record.forked_from is not None:
        source = store.get_run(record.forked_from)
        if source is not None:  # still there: the resumed replay goes on answering from it
            from storyflow.commands.fork_cmds import replay_book

            replay = replay_book(store, source, strict=bool(fork.get("strict")))
    # A fork goes on keeping from its parent what it had not reached yet.
    from storyflow.engine.forking import fork_resume

    plan_, origin = fork_resume(store, record, compiled, plan_)
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
        replay=replay,
        origin=origin,
        follow=follow,
        stream_events=stream_events,
    )
    return code


__all__ = ["RUN_ID", "execute", "leave", "resume", "run"]
