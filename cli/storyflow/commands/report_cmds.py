"""`storyflow report`: timings, retries, tokens, cost and the critical path of one run."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

    Per step instance: status, attempts, time waiting for a slot (behind a full
    --max-parallel or pool) and scheduling latency, running time, retries by error class,
    the agent that served it, tokens and cost. Per agent: calls, p50/p95 latency,
    failures, breaker openings. Per worker of a run on a Dask cluster: steps run, busy
    time, failures. The critical path is the chain of steps that set the wall time, with
    each one's share and advice naming the cause of the time lost. `--format html` writes
    one self-contained page (timeline, workflow graph, failures, child runs);
    `--format junit` one test case per step instance.
    """
    from storyflow.store import Store

    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint="use " + ", ".join(FORMATS))
    with Store(state_dir()) as store:
        record = pick_run(store, run_ref, last)
        # The HTML page holds the child runs of sub-workflow steps too.
        rep = _report_of(store, record, children=fmt == "html", seen=set())
    text = _render(rep, fmt, to_file=bool(output))
    if output is None:
        if text is not None:
            typer.echo(text, nl=False)
        return
    try:
        output.write_text(text or "", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
    err(f"report written to {output}")


MAX_DEPTH = 8
"""Child runs nested deeper than this are not reported in the parent's page."""


def _report_of(store: Any, record: Any, *, children: bool, seen: set[str], depth: int = 0) -> Any:
    """The report of one run, with its child runs' reports when ``children``."""
    from storyflow import report as rp
    from storyflow.store import instance_records, read_events

    seen.add(record.run_id)
    ids, records = instance_records(store, record)
    log = store.run_path(record.run_id) / "events.jsonl"
    events = list(read_events(log)) if log.exists() else []
    unseen = {ev["step"] for ev in events if isinstance(ev.get("step"), str)} - set(records)
    records.update(store.get_steps(record.run_id, sorted(unseen)))
    shape = _plan_of(record, [*ids, *records])
    kids = []
    linked = record.meta.get("children") or {}
    if children and depth < MAX_DEPTH and isinstance(linked, Mapping):
        for child_id in linked.values():
            child = store.get_run(str(child_id))
            if child is not None and child.run_id not in seen:
                kids.append(_report_of(store, child, children=True, seen=seen, depth=depth + 1))
    return rp.build_report(
        record, records, events, now=time.time(), order=ids, deps=shape.deps,
        agents=shape.agents, graph=shape.graph, levels=shape.levels, edges=shape.edges,
        children=kids,
    )


def _render(rep: Any, fmt: str, *, to_file: bool) -> str | None:
    """The report as text; None when it was printed already (tables on a terminal)."""
    from storyflow import report as rp

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


@dataclass(frozen=True, slots=True)
class _Shape:
    """What the workflow file tells about a run's plan (all empty when it changed)."""

    deps: dict[str, list[str]] | None = None
    """Instance id → the instance ids it needs."""
    agents: dict[str, str] | None = None
    """Step path → its own agent (or its kind)."""
    graph: str | None = None
    """The plan as text."""
    levels: tuple[tuple[str, ...], ...] = ()
    """Top-level steps by plan level."""
    edges: tuple[tuple[str, str], ...] = ()
    """(step, needed step), loop bodies' as ``loop.step``."""


def _plan_of(record: Any, ids: Sequence[str]) -> _Shape:
    """Dependencies, own agents, levels and the graph from the run's workflow file — only
    when the file is still there and unchanged since the run started (else empty)."""
    from storyflow.commands.spec_cmds import known_kinds
    from storyflow.engine.plan import plan
    from storyflow.errors import StoryflowError
    from storyflow.spec import load_workflow
    from storyflow.ui.graph import render

    path = Path(record.workflow_path)
    if not path.is_file():
        return _Shape()
    try:
        wf = load_workflow(
            path, kinds=known_kinds(), environment=record.environment, sets=record.sets
        )
    except (StoryflowError, OSError):
        return _Shape()
    if wf.source_hash != record.source_hash:
        return _Shape()
    compiled = plan(wf)
    deps: dict[str, list[str]] = {}
    agents: dict[str, str] = {}
    edges: list[tuple[str, str]] = []
    for sid, node in compiled.nodes.items():
        deps[sid] = list(node.deps)
        edges += [(sid, d) for d in node.deps]
        if node.step.agent or node.step.uses:
            agents[sid] = str(node.step.agent or node.step.uses)
        for bid, inner in (node.body.nodes.items() if node.body else ()):
            edges += [(f"{sid}.{bid}", f"{sid}.{d}") for d in inner.deps]
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
    return _Shape(deps, agents, render(compiled, "text"),
                  tuple(tuple(level) for level in compiled.levels()), tuple(edges))
