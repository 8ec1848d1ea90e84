"""`storyflow runs`: the runs in the store, newest first, with their lineage.

Two nestings meet here. A sub-workflow's child run lives inside its parent's process
and is always listed under it (``children``). A fork or replay is a run of its own,
made from another (``forked_from``): listed at the top level, it names its parent in
the ORIGIN column; with ``--tree`` it is listed under that parent (``forks``),
recursively. A fork whose parent was removed (`storyflow gc`) stays at the top level,
its parent marked ``(gone)``.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from storyflow.commands.app import app, guarded, state_dir
from storyflow.commands.show_doc import fork_doc, parent_text, table, warn, when
from storyflow.errors import UsageError


@app.command()
@guarded
def runs(
    status: str | None = typer.Option(None, "--status", help="Only runs with this status."),
    workflow: str | None = typer.Option(None, "--workflow", help="Only runs of this workflow."),
    limit: int = typer.Option(20, "--limit", min=1, help="At most this many runs."),
    all_runs: bool = typer.Option(
        False, "--all", help="Every run in one flat list, sub-workflow runs included."
    ),
    tree: bool = typer.Option(
        False, "--tree", help="Forks and replays under the run they were made from."
    ),
    json_mode: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List runs, newest first: each run with its sub-workflow runs nested under it
    (--status, --workflow and --limit apply to the top-level runs); --all lists every
    run flat. DURATION is the time the run's processes ran. A run whose process is gone
    (killed, crashed) shows as interrupted (holder gone): resume continues it. A run made
    by `storyflow fork` or `replay` names its parent under ORIGIN ("(gone)" once the
    parent is removed); --tree lists it under that parent instead, recursively, newest
    first (the filters and --limit then apply to the runs at the top of each tree)."""
    from storyflow.events import RunStatus
    from storyflow.spec.units import did_you_mean
    from storyflow.store import Store

    valid = [s.value for s in RunStatus]
    if status is not None and status not in valid:
        raise UsageError(f"unknown status {status!r}", hint=did_you_mean(status, valid))
    if tree and all_runs:
        raise UsageError("--tree and --all do not go together",
                         hint="--tree nests runs under their parents, --all lists them flat")
    with Store(state_dir()) as store:
        listing = store.read_runs()  # also names damaged records and runs with none left
        docs = run_docs(store, listing, status, workflow, limit, flat=all_runs, tree=tree)
    notes = listing.notes()
    if json_mode or not docs:
        if json_mode:
            typer.echo(json.dumps(docs, indent=2))
        elif status or workflow:
            typer.echo("no runs match")
        elif not notes:
            typer.echo("no runs yet — start one with: storyflow run FILE")
        warn(notes)
        return
    typer.echo(runs_table(docs, flat=all_runs))
    warn(notes)


def runs_table(docs: list[dict[str, Any]], *, flat: bool) -> str:
    """The `runs` table: a child run under its parent (``└``), with ``--tree`` a fork
    under the run it was made from (``↳``); ORIGIN when some run was made from another,
    PARENT in the flat list (``--all``) when some run is a sub-workflow's."""
    from storyflow.ui.progress import format_duration

    rows: list[list[str]] = []
    shown: list[dict[str, Any]] = []

    def add(doc: dict[str, Any], depth: int, mark: str) -> None:
        took = doc["duration_s"]
        rows.append([
            ("  " * depth + mark if depth else "") + doc["run_id"],
            doc["workflow"],
            doc["status"] + (" (holder gone)" if doc["holder_gone"] else ""),
            when(doc["created_at"]),
            "-" if took is None else format_duration(took),
        ])
        shown.append(doc)
        for child in doc.get("children", ()):
            add(child, depth + 1, "└ ")
        for fork in doc.get("forks", ()):
            add(fork, depth + 1, "↳ ")

    for doc in docs:
        add(doc, 0, "")
    header = ["RUN", "WORKFLOW", "STATUS", "STARTED", "DURATION"]
    if any(d["forked_from"] for d in shown):  # some run was made by fork or replay
        header.append("ORIGIN")
        for row, d in zip(rows, shown, strict=True):
            row.append(parent_text(d))
    if flat and any(d["parent_run"] for d in shown):  # flat: children name their parent
        header.append("PARENT")
        for row, d in zip(rows, shown, strict=True):
            row.append(f"{d['parent_run']} ({d['parent_step']})" if d["parent_run"] else "")
    return table(rows, header)


def _order(r: Any) -> tuple[float, str]:
    return (r.created_at, r.run_id)


def run_docs(store: Any, listing: Any, status: str | None, workflow: str | None,
             limit: int, *, flat: bool, tree: bool = False) -> list[dict[str, Any]]:
    """The `runs --json` shape (schemas/runs.schema.json): top-level runs, newest first,
    each with its child runs (oldest first) under ``children``; ``flat``: every run;
    ``tree``: a fork or replay under the run it was made from (``forks``, newest first)
    instead of at the top. The filters and ``limit`` apply to the runs at the top."""
    from storyflow.engine.runs import view

    records: list[Any] = listing.records
    by_id = {r.run_id: r for r in records}
    damaged = {d.run_id for d in listing.damaged}

    def top_of(r: Any) -> Any:
        seen = {r.run_id}
        while r.parent_run in by_id and r.parent_run not in seen:
            r = by_id[r.parent_run]
            seen.add(r.run_id)
        return r

    kids: dict[str, list[Any]] = {}
    for r in reversed(records):
        if r.parent_run in by_id:
            kids.setdefault(r.parent_run, []).append(r)

    def made_from(r: Any) -> Any:
        """The run ``r`` sits under in a tree: its fork parent, when listed and older (so
        no record, however odd, makes a loop); a sub-workflow run sits under its parent."""
        parent = by_id.get(r.forked_from) if tree and r.parent_run not in by_id else None
        return parent if parent is not None and _order(parent) < _order(r) else None

    forks: dict[str, list[Any]] = {}
    for r in records:  # newest first
        parent = made_from(r)
        if parent is not None:
            forks.setdefault(parent.run_id, []).append(r)

    def doc(r: Any, top: Any, nested: bool) -> dict[str, Any]:
        seen = view(store, r, top)
        out: dict[str, Any] = {
            "run_id": r.run_id, "workflow": r.workflow, "status": seen.status,
            "holder_gone": seen.holder_gone, "created_at": r.created_at,
            "ended_at": r.ended_at,
            "duration_s": None if seen.active_s is None else round(seen.active_s, 3),
            "parent_run": r.parent_run, "parent_step": r.parent_step,
            "forked_from": r.forked_from, "fork": fork_doc(r.fork),
            "forked_from_gone": bool(r.forked_from) and r.forked_from not in by_id
            and r.forked_from not in damaged,
        }
        if nested:
            out["children"] = [doc(c, top, True) for c in kids.get(r.run_id, ())]
        if tree:
            out["forks"] = [doc(f, top_of(f), True) for f in forks.get(r.run_id, ())]
        return out

    docs: list[dict[str, Any]] = []
    for r in records:
        if len(docs) >= limit:
            break
        if (workflow is not None and r.workflow != workflow) or (
            not flat and r.parent_run in by_id
        ) or made_from(r) is not None:
            continue
        d = doc(r, top_of(r), not flat)
        if status is None or d["status"] == status:
            docs.append(d)
    return docs
