"""Commands that read the store: runs, show, logs."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import typer

from storyflow.commands.app import app, err, guarded, pick_run, state_dir
from storyflow.errors import UsageError


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _dur(start: float | None, end: float | None) -> str:
    from storyflow.ui.progress import format_duration

    if start is None or end is None:
        return "-"
    return format_duration(max(0.0, end - start))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _dump(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


@app.command()
@guarded
def runs(
    status: str | None = typer.Option(None, "--status", help="Only runs with this status."),
    workflow: str | None = typer.Option(None, "--workflow", help="Only runs of this workflow."),
    limit: int = typer.Option(20, "--limit", min=1, help="At most this many runs."),
    all_runs: bool = typer.Option(
        False, "--all", help="Every run in one flat list, sub-workflow runs included."
    ),
    json_mode: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List runs, newest first: each run with its sub-workflow runs nested under it
    (--status, --workflow and --limit apply to the top-level runs); --all lists every
    run flat. DURATION is the time the run's processes ran. A run whose process is gone
    (killed, crashed) shows as interrupted (holder gone): resume continues it."""
    from storyflow.events import RunStatus
    from storyflow.spec.units import did_you_mean
    from storyflow.store import Store

    valid = [s.value for s in RunStatus]
    if status is not None and status not in valid:
        raise UsageError(f"unknown status {status!r}", hint=did_you_mean(status, valid))
    with Store(state_dir()) as store:
        listing = store.read_runs()  # also names damaged records and runs with none left
        docs = _run_docs(store, listing.records, status, workflow, limit, flat=all_runs)
    notes = listing.notes()
    if json_mode or not docs:
        if json_mode:
            typer.echo(json.dumps(docs, indent=2))
        elif status or workflow:
            typer.echo("no runs match")
        elif not notes:
            typer.echo("no runs yet — start one with: storyflow run FILE")
        _warn(notes)
        return
    from storyflow.ui.progress import format_duration

    rows: list[list[str]] = []

    def add(doc: dict[str, Any], depth: int) -> None:
        took = doc["duration_s"]
        rows.append([
            ("  " * depth + "└ " if depth else "") + doc["run_id"],
            doc["workflow"],
            doc["status"] + (" (holder gone)" if doc["holder_gone"] else ""),
            _when(doc["created_at"]),
            "-" if took is None else format_duration(took),
        ])
        for child in doc.get("children", ()):
            add(child, depth + 1)

    for doc in docs:
        add(doc, 0)
    header = ["RUN", "WORKFLOW", "STATUS", "STARTED", "DURATION"]
    if all_runs and any(d["parent_run"] for d in docs):  # flat: children name their parent
        header.append("PARENT")
        for row, d in zip(rows, docs, strict=True):
            row.append(f"{d['parent_run']} ({d['parent_step']})" if d["parent_run"] else "")
    typer.echo(_table(rows, header))
    _warn(notes)


def _warn(notes: list[tuple[str, str]]) -> None:
    """Print what a damaged store could not list: ``warning:`` lines, each with a hint."""
    for warning, hint in notes:
        err(f"warning: {warning}")
        err(f"  hint: {hint}")


def _run_docs(store: Any, records: list[Any], status: str | None, workflow: str | None,
              limit: int, *, flat: bool) -> list[dict[str, Any]]:
    """The `runs --json` shape (schemas/runs.schema.json): top-level runs, newest first,
    each with its child runs (oldest first) under ``children``; ``flat``: every run."""
    from storyflow.engine.runs import view

    by_id = {r.run_id: r for r in records}

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

    def doc(r: Any, top: Any, nested: bool) -> dict[str, Any]:
        seen = view(store, r, top)
        out: dict[str, Any] = {
            "run_id": r.run_id, "workflow": r.workflow, "status": seen.status,
            "holder_gone": seen.holder_gone, "created_at": r.created_at,
            "ended_at": r.ended_at,
            "duration_s": None if seen.active_s is None else round(seen.active_s, 3),
            "parent_run": r.parent_run, "parent_step": r.parent_step,
        }
        if nested:
            out["children"] = [doc(c, top, True) for c in kids.get(r.run_id, ())]
        return out

    docs: list[dict[str, Any]] = []
    for r in records:
        if len(docs) >= limit:
            break
        if (workflow is not None and r.workflow != workflow) or (
            not flat and r.parent_run in by_id
        ):
            continue
        d = doc(r, top_of(r), not flat)
        if status is None or d["status"] == status:
            docs.append(d)
    return docs


def as_seen(store: Any, record: Any) -> Any:
    """``record`` as a reader should see it, changed in memory only (never saved): a
    ``running`` run whose process is gone (killed, crashed) is ``interrupted``."""
    from storyflow.engine.runs import top_run, view

    if view(store, record).holder_gone:
        record.status = "interrupted"
        record.error = record.error or {
            "class": "cancelled",
            "message": "the process running it is gone (holder gone: killed or crashed); "
            f"continue with: storyflow resume {top_run(store, record).run_id}",
        }
    return record


def instance_records(
    store: Any, record: Any, damaged: dict[str, Any] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """Every step instance of a run in display order — a map's items and a loop's
    iterations right after it — and the records the store has for them. A record that
    does not read back is left out, and named in ``damaged`` (instance id → `Damage`)."""
    top = record.meta.get("steps", [])
    bad: dict[str, Any] = {} if damaged is None else damaged

    def read(ids: list[str]) -> dict[str, Any]:
        found, lost = store.read_steps(record.run_id, ids)
        bad.update(lost)
        return dict(found)

    steps = read(top)
    ids: list[str] = []

    def walk(sid: str) -> None:
        ids.append(sid)
        rec = steps.get(sid)
        if rec is None:
            return
        children: list[str] = []
        count = rec.meta.get("items")
        if isinstance(count, int) and count > 0:  # a map: its items
            children = [f"{sid}[{i}]" for i in range(count)]
        n, body = rec.meta.get("iterations"), rec.meta.get("body")
        if isinstance(n, int) and isinstance(body, list):  # a loop: its iterations
            children = [f"{sid}#{k}.{b}" for k in range(1, n + 1) for b in body]
        if children:
            steps.update(read(children))
            for child in children:
                walk(child)

    for sid in top:
        walk(sid)
    return ids, steps


def show_document(
    store: Any, record: Any, damaged: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `show --json` shape (schemas/show.schema.json). A step whose record does not
    read back shows as ``pending`` (`resume` runs it again) with the damage as its
    error, and is named in ``damaged`` (instance id → `Damage`)."""
    from storyflow.store import Damage, RunRecord

    bad: dict[str, Any] = {} if damaged is None else damaged
    ids, steps = instance_records(store, record, bad)
    children = []
    for step_id, child_id in (record.meta.get("children") or {}).items():
        child = store.read_run(child_id)
        status = (child.status if isinstance(child, RunRecord)
                  else "damaged record" if isinstance(child, Damage) else "pending")
        children.append({"step": step_id, "run_id": child_id, "status": status})
    out_steps = []
    for sid in ids:
        rec = steps.get(sid)
        if rec is None:  # not started, or its record is damaged: resume runs it
            error = None if sid not in bad else {
                "class": "permanent", "message": f"{bad[sid].describe()}; resume runs it again"}
            out_steps.append({
                "id": sid, "status": "pending", "attempts": 0, "output": None, "error": error,
                "started_at": None, "ended_at": None, "duration_s": None, "agent": None,
                "degraded": False,
            })
            continue
        duration = (
            rec.ended_at - rec.started_at
            if rec.ended_at is not None and rec.started_at is not None
            else None
        )
        entry: dict[str, Any] = {
            "id": sid,
            "status": rec.status,
            "attempts": rec.attempts,
            "output": rec.output,
            "error": rec.error,
            "started_at": rec.started_at,
            "ended_at": rec.ended_at,
            "duration_s": duration,
            "agent": rec.agent,
            "degraded": rec.degraded,
        }
        if isinstance(rec.meta.get("iterations"), int):
            entry["iterations"] = rec.meta["iterations"]
            if isinstance(rec.meta.get("best"), int):
                entry["best_iteration"] = rec.meta["best"]
        if isinstance(rec.meta.get("usage"), dict):
            entry["usage"] = rec.meta["usage"]
        if isinstance(rec.meta.get("worker"), str) and rec.meta["worker"]:
            entry["worker"] = rec.meta["worker"]  # the executor worker of its latest attempt
        out_steps.append(entry)
    return {
        "run_id": record.run_id,
        "workflow": record.workflow,
        "workflow_version": record.workflow_version,
        "workflow_path": record.workflow_path,
        "status": record.status,
        "inputs": record.inputs,
        "environment": record.environment,
        "created_at": record.created_at,
        "ended_at": record.ended_at,
        "parent_run": record.parent_run,
        "parent_step": record.parent_step,
        "children": children,
        "waiting": record.meta.get("waiting") or [],
        "error": record.error,
        "steps": out_steps,
        "outputs": record.outputs or {},
        "run_dir": str(store.run_dir(record.run_id)),
    }


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
    step's latest attempt.
    """
    from storyflow.spec.units import did_you_mean
    from storyflow.store import Store

    damaged: dict[str, Any] = {}  # step records that do not read back
    with Store(state_dir()) as store:
        record = as_seen(store, pick_run(store, run_ref, last))
        doc = show_document(store, record, damaged)
    _warn([(d.describe(), f"storyflow resume {record.run_id} runs it again; "
            "`storyflow doctor` checks the whole store") for d in damaged.values()])
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
            return
        s = match[0]
        typer.echo(
            f"step {s['id']}: {s['status']} · {s['attempts']} attempt(s)"
            f" · {_dur(s['started_at'], s['ended_at'])}"
            + (f" · degraded (served by {s['agent']})" if s["degraded"] else "")
            + (f" · on worker {s['worker']}" if s.get("worker") else "")
        )
        if s["error"]:
            typer.echo(f"error: {s['error']['class']}: {s['error']['message']}")
            if s["error"].get("hint"):
                typer.echo(f"  hint: {s['error']['hint']}")
            if s["error"].get("traceback"):  # the user's code that failed, its frames only
                tb = s["error"]["traceback"].splitlines()
                typer.echo("\n".join(f"  {line}".rstrip() for line in tb))
        if s["output"] is not None:
            typer.echo("output:")
            typer.echo(_dump(s["output"]))
        return
    if json_mode:
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    typer.echo(
        f"run {doc['run_id']} · {doc['workflow']}"
        + (f" v{doc['workflow_version']}" if doc["workflow_version"] else "")
        + f" · {doc['status']}"
    )
    typer.echo(
        f"started {_when(doc['created_at'])} · {_dur(doc['created_at'], doc['ended_at'])}"
        f" · {doc['run_dir']}"
    )
    if doc["parent_run"]:
        typer.echo(f"child of run {doc['parent_run']} (step {doc['parent_step']})")
    child_of = {c["step"]: c for c in doc["children"]}
    asks = {q["step"]: q for q in doc["waiting"]}
    rows = []
    for s in doc["steps"]:
        note = ""
        if s["id"] in child_of:
            c = child_of[s["id"]]
            note = f"child run {c['run_id']} ({c['status']})"
        elif s["id"] in asks:
            note = f"waiting: {asks[s['id']]['question']}"[:70]
        elif s["id"] in damaged:
            note = f"damaged record: {damaged[s['id']].reason}"[:70]
        elif s["error"]:
            note = f"{s['error']['class']}: {s['error']['message']}"[:70]
        elif s["degraded"]:
            note = f"degraded (served by {s['agent']})"
        elif "iterations" in s:
            n = s["iterations"]
            note = f"{n} iteration{'s' if n != 1 else ''}"
            if "best_iteration" in s and s["best_iteration"] != n:
                note += f", keeps #{s['best_iteration']}"
        if s.get("usage") and s["usage"].get("calls"):
            u = s["usage"]
            note = (note + " · " if note else "") + f"{u['tokens']} tokens, {u['cost']:.4f}"
        shown = "damaged" if s["id"] in damaged else s["status"]
        rows.append(
            [s["id"], shown, str(s["attempts"]), _dur(s["started_at"], s["ended_at"]), note]
        )
    header = ["STEP", "STATUS", "ATTEMPTS", "DURATION", "NOTE"]
    if any(s.get("worker") for s in doc["steps"]):  # some steps ran on a cluster's workers
        from storyflow.ui.lines import worker_label

        header.insert(4, "WORKER")
        for row, s in zip(rows, doc["steps"], strict=True):
            row.insert(4, worker_label(s["worker"]) if s.get("worker") else "-")
    typer.echo(_table(rows, header))
    if doc["error"]:
        typer.echo(f"error: {doc['error']['message']}")
    for name, value in doc["outputs"].items():
        text = _dump(value)
        typer.echo(f"output {name}: " + (text if len(text) < 200 else text[:200] + "…"))


@app.command()
@guarded
def logs(
    run_ref: str | None = typer.Argument(
        None, help="Run id or a unique prefix.", show_default=False
    ),
    last: bool = typer.Option(False, "--last", help="The newest run's log."),
    step: str | None = typer.Option(None, "--step", help="Only this step's events."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing as the run goes on."),
    json_mode: bool = typer.Option(False, "--json", help="Raw JSON lines."),
) -> None:
    """The run's event log: what happened to each step, the lines its code printed or
    logged (stdout, stderr, logging, context.log), and under a failed attempt of a python
    step the traceback of its code. --follow streams it live, as the run goes on."""
    import sys

    from storyflow.store import Store, follow_events, read_events
    from storyflow.ui.progress import JsonSink, PlainSink

    with Store(state_dir()) as store:
        record = pick_run(store, run_ref, last)
        path = store.run_dir(record.run_id) / "events.jsonl"
        sink = JsonSink(sys.stdout) if json_mode else PlainSink(sys.stdout, tracebacks=True)

        def wanted(ev: dict[str, Any]) -> bool:
            return (
                step is None
                or ev.get("step") == step
                or (ev.get("type", "").startswith("run.") and ev.get("type") != "run.summary")
            )

        if not follow:
            if path.exists():
                for ev in read_events(path):
                    if wanted(ev):
                        sink(ev)
            return
        last_check = [0.0]

        def finished() -> bool:
            now = time.monotonic()
            if now - last_check[0] < 0.5:
                return False
            last_check[0] = now
            current = store.get_run(record.run_id)
            return current is None or current.status != "running"

        while not path.exists() and not finished():
            time.sleep(0.1)
        if path.exists():
            for ev in follow_events(path, stop=finished):
                if wanted(ev):
                    sink(ev)
