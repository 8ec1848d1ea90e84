"""The diff as a JSON document (`diff --format json`, schemas/diff.schema.json)."""

from __future__ import annotations

from typing import Any

from storyflow.compare._model import (
    ArtifactDiff,
    Change,
    Pair,
    RunDiff,
    RunSide,
    StepDiff,
    TextDiff,
    Totals,
    ValueDiff,
)


def to_document(diff: RunDiff) -> dict[str, Any]:
    """The whole diff as plain JSON values."""
    return {
        "a": _side(diff.a),
        "b": _side(diff.b),
        "fields": [{"field": f.name, "a": f.a, "b": f.b} for f in diff.fields],
        "inputs": [change_doc(c) for c in diff.inputs],
        "sets": [change_doc(c) for c in diff.sets],
        "lineage": {
            "relation": diff.lineage.relation, "parent": diff.lineage.parent,
            "kind": diff.lineage.kind, "from": list(diff.lineage.steps),
            "inputs": list(diff.lineage.inputs), "sets": list(diff.lineage.sets),
            "file": diff.lineage.file,
        },
        "step": diff.step,
        "steps": [_step(s) for s in diff.steps],
        "totals": _totals(diff),
        "artifacts": [_artifact(f) for f in diff.artifacts],
        "summary": {
            "equal": diff.summary.equal, "changed": diff.summary.changed,
            "only_a": diff.summary.only_a, "only_b": diff.summary.only_b,
            "kept": diff.summary.kept, "outputs_differ": list(diff.summary.outputs_differ),
            "differs": diff.summary.differs,
        },
    }


def change_doc(change: Change) -> dict[str, Any]:
    out: dict[str, Any] = {"path": change.path, "change": change.change}
    if change.change != "added":
        out["a"] = change.a
    if change.change != "removed":
        out["b"] = change.b
    return out


def text_doc(diff: TextDiff) -> dict[str, Any]:
    return {"unit": diff.unit, "removed": diff.removed, "added": diff.added,
            "segments": [[op, text] for op, text in diff.segments]}


def _side(side: RunSide) -> dict[str, Any]:
    return {
        "run_id": side.run_id, "workflow": side.workflow,
        "workflow_version": side.workflow_version, "workflow_path": side.workflow_path,
        "source_hash": side.source_hash, "status": side.status,
        "environment": side.environment, "inputs": side.inputs, "sets": list(side.sets),
        "created_at": side.created_at, "ended_at": side.ended_at, "wall_s": _r(side.wall_s),
        "forked_from": side.forked_from, "fork": side.fork,
    }


def _pair(pair: Pair[Any]) -> dict[str, Any]:
    return {"a": pair.a, "b": pair.b}


def _output(value: ValueDiff) -> dict[str, Any]:
    out: dict[str, Any] = {"same": value.same, "kind": value.kind}
    if value.text is not None:
        out["text"] = text_doc(value.text)
    if value.kind == "json":
        out["changes"] = [change_doc(c) for c in value.changes]
    return out


def _error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"class": str(error.get("class")), "message": str(error.get("message"))}


def _step(step: StepDiff) -> dict[str, Any]:
    return {
        "id": step.id, "change": step.change, "origin": step.origin, "kind": step.kind,
        "status": _pair(step.status), "fingerprint": step.fingerprint,
        "request": step.request, "output": _output(step.output),
        "error": {"a": _error(step.error.a), "b": _error(step.error.b)},
        "attempts": _pair(step.attempts),
        "duration_s": {"a": _r(step.duration_s.a), "b": _r(step.duration_s.b)},
        "tokens": _pair(step.tokens), "cost": _pair(step.cost),
    }


def _totals(diff: RunDiff) -> dict[str, Any]:
    ta, tb = diff.totals.a, diff.totals.b

    def side(t: Totals, wall: float | None) -> dict[str, Any]:
        return {"instances": t.instances, "attempts": t.attempts, "tokens": t.tokens,
                "cost": t.cost if t.cost_known else None, "cost_known": t.cost_known,
                "duration_s": _r(t.duration_s), "wall_s": _r(wall)}

    wa, wb = diff.a.wall_s, diff.b.wall_s
    return {
        "a": side(ta, wa), "b": side(tb, wb),
        "delta": {
            "instances": tb.instances - ta.instances, "attempts": tb.attempts - ta.attempts,
            "tokens": tb.tokens - ta.tokens,
            "cost": round(tb.cost - ta.cost, 6) if ta.cost_known and tb.cost_known else None,
            "duration_s": _r(tb.duration_s - ta.duration_s),
            "wall_s": None if wa is None or wb is None else _r(wb - wa),
        },
    }


def _artifact(f: ArtifactDiff) -> dict[str, Any]:
    return {"name": f.name, "change": f.change, "size": _pair(f.size),
            "is_text": f.text.a is not None or f.text.b is not None,
            "diff": None if f.diff is None else text_doc(f.diff)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
