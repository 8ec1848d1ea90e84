"""Commands that read one run from the store: show, logs (`runs` lists them all:
`storyflow.commands.runs_cmds`; what `show` prints: `storyflow.commands.show_doc`)."""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from storyflow.commands import runs_cmds  # noqa: F401  (registers `runs` before `show`)
from storyflow.commands.app import app, guarded, pick_run, state_dir
from storyflow.commands.show_doc import as_seen, show_document, show_text, step_text, warn
from storyflow.errors import UsageError

__all__ = ["as_seen", "logs", "show", "show_document"]


@app.command()
@guarded
def show(
    run_ref: str | None = typer.Argument(
        None, help="Run id or a unique prefix.", show_default=False
    ),
    last: bool = typer.Option(False, "--last", help="Show the newest run."),
    step: str | None = typer.Option(None, "--step", help="Show one step in full."),
    output: str | None = typer.Option(None, "--output", help="Print one run output, raw."),
    json_mode: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One run: steps, statuses, attempts, durations, outputs, errors.

    A run on a Dask cluster (--executor dask) also names the worker that ran each
    step's latest attempt. A run made by `storyflow fork` or `replay` names the run it
    was made from and what changed, and marks the steps the fork kept from it.
    --step prints one step in full, with the request its latest attempt sent.
    """
    from storyflow.spec.units import did_you_mean
    from storyflow.store import Store

    damaged: dict[str, Any] = {}  # step records that do not read back
    with Store(state_dir()) as store:
        record = as_seen(store, pick_run(store, run_ref, last))
        doc = show_document(store, record, damaged)
    warn((d.describe(), f"storyflow resume {record.run_id} runs it again; "
          "`storyflow doctor` checks the whole store") for d in damaged.values())
    if output is not None:
        if output not in doc["outputs"]:
            raise UsageError(
                f"run {record.run_id} has no output {output!r}",
                hint=did_you_mean(output, doc["outputs"], what="outputs")
                or "the run has no outputs (it may not have succeeded)",
            )
        value = doc["outputs"][output]
        typer.echo(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        return
    if step is not None:
        match = [s for s in doc["steps"] if s["id"] == step]
        if not match:
            raise UsageError(
                f"run {record.run_id} has no step {step!r}",
                hint=did_you_mean(step, [s["id"] for s in doc["steps"]], what="steps"),
            )
        if json_mode:
            typer.echo(json.dumps(match[0], indent=2, ensure_ascii=False))
        else:
            typer.echo("\n".join(step_text(match[0], doc["forked_from"])))
        return
    if json_mode:
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    typer.echo("\n".join(show_text(doc, damaged)))


@app.command()
@guarded
def logs(
    run_ref: str | None = typer.Argument(
        None, help="Run id or a unique prefix.", show_default=False
    ),
    last: bool = typer.Option(False, "--last", help="The newest run's log."),
    step: str | None = typer.Option(
        None, "--step",
        help="Only this step's events (a map's items, a loop's iterations), with the text "
        "it streamed.",
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing as the run goes on."),
    json_mode: bool = typer.Option(False, "--json", help="Raw JSON lines."),
) -> None:
    """The run's event log: what happened to each step, the lines its code printed or
    logged (stdout, stderr, logging, context.log), and under a failed attempt of a python
    step the traceback of its code. With --step, the text an llm step streamed, as it was
    written. --follow streams it live, as the run goes on, and ends with it (or when the
    process running it is gone)."""
    import sys

    from storyflow.engine.runs import top_run
    from storyflow.store import Store, follow_events, read_events
    from storyflow.ui.progress import JsonSink, PlainSink, follows

    with Store(state_dir()) as store:
        record = pick_run(store, run_ref, last)
        if step is not None:
            _check_step(store, record, step)
        path = store.run_path(record.run_id) / "events.jsonl"
        # With --step the step's streamed text is printed as it was written (JSON: its
        # step.delta events); the whole log leaves the text out.
        sink = (JsonSink(sys.stdout, deltas=step is not None) if json_mode
                else PlainSink(sys.stdout, tracebacks=True, follow=step))

        def wanted(ev: dict[str, Any]) -> bool:
            return (
                step is None
                or follows(step, str(ev.get("step")))
                or (ev.get("type", "").startswith("run.") and ev.get("type") != "run.summary")
            )

        if not follow:
            if path.exists():
                for ev in read_events(path):
                    if wanted(ev):
                        sink(ev)
            sink.close()
            return
        last_check = [0.0]
        gone = [False]

        def finished() -> bool:
            """The run ended, or the process running it is gone (killed, crashed): its
            record says ``running`` until `resume` or `cancel` closes it."""
            now = time.monotonic()
            if now - last_check[0] < 0.5:
                return False
            last_check[0] = now
            current = store.get_run(record.run_id)
            if current is None or current.status != "running":
                return True
            holder = store.holder(top_run(store, current).run_id)
            gone[0] = holder is not None and not holder.alive  # None: not yet taken
            return gone[0]

        try:
            while not path.exists() and not finished():
                time.sleep(0.1)
            if path.exists():
                for ev in follow_events(path, stop=finished):
                    if wanted(ev):
                        sink(ev)
        finally:
            sink.close()  # ends a text cut short (the run gone, or Ctrl-C) with its line
        if gone[0]:
            warn([(f"run {record.run_id} stopped: the process running it is gone "
                   "(killed or crashed)", f"storyflow resume {record.run_id} continues it")])


def _check_step(store: Any, record: Any, step: str) -> None:
    """``--step`` names a step of the run: an instance it has, or a step inside one (a
    loop's body). A live run may yet start a loop's body steps: not checked."""
    from storyflow.engine.runs import view
    from storyflow.spec.units import did_you_mean
    from storyflow.store import instance_records
    from storyflow.ui.progress import follows

    ids, _ = instance_records(store, record, {})
    if any(follows(step, iid) for iid in ids) or view(store, record).status == "running":
        return
    names = {seg.partition("#")[0].partition("[")[0] for iid in ids for seg in iid.split(".")}
    raise UsageError(f"run {record.run_id} has no step {step!r}",
                     hint=did_you_mean(step, names, what="steps"))
