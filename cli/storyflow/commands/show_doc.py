"""What `show` prints, and the small text helpers `runs` and `show` share.

`show_document` builds the `show --json` shape (schemas/show.schema.json) from the
store; `show_text` and `step_text` render it for people. A run made by `storyflow fork`
or `storyflow replay` names its parent and fork point (`origin_text`), and the step
instances the fork kept are marked; `request_lines` prints a step's recorded request
with multi-line prompts as blocks of text, not as one escaped JSON line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

# --- Text helpers ------------------------------------------------------------------------


def when(ts: float | None) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS``; ``-`` for None."""
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def dur(start: float | None, end: float | None) -> str:
    """The time from ``start`` to ``end`` for people; ``-`` when either is unknown."""
    from storyflow.ui.progress import format_duration

    if start is None or end is None:
        return "-"
    return format_duration(max(0.0, end - start))


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns two spaces apart, no trailing blanks."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def dump(value: Any) -> str:
    """A value for people: a string as it is, anything else as indented JSON."""
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


def warn(notes: Iterable[tuple[str, str]]) -> None:
    """Print what a damaged store could not list: ``warning:`` lines, each with a hint."""
    from storyflow.commands.app import err

    for warning, hint in notes:
        err(f"warning: {warning}")
        err(f"  hint: {hint}")


# --- Lineage: forks and replays -------------------------------------------------------------


def fork_doc(raw: Any) -> dict[str, Any] | None:
    """A run record's ``fork`` in the documented shape (``kind``, ``from``, ``inputs``,
    ``sets``, ``file``), whatever a record holds: missing or mistyped parts are left
    empty, so a damaged or older record never breaks a listing."""
    if not isinstance(raw, dict):
        return None

    def names(key: str) -> list[str]:
        value = raw.get(key)
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    kind = raw.get("kind")
    file = raw.get("file")
    return {
        "kind": kind if kind in ("fork", "replay") else "fork",
        "from": names("from"),
        "inputs": names("inputs"),
        "sets": names("sets"),
        "file": file if isinstance(file, str) and file else None,
        **({"env": raw["env"]} if isinstance(raw.get("env"), str) else {}),
        **({"strict": raw["strict"]} if isinstance(raw.get("strict"), bool) else {}),
    }


def parent_text(doc: dict[str, Any]) -> str:
    """``fork of RUN`` / ``replay of RUN``, with ``(gone)`` when the parent was removed;
    empty for a run that was not made from another."""
    parent = doc.get("forked_from")
    if not parent:
        return ""
    kind = (doc.get("fork") or {}).get("kind", "fork")
    return f"{kind} of {parent}" + (" (gone)" if doc.get("forked_from_gone") else "")


def origin_text(doc: dict[str, Any]) -> str:
    """`parent_text` and the fork point: ``fork of RUN: --from editor; inputs changed:
    tone; settings: seed=8; file: /path``."""
    head = parent_text(doc)
    fork = doc.get("fork")
    if not head or not fork:
        return head
    parts = []
    if fork["from"]:
        parts.append("--from " + ", ".join(fork["from"]))
    if fork["inputs"]:
        parts.append("inputs changed: " + ", ".join(fork["inputs"]))
    if fork["sets"]:
        parts.append("settings: " + ", ".join(fork["sets"]))
    if fork["file"]:
        parts.append(f"file: {fork['file']}")
    return head + (": " + "; ".join(parts) if parts else "")


def status_text(step: dict[str, Any], run_parent: str | None) -> str:
    """A step's status, with ``(kept)`` when the fork copied it from its parent run
    (``(kept from RUN)`` when it came from another run than the parent)."""
    kept = step.get("forked_from")
    if not kept:
        return str(step["status"])
    return f"{step['status']} (kept{'' if kept == run_parent else f' from {kept}'})"


# --- A step's recorded request ---------------------------------------------------------------


def _inline(value: Any) -> str | None:
    """``value`` on one line, or None when it reads better as a block."""
    if isinstance(value, str):
        if "\n" in value and value.strip():
            return None  # text: printed as a block, line by line
        plain = value and value.strip() == value and "\n" not in value
        return value if plain else json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if not value:  # an empty list or mapping
        return "[]" if isinstance(value, list) else "{}"
    return None


def _block(value: Any, indent: int) -> list[str]:
    """``value`` as indented lines: a mapping key by key, a list item by item (``- ``),
    a multi-line string line by line, as it reads, nothing escaped."""
    pad = " " * indent
    if isinstance(value, str):
        return [(pad + line).rstrip() for line in value.rstrip("\n").split("\n")]
    if isinstance(value, dict):
        out: list[str] = []
        for key, item in value.items():
            one = _inline(item)
            if one is not None:
                out.append(f"{pad}{key}: {one}")
            else:
                out.append(f"{pad}{key}:")
                out.extend(_block(item, indent + 2))
        return out
    if isinstance(value, list):
        out = []
        for item in value:
            one = _inline(item)
            if one is not None:
                out.append(f"{pad}- {one}")
                continue
            lines = _block(item, indent + 2)
            if isinstance(item, str):  # a multi-line string: its lines under a bare dash
                out.append(f"{pad}-")
                out.extend(lines)
            else:
                out.append(f"{pad}- {lines[0][indent + 2:]}" if lines else f"{pad}-")
                out.extend(lines[1:])
        return out
    return [pad + json.dumps(value, ensure_ascii=False, default=str)]


def request_lines(request: dict[str, Any]) -> list[str]:
    """``request:`` and what the step's latest attempt asked its agent: ``uses``, the
    rendered inputs (prompt included) and the output schema, if any."""
    shown = {k: v for k, v in request.items() if not (k == "output_schema" and v is None)}
    return ["request:", *_block(shown, 2)]


# --- show ---------------------------------------------------------------------------------


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


def _step_entry(sid: str, rec: Any) -> dict[str, Any]:
    duration = (
        rec.ended_at - rec.started_at
        if rec.ended_at is not None and rec.started_at is not None
        else None
    )
    entry: dict[str, Any] = {
        "id": sid, "status": rec.status, "attempts": rec.attempts, "output": rec.output,
        "error": rec.error, "started_at": rec.started_at, "ended_at": rec.ended_at,
        "duration_s": duration, "agent": rec.agent, "degraded": rec.degraded,
    }
    if isinstance(rec.meta.get("iterations"), int):
        entry["iterations"] = rec.meta["iterations"]
        if isinstance(rec.meta.get("best"), int):
            entry["best_iteration"] = rec.meta["best"]
    if isinstance(rec.meta.get("usage"), dict):
        entry["usage"] = rec.meta["usage"]
    if isinstance(rec.meta.get("worker"), str) and rec.meta["worker"]:
        entry["worker"] = rec.meta["worker"]  # the executor worker of its latest attempt
    if rec.forked_from:
        entry["forked_from"] = rec.forked_from  # kept by a fork: copied, not run
    if rec.request is not None:
        entry["request"] = rec.request
    return entry


def show_document(
    store: Any, record: Any, damaged: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `show --json` shape (schemas/show.schema.json). A step whose record does not
    read back shows as ``pending`` (`resume` runs it again) with the damage as its
    error, and is named in ``damaged`` (instance id → `Damage`)."""
    from storyflow.store import Damage, RunRecord

    bad: dict[str, Any] = {} if damaged is None else damaged
    from storyflow.store import instance_records

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
        if rec is not None:
            out_steps.append(_step_entry(sid, rec))
            continue
        # not started, or its record is damaged: resume runs it
        error = None if sid not in bad else {
            "class": "permanent", "message": f"{bad[sid].describe()}; resume runs it again"}
        out_steps.append({
            "id": sid, "status": "pending", "attempts": 0, "output": None, "error": error,
            "started_at": None, "ended_at": None, "duration_s": None, "agent": None,
            "degraded": False,
        })
    parent = record.forked_from
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
        "forked_from": parent,
        "fork": fork_doc(record.fork),
        "forked_from_gone": bool(parent) and store.read_run(parent) is None,
        "children": children,
        "waiting": record.meta.get("waiting") or [],
        "error": record.error,
        "steps": out_steps,
        "outputs": record.outputs or {},
        "run_dir": str(store.run_path(record.run_id)),
    }


def _note(s: dict[str, Any], doc: dict[str, Any], damaged: dict[str, Any]) -> str:
    child_of = {c["step"]: c for c in doc["children"]}
    asks = {q["step"]: q for q in doc["waiting"]}
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
    return note


def show_text(doc: dict[str, Any], damaged: dict[str, Any]) -> list[str]:
    """`show RUN` for people: the header (workflow, status, when, where, what it was made
    from), the steps table, the run's error and outputs."""
    lines = [
        f"run {doc['run_id']} · {doc['workflow']}"
        + (f" v{doc['workflow_version']}" if doc["workflow_version"] else "")
        + f" · {doc['status']}",
        f"started {when(doc['created_at'])} · {dur(doc['created_at'], doc['ended_at'])}"
        f" · {doc['run_dir']}",
    ]
    if doc["parent_run"]:
        lines.append(f"child of run {doc['parent_run']} (step {doc['parent_step']})")
    if doc.get("forked_from"):
        lines.append(origin_text(doc))
    rows = []
    for s in doc["steps"]:
        shown = "damaged" if s["id"] in damaged else status_text(s, doc.get("forked_from"))
        rows.append([s["id"], shown, str(s["attempts"]), dur(s["started_at"], s["ended_at"]),
                     _note(s, doc, damaged)])
    header = ["STEP", "STATUS", "ATTEMPTS", "DURATION", "NOTE"]
    if any(s.get("worker") for s in doc["steps"]):  # some steps ran on a cluster's workers
        from storyflow.ui.lines import worker_label

        header.insert(4, "WORKER")
        for row, s in zip(rows, doc["steps"], strict=True):
            row.insert(4, worker_label(s["worker"]) if s.get("worker") else "-")
    lines.append(table(rows, header))
    if doc["error"]:
        lines.append(f"error: {doc['error']['message']}")
    for name, value in doc["outputs"].items():
        text = dump(value)
        lines.append(f"output {name}: " + (text if len(text) < 200 else text[:200] + "…"))
    return lines


def step_text(s: dict[str, Any], run_parent: str | None) -> list[str]:
    """`show RUN --step STEP` for people: status line, error (hint, traceback), output,
    then the request its latest attempt sent, in full."""
    lines = [
        f"step {s['id']}: {status_text(s, run_parent)} · {s['attempts']} attempt(s)"
        f" · {dur(s['started_at'], s['ended_at'])}"
        + (f" · degraded (served by {s['agent']})" if s["degraded"] else "")
        + (f" · on worker {s['worker']}" if s.get("worker") else "")
    ]
    if s["error"]:
        lines.append(f"error: {s['error']['class']}: {s['error']['message']}")
        if s["error"].get("hint"):
            lines.append(f"  hint: {s['error']['hint']}")
        if s["error"].get("traceback"):  # the user's code that failed, its frames only
            lines += [f"  {line}".rstrip() for line in s["error"]["traceback"].splitlines()]
    if s["output"] is not None:
        lines += ["output:", dump(s["output"])]
    if isinstance(s.get("request"), dict):
        lines += request_lines(s["request"])
    return lines
