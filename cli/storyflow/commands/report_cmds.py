"""`storyflow report`: timings, retries, tokens, cost and the critical path of one run."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from storyflow.commands.app import app, err, guarded, pick_run, state_dir
from storyflow.errors import UsageError

FORMATS = ("table", "json", "html", "junit")
_ITERATION = re.compile(r"(?P<loop>[^\[#]+)#(?P<n>\d+)\.(?P<step>[^\[#]+)")


@app.command()
@guarded
def report(
    run_ref: str | None = typer.Argument(
        None, help="Run id or a unique prefix.", show_default=False
    ),
    last: bool = typer.Option(False, "--last", help="Report on the newest run."),
    fmt: str = typer.Option("table", "--format", help="table, json, html or junit."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the report to this file instead of stdout."
    ),
) -> None:
    """Timings, retries, tokens, cost, critical path and timeline of one run.

    Per step instance: status, attempts, time waiting for a slot, running time, retries
    by error class, the agent that served it, tokens and cost. Per agent: calls, p50/p95
    latency, failures, breaker openings. Per worker of a run on a Dask cluster: steps
    run, busy time, failures. The critical path is the chain of steps that
    set the wall time, with each one's share. `--format html` writes one self-contained
    page with a timeline; `--format junit` one test case per step instance.
    """
    from storyflow.commands.inspect_cmds import instance_records
    from storyflow.store import Store, read_events

    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint="use " + ", ".join(FORMATS))
    with Store(state_dir()) as store:
        record = pick_run(store, run_ref, last)
        ids, records = instance_records(store, record)
        log = store.run_dir(record.run_id) / "events.jsonl"
        events = list(read_events(log)) if log.exists() else []
        unseen = {ev["step"] for ev in events if isinstance(ev.get("step"), str)} - set(records)
        records.update(store.get_steps(record.run_id, sorted(unseen)))
    deps, agents, graph = _plan_of(record, [*ids, *records])
    text = _render(record, records, events, ids, deps, agents, graph, fmt, to_file=bool(output))
    if output is None:
        if text is not None:
            typer.echo(text, nl=False)
        return
    try:
        output.write_text(text or "", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
    err(f"report written to {output}")


def _render(
    record: Any,
    records: Mapping[str, Any],
    events: list[dict[str, Any]],
    ids: Sequence[str],
    deps: Mapping[str, Sequence[str]] | None,
    agents: Mapping[str, str] | None,
    graph: str | None,
    fmt: str,
    *,
    to_file: bool,
) -> str | None:
    """The report as text; None when it was printed already (tables on a terminal)."""
    from storyflow import report as rp

    rep = rp.build_report(
        record, records, events, now=time.time(), order=ids, deps=deps, agents=agents,
        graph=graph,
    )
    if fmt == "json":
        return json.dumps(rp.to_document(rep), indent=2, ensure_ascii=False) + "\n"
    if fmt == "html":
        return rp.render_html(rep)
    if fmt == "junit":
        return rp.render_junit(rep)
    from storyflow.ui.tables import plain_text, print_sections

    if to_file:
        return plain_text(rp.sections(rep))
    print_sections(rp.sections(rep))
    return None


def _plan_of(
    record: Any, ids: Sequence[str]
) -> tuple[dict[str, list[str]] | None, dict[str, str] | None, str | None]:
    """Dependencies, own agents and the graph from the run's workflow file — only when the
    file is still there and unchanged since the run started (else all None)."""
    from storyflow.commands.spec_cmds import known_kinds
    from storyflow.engine.plan import plan
    from storyflow.errors import StoryflowError
    from storyflow.spec import load_workflow
    from storyflow.ui.graph import render

    path = Path(record.workflow_path)
    if not path.is_file():
        return None, None, None
    try:
        wf = load_workflow(
            path, kinds=known_kinds(), environment=record.environment, sets=record.sets
        )
    except (StoryflowError, OSError):
        return None, None, None
    if wf.source_hash != record.source_hash:
        return None, None, None
    compiled = plan(wf)
    deps: dict[str, list[str]] = {}
    agents: dict[str, str] = {}
    for sid, node in compiled.nodes.items():
        deps[sid] = list(node.deps)
        if node.step.agent or node.step.uses:
            agents[sid] = str(node.step.agent or node.step.uses)
        for bid, inner in (node.body.nodes.items() if node.body else ()):
            if inner.step.agent or inner.step.uses:
                agents[f"{sid}.{bid}"] = str(inner.step.agent or inner.step.uses)
    for iid in ids:
        match = _ITERATION.fullmatch(iid)
        loop = compiled.nodes.get(match["loop"]) if match else None
        if match is None or loop is None or loop.body is None:
            continue
        body_node = loop.body.nodes.get(match["step"])
        if body_node is None:
            continue
        n = match["n"]
        if body_node.deps or n == "1":
            # A later iteration's first steps follow the previous iteration: timings tell.
            deps[iid] = [f"{match['loop']}#{n}.{d}" for d in body_node.deps]
    return deps, agents, render(compiled, "text")
