"""Executing a run in this process: the lease, signals, the display, the event log,
the executor, and the exit code — for run, resume, fork and replay."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from storyflow.commands.answers import interactive, print_questions, terminal_ask
from storyflow.commands.app import G, err, silence_stdout
from storyflow.commands.stopping import Stopping, ignore_signals
from storyflow.errors import EXIT_FAILED, EXIT_OK, EXIT_WAITING, StepFailure
from storyflow.events import EventType, RunStatus


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
    origin: str | None = None,
    replay: Any = None,
    head_extra: dict[str, Any] | None = None,
    follow: str | None = None,
    stream_events: bool = False,
) -> int:
    """Hold the lease, run the plan with events to the log and the display; the exit code.
    ``origin``: the run a fork keeps from; ``replay``: the `ReplayBook` answering calls;
    ``head_extra``: more fields for the start event. ``follow``: the step whose streamed
    text the display shows in full; ``stream_events``: ``--json`` carries ``step.delta``."""
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
    ui = make_sink(json_mode=json_mode, progress=progress, stream=sys.stdout, follow=follow,
                   stream_events=stream_events)

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
        origin=origin,
        replay=replay,
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
    if record.forked_from is not None:
        head["forked_from"], head["fork"] = record.forked_from, record.fork
    head.update(head_extra or {})
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
        if replay is not None:  # counted over every process of the run
            counts, before = replay.counts(), record.meta.get("replay") or {}
            for key in ("answered", "live", "missed"):
                counts[key] += int(before.get(key, 0)) if resumed is not None else 0
            record.meta["replay"] = counts
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
        stopping.defer_to_leaving()  # a second signal: the watchdog says so and exits
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


def check_follow(step: str | None, compiled: Any) -> None:
    """``--follow STEP`` names a step of the plan (a loop's own steps included)."""
    from storyflow.errors import UsageError
    from storyflow.spec.units import did_you_mean

    if step is None:
        return
    known: list[str] = []
    todo = [compiled]
    while todo:
        plan = todo.pop()
        for sid, node in plan.nodes.items():
            known.append(sid)
            if node.body is not None:
                todo.append(node.body)
    if step not in known and not any(step.startswith((k + "[", k + "#"))
                                     for k in known):
        raise UsageError(f"--follow: unknown step {step!r}",
                         hint=did_you_mean(step, known, what="steps"))
