"""Every step instance of a run, walked from its records: a map's items and a loop's
iterations right after the step they belong to."""

from __future__ import annotations

from typing import Any

from storyflow.store._records import StepRecord


def children_of(sid: str, rec: StepRecord) -> list[str]:
    """The instance ids a map's or a loop's record says it made (none for a step)."""
    count = rec.meta.get("items")
    if isinstance(count, int) and count > 0:  # a map: its items
        return [f"{sid}[{i}]" for i in range(count)]
    n, body = rec.meta.get("iterations"), rec.meta.get("body")
    if isinstance(n, int) and isinstance(body, list):  # a loop: its iterations
        return [f"{sid}#{k}.{b}" for k in range(1, n + 1) for b in body]
    return []


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
        children = children_of(sid, rec)
        if children:
            steps.update(read(children))
            for child in children:
                walk(child)

    for sid in top:
        walk(sid)
    return ids, steps


def descendants(store: Any, run_id: str, rec: StepRecord) -> list[StepRecord]:
    """The records of every instance a map's or a loop's record made, nested ones
    included (a map in a loop's body); those the store does not have are left out."""
    out: list[StepRecord] = []
    todo = [(rec.id, rec)]
    while todo:
        sid, parent = todo.pop()
        ids = children_of(sid, parent)
        if ids:
            found = store.get_steps(run_id, ids)
            for cid in ids:
                child = found.get(cid)
                if child is not None:
                    out.append(child)
                    todo.append((cid, child))
    return out
