"""Build a `RunDiff` from what two runs left behind: their records and artifacts.

A pure function of its arguments: the command reads the store (each run's records
once, with `storyflow.store.instance_records`) and the run folders, and hands over
plain values; tests hand over made-up ones. Linear in the number of instances.

Instances are matched by id (``draft[3]``, ``polish#2.revise``), so runs of different
workflows compare step by step too. They are listed in A's order, each instance only B
has placed after the last instance before it that both have.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storyflow.compare._model import (
    SAME,
    ArtifactDiff,
    Change,
    FieldDiff,
    Lineage,
    Pair,
    RunDiff,
    RunSide,
    StepDiff,
    Summary,
    Totals,
)
from storyflow.compare._structure import json_changes, same, value_diff

RUN_FIELDS = ("workflow", "workflow_path", "workflow_version", "source_hash", "environment",
              "status")
"""Run-level fields compared (ids and times always differ: not compared)."""


@dataclass(frozen=True, slots=True)
class RunRecords:
    """One run as the store gave it."""

    record: Any
    """Its `RunRecord` (status as a reader should see it)."""
    ids: Sequence[str]
    """Every step instance, in display order."""
    steps: Mapping[str, Any]
    """Instance id → its `StepRecord` (an instance not started has none)."""


def selects(step: str, instance_id: str) -> bool:
    """Whether ``--step STEP`` takes ``instance_id``: the instance itself, a map's
    items (``draft[2]``), a loop's iterations (``polish#2.revise``), an iteration's
    steps (``polish#2`` takes ``polish#2.revise``); ``polish.revise`` takes that step of
    every iteration, at any depth (``outer.inner.x`` takes ``outer#1.inner#2.x``; a
    loop named with its iteration, ``outer#1.inner.x``, only that one's)."""
    if instance_id == step or instance_id.startswith((step + "[", step + "#", step + ".")):
        return True
    if "." not in step:
        return False
    *loops, last = step.split(".")
    pattern = "".join(re.escape(p) + ("" if "#" in p else r"#\d+") + r"\." for p in loops)
    return re.fullmatch(pattern + re.escape(last) + r"([\[#.].*)?", instance_id) is not None


def build_diff(a: RunRecords, b: RunRecords, *, artifacts: Sequence[ArtifactDiff] = (),
               step: str | None = None) -> RunDiff:
    """What differs between runs A and B; with ``step``, only the instances it selects
    (see `selects`)."""
    ra, rb = a.record, b.record
    order = merged_order(a.ids, b.ids)
    if step is not None:
        order = [i for i in order if selects(step, i)]
    in_a, in_b = set(a.ids), set(b.ids)
    steps = tuple(
        _step(i, a.steps.get(i), b.steps.get(i), i in in_a, i in in_b, ra.run_id, rb.run_id)
        for i in order
    )
    fields = tuple(FieldDiff(name, getattr(ra, name), getattr(rb, name))
                   for name in RUN_FIELDS if getattr(ra, name) != getattr(rb, name))
    inputs = json_changes(ra.inputs, rb.inputs)
    sets = _sets(ra.sets, rb.sets)
    shown = tuple(artifacts)
    counts = {k: sum(1 for s in steps if s.change == k)
              for k in ("equal", "changed", "only_a", "only_b")}
    steps_differ = any(not s.equal for s in steps)
    run_differs = bool(fields or inputs or sets) or any(f.change != "same" for f in shown)
    summary = Summary(
        equal=counts["equal"], changed=counts["changed"], only_a=counts["only_a"],
        only_b=counts["only_b"], kept=sum(1 for s in steps if s.origin == "kept"),
        outputs_differ=tuple(s.id for s in steps if not s.output.same),
        differs=steps_differ if step is not None else steps_differ or run_differs,
    )
    return RunDiff(
        a=_side(ra), b=_side(rb), fields=fields, inputs=inputs, sets=sets,
        lineage=lineage(ra, rb), step=step, steps=steps,
        totals=Pair(_totals(steps, "a"), _totals(steps, "b")),
        artifacts=shown, summary=summary,
    )


def merged_order(ids_a: Sequence[str], ids_b: Sequence[str]) -> list[str]:
    """Every instance of A then B's own, each right after the last shared one before it."""
    in_a = set(ids_a)
    after: dict[str | None, list[str]] = {}
    last: str | None = None
    for iid in ids_b:
        if iid in in_a:
            last = iid
        else:
            after.setdefault(last, []).append(iid)
    out: list[str] = []
    seen: set[str] = set()
    for iid in [*after.get(None, ()), *(x for i in ids_a for x in (i, *after.get(i, ())))]:
        if iid not in seen:
            seen.add(iid)
            out.append(iid)
    return out


def _step(iid: str, ra: Any, rb: Any, in_a: bool, in_b: bool,
          run_a: str, run_b: str) -> StepDiff:
    if in_a and in_b:
        fa, fb = (ra.forked_from if ra else None), (rb.forked_from if rb else None)
        kept = fb == run_a or fa == run_b or (fa is not None and fa == fb)
        origin = "kept" if kept else "rerun"
    else:
        origin = "only_a" if in_a else "only_b"
    status = Pair(_status(ra, in_a), _status(rb, in_b))
    out_a, out_b = (ra.output if ra else None), (rb.output if rb else None)
    output = SAME if out_a is out_b else value_diff(out_a, out_b)
    error = Pair(ra.error if ra else None, rb.error if rb else None)
    fingerprint = _compared(ra and ra.fingerprint, rb and rb.fingerprint)
    request = _compared(ra and ra.request, rb and rb.request)
    if not (in_a and in_b):
        change = origin
    elif (status.same and output.same and _same_error(error.a, error.b)
          and fingerprint != "different" and request != "different"):
        change = "equal"
    else:
        change = "changed"
    ua, ub = _usage(ra), _usage(rb)
    return StepDiff(
        id=iid, change=change, origin=origin, kind=_kind(ra or rb),
        kinds=Pair(_kind(ra), _kind(rb)), status=status,
        fingerprint=fingerprint, request=request, output=output, error=error,
        attempts=Pair(_attempts(ra, in_a), _attempts(rb, in_b)),
        duration_s=Pair(_duration(ra), _duration(rb)),
        tokens=Pair(ua[0], ub[0]), cost=Pair(ua[1], ub[1]),
    )


def _status(rec: Any, present: bool) -> str | None:
    if rec is not None:
        return str(rec.status)
    return "pending" if present else None  # listed, not started (or its record is lost)


def _attempts(rec: Any, present: bool) -> int | None:
    return rec.attempts if rec is not None else (0 if present else None)


def _compared(a: Any, b: Any) -> str | None:
    if not a or not b:
        return None
    return "same" if same(a, b) else "different"


def _same_error(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Errors compared by class and message (a traceback's paths and lines may move)."""
    if a is None or b is None:
        return a is b
    return bool(a.get("class") == b.get("class") and a.get("message") == b.get("message"))


def _kind(rec: Any) -> str:
    meta = rec.meta if rec is not None else {}
    if isinstance(meta.get("items"), int):
        return "map"
    return "loop" if isinstance(meta.get("iterations"), int) else "task"


def _duration(rec: Any) -> float | None:
    if rec is None or rec.started_at is None or rec.ended_at is None:
        return None
    return max(0.0, float(rec.ended_at - rec.started_at))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _usage(rec: Any) -> tuple[int | None, float | None]:
    """(tokens, cost) the record's ``meta["usage"]`` reports; None for no usage, and
    a cost of None when it is not known (``cost`` null, or ``priced`` false)."""
    usage = rec.meta.get("usage") if rec is not None else None
    if not isinstance(usage, Mapping):
        return None, None
    tokens = _number(usage.get("tokens"))
    if tokens is None:
        parts = [_number(usage.get(k)) for k in ("input_tokens", "output_tokens")]
        tokens = sum(p for p in parts if p is not None)
    cost = _number(usage.get("cost"))
    if usage.get("priced") is False:
        cost = None
    return int(tokens), cost


def _totals(steps: Sequence[StepDiff], side: str) -> Totals:
    """One side's figures: maps and loops are made of other instances, not counted twice."""
    present = [s for s in steps if getattr(s.status, side) is not None]
    tasks = [s for s in present if getattr(s.kinds, side) == "task"]
    costs = [(getattr(s.tokens, side), getattr(s.cost, side)) for s in tasks]
    return Totals(
        instances=len(present),
        attempts=sum(getattr(s.attempts, side) or 0 for s in tasks),
        tokens=sum(t or 0 for t, _ in costs),
        cost=sum(c or 0.0 for _, c in costs),
        cost_known=all(c is not None for t, c in costs if t is not None),
        duration_s=sum(getattr(s.duration_s, side) or 0.0 for s in tasks),
    )


def _sets(a: Iterable[str], b: Iterable[str]) -> tuple[Change, ...]:
    """``--set`` overrides by path (the last one of a path wins, as for the run)."""
    da, db = _by_path(a), _by_path(b)
    out = [Change(p, "removed", a=v) if p not in db else Change(p, "changed", a=v, b=db[p])
           for p, v in da.items() if db.get(p) != v]
    out += [Change(p, "added", b=v) for p, v in db.items() if p not in da]
    return tuple(out)


def _by_path(sets: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in sets:
        path, _, value = text.partition("=")
        out[path.strip()] = value
    return out


def lineage(a: Any, b: Any) -> Lineage:
    """How B relates to A: made from it (fork or replay), A from B, or both from one run."""
    if b.forked_from is not None and b.forked_from == a.run_id:
        return _made("b_from_a", a.run_id, b.fork)
    if a.forked_from is not None and a.forked_from == b.run_id:
        return _made("a_from_b", b.run_id, a.fork)
    if a.forked_from is not None and a.forked_from == b.forked_from:
        return Lineage("siblings", parent=a.forked_from)
    return Lineage("unrelated")


def _made(relation: str, parent: str, fork: Any) -> Lineage:
    info = fork if isinstance(fork, Mapping) else {}

    def names(key: str) -> tuple[str, ...]:
        value = info.get(key)
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    kind, file = info.get("kind"), info.get("file")
    return Lineage(relation, parent=parent, kind=kind if isinstance(kind, str) else "fork",
                   steps=names("from"), inputs=names("inputs"), sets=names("sets"),
                   file=file if isinstance(file, str) else None)


def _side(rec: Any) -> RunSide:
    ended = rec.ended_at
    return RunSide(
        run_id=rec.run_id, workflow=rec.workflow, workflow_version=rec.workflow_version,
        workflow_path=rec.workflow_path, source_hash=rec.source_hash, status=str(rec.status),
        environment=rec.environment, inputs=dict(rec.inputs), sets=tuple(rec.sets),
        created_at=rec.created_at, ended_at=ended,
        wall_s=None if ended is None else max(0.0, ended - rec.created_at),
        forked_from=rec.forked_from, fork=rec.fork,
    )
