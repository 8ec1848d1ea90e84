"""The critical path: the chain of step instances that determined a run's wall time.

Walk back from the instance that ended last. Each instance's predecessor is the one
that, ending last, let it become ready:

- when the workflow's plan is known (``deps``: instance id → the instance ids it
  needs), the dependency that ended last before it became ready;
- otherwise, the sibling (same map, same loop, or the top level) with the latest end
  no later than its ready time.

A map item or a loop iteration's step with no such predecessor inherits its map's or
loop's. An entry's time from ready to its first attempt is *waiting for a slot* when
the instance was queued behind a full limit (``--max-parallel``, a pool), else
*scheduling latency*. A map or a loop on the path stands for its instance that ended last, so the
path lists only instances that did work, and their segments add up to the wall time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from storyflow.report._model import CriticalPath, InstanceReport, PathEntry

_TOLERANCE_S = 1e-3
"""Clock slack allowed between a predecessor's end and the ready time it caused."""


def critical_path(
    instances: Sequence[InstanceReport],
    deps: Mapping[str, Sequence[str]] | None,
    *,
    start_at: float,
    end_at: float,
) -> CriticalPath:
    """The critical path through ``instances`` of a run that ran from ``start_at`` to ``end_at``.

    ``deps`` maps an instance id to the ids it depends on, where the plan says so; an
    instance missing from it (or ``deps`` None) is placed by timings alone.
    """
    done = {i.id: i for i in instances if i.ended_at is not None}
    order = {i.id: n for n, i in enumerate(instances)}
    # A map or loop that has not ended cannot hold the path: its parts stand alone.
    parent_of = {i.id: i.parent if i.parent in done else None for i in done.values()}
    children: dict[str | None, list[InstanceReport]] = {}
    for inst in done.values():
        children.setdefault(parent_of[inst.id], []).append(inst)

    def last(group: Sequence[InstanceReport]) -> InstanceReport:
        return max(group, key=lambda i: (_end(i), order[i.id]))

    def leaf(inst: InstanceReport) -> InstanceReport:
        while children.get(inst.id):
            inst = last(children[inst.id])
        return inst

    def predecessor(inst: InstanceReport, seen: set[str]) -> InstanceReport | None:
        current: InstanceReport | None = inst
        while current is not None:
            limit = _ready(current) + _TOLERANCE_S
            if deps is not None and current.id in deps:
                group = [done[d] for d in deps[current.id] if d in done]
            else:
                siblings = children[parent_of[current.id]]
                group = [s for s in siblings if s is not current]
            group = [c for c in group if _end(c) <= limit and leaf(c).id not in seen]
            if group:
                return leaf(last(group))
            up = parent_of[current.id]
            current = None if up is None else done[up]
        return None

    tops = children.get(None, [])
    if not tops:
        return CriticalPath((), max(0.0, end_at - start_at), _source(deps))
    chain = [leaf(last(tops))]
    seen = {chain[0].id}
    while (prev := predecessor(chain[-1], seen)) is not None:
        chain.append(prev)
        seen.add(prev.id)
    chain.reverse()

    entries = []
    prev_end = start_at
    for inst in chain:
        b1 = max(prev_end, _ready(inst))
        b2 = max(b1, inst.first_started_at if inst.first_started_at is not None else b1)
        b3 = max(b2, inst.last_started_at if inst.last_started_at is not None else b2)
        b4 = max(b3, _end(inst))
        held = b2 - b1  # ready → first attempt: a full limit's queue, or scheduling latency
        entries.append(PathEntry(
            inst.id, inst.step, b1 - prev_end, held if inst.queued else 0.0, b3 - b2, b4 - b3,
            latency_s=0.0 if inst.queued else held, queued=inst.queued,
        ))
        prev_end = b4
    return CriticalPath(tuple(entries), max(0.0, end_at - prev_end), _source(deps))


def _end(inst: InstanceReport) -> float:
    assert inst.ended_at is not None
    return inst.ended_at


def _ready(inst: InstanceReport) -> float:
    """When it became ready; an instance that never was (skipped) settled at its end."""
    for t in (inst.ready_at, inst.first_started_at, inst.ended_at):
        if t is not None:
            return t
    raise AssertionError("an instance on the path has an end")  # pragma: no cover


def _source(deps: Mapping[str, Sequence[str]] | None) -> str:
    return "timings" if deps is None else "plan"
