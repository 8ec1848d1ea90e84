"""Commands that make a new run from a recorded one: fork and replay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from storyflow.commands import run_options as opt
from storyflow.commands.app import G, app, err, guarded, pick_run, state_dir
from storyflow.commands.executing import check_follow, execute, leave
from storyflow.commands.run_cmds import RUN_ID
from storyflow.commands.spec_cmds import known_kinds
from storyflow.errors import EXIT_FAILED, EXIT_OK, UsageError


@app.command()
@guarded
def fork(
    run_ref: str | None = typer.Argument(
        None, help="The run to fork: its id or a unique prefix.", show_default=False
    ),
    last: bool = typer.Option(False, "--last", help="Fork the newest run."),
    from_steps: list[str] = typer.Option(
        [], "--from", help="Run this step and its dependents again (repeatable)."
    ),
    inputs: list[str] = typer.Option(
        [], "-i", "--input", help="Change an input: key=value (repeatable)."
    ),
    sets: list[str] = typer.Option([], "--set", help="Override a value: path=value (repeatable)."),
    env: str | None = typer.Option(
        None, "--env", help="Apply the file's environments.NAME instead of the parent's "
        "(--env '' for none: the file as written)."
    ),
    file: Path | None = typer.Option(
        None, "--file", help="Run this workflow file instead of the parent's."
    ),
    run_id: str | None = typer.Option(None, "--run-id", help="Use this run id for the fork."),
    max_parallel: int = opt.MAX_PARALLEL,
    json_mode: bool = opt.JSON,
    follow: str | None = opt.FOLLOW,
    stream_events: bool = opt.STREAM_EVENTS,
    no_progress: bool = opt.NO_PROGRESS,
    no_cache: bool = opt.NO_CACHE,
    executor_opt: str | None = opt.EXECUTOR,
) -> None:
    """Start a new run from RUN that keeps every step the change does not reach.

    A step instance of RUN is kept (copied, not run) when its definition and rendered
    inputs are unchanged and it is not downstream of a --from step; the rest runs.
    RUN itself is never modified.
    """
    opt.check_output_flags(json_mode=json_mode, stream_events=stream_events)
    from storyflow.engine.forking import fork_plan
    from storyflow.engine.runs import view
    from storyflow.events import RunStatus
    from storyflow.spec import template_engine
    from storyflow.store import Store

    with Store(state_dir()) as store:
        parent = pick_run(store, run_ref, last)
        _refuse_child(parent, "fork")
        new_id = _new_id(store, run_id)
        path = Path(file).resolve() if file is not None else Path(parent.workflow_path)
        environment = (env or None) if env is not None else parent.environment
        all_sets = [*parent.sets, *sets]
        wf, compiled = _load(store, path, environment, all_sets, executor_opt)
        check_follow(follow, compiled)
        for step in from_steps:
            _known_step(step, compiled)
        values = _inputs(wf, parent, inputs)
        same = wf.source_hash == parent.source_hash  # same bytes, --env and --set
        before = wf if same else _parent_workflow(store, parent)
        plan = fork_plan(store, parent, wf, compiled, from_steps, inputs=values,
                         before=before, templates=template_engine())
        changed = sorted(k for k in set(values) | set(parent.inputs)
                         if values.get(k) != parent.inputs.get(k))
        lineage = {
            "kind": "fork",
            "from": list(from_steps),
            "inputs": changed,
            "sets": list(sets),
            "file": str(path) if str(path) != parent.workflow_path else None,
        }
        if environment != parent.environment:
            lineage["env"] = environment
        record = _record(store, new_id, wf, path, values, environment, all_sets, compiled,
                         parent, lineage, executor_opt, forced=plan.forced)
        if not json_mode:
            err(f"forking run {parent.run_id} ({parent.workflow}) as run {new_id}")
            edited = (str(path) == parent.workflow_path and not same
                      and (before is None or before.source_hash != parent.source_hash))
            news = _news(changed, values, sets, path, parent, edited, environment)
            if news:
                err(f"  {news}")
            if view(store, parent).status == RunStatus.RUNNING.value:
                err(f"  note: run {parent.run_id} is still running: the fork keeps only "
                    "what it has finished so far")
            for line in plan.lines():
                err(f"  {line}")
        code = _execute(store, wf, compiled, record, json_mode, no_progress, max_parallel,
                        no_cache, executor_opt, previous=plan.base.previous,
                        forced=plan.forced, origin=parent.run_id,
                        head_extra={"fork_plan": plan.summary()}, follow=follow,
                        stream_events=stream_events)
    leave(code)


@app.command()
@guarded
def replay(
    run_ref: str | None = typer.Argument(
        None, help="The recorded run: its id or a unique prefix.", show_default=False
    ),
    last: bool = typer.Option(False, "--last", help="Replay the newest run."),
    file: Path | None = typer.Option(
        None, "--file", help="Run this workflow file instead of the recorded run's."
    ),
    strict: bool = typer.Option(
        False, "--strict",
        help="Fail a call whose request the record does not have (replay_miss) instead "
        "of running it live.",
    ),
    run_id: str | None = typer.Option(None, "--run-id", help="Use this run id for the replay."),
    max_parallel: int = opt.MAX_PARALLEL,
    json_mode: bool = opt.JSON,
    follow: str | None = opt.FOLLOW,
    stream_events: bool = opt.STREAM_EVENTS,
    no_progress: bool = opt.NO_PROGRESS,
    executor_opt: str | None = opt.EXECUTOR,
) -> None:
    """Run the workflow again, answering each agent call from RUN's record.

    A call (llm request, python call, command, ...) whose rendered request equals one
    RUN recorded is answered with RUN's output — no network, no subprocess; any other
    runs live, or fails as replay_miss with --strict. Compare with: storyflow diff RUN NEW.
    """
    opt.check_output_flags(json_mode=json_mode, stream_events=stream_events)
    from storyflow.store import Store

    with Store(state_dir()) as store:
        source = pick_run(store, run_ref, last)
        _refuse_child(source, "replay")
        new_id = _new_id(store, run_id)
        path = Path(file).resolve() if file is not None else Path(source.workflow_path)
        wf, compiled = _load(store, path, source.environment, source.sets, executor_opt)
        check_follow(follow, compiled)
        values = _inputs(wf, source, [])
        book = replay_book(store, source, strict=strict)
        lineage: dict[str, Any] = {"kind": "replay", "from": [], "inputs": [], "sets": [],
                   "file": str(path) if str(path) != source.workflow_path else None,
                   "strict": strict}
        record = _record(store, new_id, wf, path, values, source.environment, source.sets,
                         compiled, source, lineage, executor_opt)
        if not json_mode:
            err(f"replaying run {source.run_id} ({source.workflow}) as run {new_id}: "
                f"{book.size} recorded answer{'s' if book.size != 1 else ''}"
                + (" (--strict: a call without one fails)" if strict else ""))
            if not book.size:
                err(f"  note: run {source.run_id} has no answer to give back (it ran before "
                    "storyflow recorded requests, or no step of it succeeded at an agent): "
                    + ("every call misses" if strict else "every call runs live"))
        code = _execute(store, wf, compiled, record, json_mode, no_progress, max_parallel,
                        False, executor_opt, replay=book, follow=follow,
                        stream_events=stream_events)
        if not json_mode:
            err(f"replay: {book.answered} call{'s' if book.answered != 1 else ''} answered "
                f"from run {source.run_id}, {book.live} live"
                + (f", {book.missed} missed" if book.missed else "")
                + f" · compare: storyflow diff {source.run_id} {new_id}")
        if strict and book.missed and code == EXIT_OK:
            # A fallback or allow_failure let the run succeed past a miss: CI still fails.
            if not json_mode:
                err(f"replay --strict: {book.missed} call{'s' if book.missed != 1 else ''} "
                    "had no recorded answer (see the replay_miss failures): exit 1")
            code = EXIT_FAILED
    leave(code)


def replay_book(store: Any, source: Any, *, strict: bool) -> Any:
    """The answers ``source`` recorded, for a replay of it (or the resume of one)."""
    from storyflow.engine.replay import ReplayBook
    from storyflow.store import instance_records

    _, records = instance_records(store, source)
    return ReplayBook.of(source.run_id, records.values(), strict=strict)


# --- shared by fork and replay ----------------------------------------------------------


def _refuse_child(record: Any, verb: str) -> None:
    if record.parent_run:
        raise UsageError(
            f"run {record.run_id} is a child run of run {record.parent_run}",
            hint=f"{verb} the parent: storyflow {verb} {record.parent_run}"
            + (f" --from {record.parent_step}" if verb == "fork" and record.parent_step
               else ""),
        )


def _new_id(store: Any, run_id: str | None) -> str:
    if run_id is None:
        return str(store.new_run_id())
    if not RUN_ID.fullmatch(run_id):
        raise UsageError(
            f"invalid run id {run_id!r}",
            hint="use letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(at most 64 characters)",
        )
    if store.get_run(run_id) is not None:
        raise UsageError(f"run {run_id} already exists", hint="choose another --run-id")
    return run_id


def _load(store: Any, path: Path, environment: str | None, sets: list[str],
          executor_opt: str | None) -> Any:
    """The workflow and its plan; a bad ``--executor`` is refused here too, before
    the new run is recorded."""
    from storyflow.engine import executors
    from storyflow.engine.plan import plan
    from storyflow.spec import load_workflow

    if not path.is_file():
        raise UsageError(f"workflow file {path} not found",
                         hint="give the workflow with --file")
    wf = load_workflow(path, kinds=known_kinds(), environment=environment, sets=sets,
                       known_valid=store.known_valid, parsed=store.parsed_files)
    store.remember_valid(wf.source_hash)
    executors.require_dask(executors.setting(wf.executor, executor_opt))
    return wf, plan(wf)


def _known_step(step: str, compiled: Any) -> None:
    from storyflow.spec.units import did_you_mean

    if step not in compiled.nodes:
        raise UsageError(f"--from: unknown step {step!r}",
                         hint=did_you_mean(step, compiled.nodes, what="steps"))


def _inputs(wf: Any, parent: Any, pairs: list[str]) -> dict[str, Any]:
    """The parent's inputs the workflow still has, then the ``-i`` changes."""
    from storyflow.spec.params import resolve_inputs

    kept = {k: v for k, v in parent.inputs.items() if k in wf.inputs}
    return resolve_inputs(wf, pairs, None, given=kept)


def _parent_workflow(store: Any, parent: Any) -> Any:
    """The parent's workflow with the parent's settings (None if it no longer loads)."""
    from storyflow.errors import StoryflowError
    from storyflow.spec import load_workflow

    try:
        return load_workflow(parent.workflow_path, kinds=known_kinds(),
                             environment=parent.environment, sets=parent.sets,
                             known_valid=store.known_valid, parsed=store.parsed_files)
    except (StoryflowError, OSError):
        return None


def _news(changed: list[str], values: dict[str, Any], sets: list[str], path: Path,
          parent: Any, edited: bool, environment: str | None) -> str:
    parts = []
    if environment != parent.environment:
        parts.append(f"environment: {environment or '(none)'}"
                     + (f" (was {parent.environment})" if parent.environment else ""))
    if changed:
        parts.append("inputs changed: " + ", ".join(f"{k}={values.get(k)!r}" for k in changed))
    if sets:
        parts.append("settings: " + ", ".join(sets))
    if str(path) != parent.workflow_path:
        parts.append(f"workflow file: {path}")
    elif edited:
        parts.append("the workflow file changed since the parent ran")
    return "; ".join(parts)


def _record(store: Any, rid: str, wf: Any, path: Path, values: dict[str, Any],
            environment: str | None, sets: list[str], compiled: Any, parent: Any,
            lineage: dict[str, Any], executor_opt: str | None,
            forced: frozenset[str] | None = None) -> Any:
    from storyflow.engine.forking import FORCED
    from storyflow.events import RunStatus
    from storyflow.store import RunRecord

    now = store.clock()
    record = RunRecord(
        run_id=rid, workflow=wf.name, workflow_path=str(path), workflow_version=wf.version,
        source_hash=wf.source_hash, status=RunStatus.RUNNING.value, inputs=values,
        environment=environment, sets=list(sets), created_at=now, updated_at=now,
        forked_from=parent.run_id, fork=lineage, meta={"steps": list(compiled.order)},
    )
    if executor_opt is not None:
        record.meta["executor"] = executor_opt
    if forced is not None:  # what a resume of the fork must not keep from the parent
        record.meta[FORCED] = sorted(forced)
    store.put_run(record)
    return record


def _execute(store: Any, wf: Any, compiled: Any, record: Any, json_mode: bool,
             no_progress: bool, max_parallel: int, no_cache: bool, executor_opt: str | None,
             **more: Any) -> int:
    from storyflow.engine import executors

    chosen = executors.setting(wf.executor, executor_opt)
    executors.require_dask(chosen)
    return execute(store, wf, compiled, record, json_mode=json_mode, progress=not no_progress,
                   max_parallel=max_parallel, no_cache=no_cache, executor=chosen, **more)


__all__ = ["G", "fork", "replay", "replay_book"]
