"""Build a `Report` from what a run left behind: its records and its event log.

A pure function of its arguments: the store and the workflow file are read by the
command, which hands over plain values (tests hand over made-up ones).

- Attempts come from the event log: a ``step.started`` opens one; the next
  ``step.succeeded``, ``step.retrying``, ``step.fallback``, ``step.failed`` or
  ``step.cancelled`` of the same instance closes it. A call refused by an open
  breaker has no ``step.started``: it counts as a call with no latency.
- An instance's timings use only the attempts since it last became ready, so the
  attempts of an earlier process of the run (before a resume) do not count twice;
  the per-agent figures use every attempt in the log.
- Tokens and cost are the ``usage`` a record's ``meta`` carries, zero without one;
  the budgets and what was spent under them, the run record's (``budget``, ``steps``).
- The worker of an instance is the ``worker`` its record's ``meta`` carries (the
  executor worker of its latest attempt); the per-worker figures add up those
  instances, and count the ``worker_lost`` attempts the event log names a worker for.
- The limit an instance waited behind once ready is the ``queued`` its record's
  ``meta`` carries (``max_parallel``, ``pool:NAME``): its ready → first attempt is then
  *waiting for a slot*, else *scheduling latency*.
- A sub-workflow step's child run is the run record's ``meta["children"][step]``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from storyflow.report._critical import critical_path
from storyflow.report._model import (
    AgentReport,
    Attempt,
    BudgetReport,
    InstanceReport,
    Report,
    Usage,
    WorkerReport,
)

if TYPE_CHECKING:
    from storyflow.store import RunRecord, StepRecord

INLINE = "(inline)"
"""The agent label of an inline ``uses:`` step when the workflow file is not available."""

_ENDINGS = {
    "step.succeeded": "succeeded",
    "step.retrying": "retrying",
    "step.fallback": "fallback",
    "step.failed": "failed",
    "step.cancelled": "cancelled",
}
_FAILED_OUTCOMES = frozenset({"retrying", "fallback", "failed"})
_TOLERANCE_S = 1e-3
_TOP = re.compile(r"[^\[#]+")
_INDEXES = re.compile(r"\[\d+\]|#\d+")


def parent_id(instance_id: str) -> str | None:
    """``draft[2]`` → ``draft``; ``polish#2.revise`` → ``polish``; ``plot`` → None."""
    if instance_id.endswith("]") and "[" in instance_id:
        return instance_id[: instance_id.rindex("[")]
    if "#" in instance_id:
        return instance_id[: instance_id.rindex("#")]
    return None


def step_path(instance_id: str) -> str:
    """The step an instance was made from: ``draft[2]`` → ``draft``, ``polish#2.revise``
    → ``polish.revise``."""
    return _INDEXES.sub("", instance_id)


def build_report(
    run: RunRecord,
    records: Mapping[str, StepRecord],
    events: Iterable[Mapping[str, Any]],
    *,
    now: float,
    order: Sequence[str] = (),
    deps: Mapping[str, Sequence[str]] | None = None,
    agents: Mapping[str, str] | None = None,
    graph: str | None = None,
    levels: Sequence[Sequence[str]] = (),
    edges: Sequence[tuple[str, str]] = (),
    children: Sequence[Report] = (),
) -> Report:
    """The report of ``run``.

    ``records``: the step records by instance id. ``order``: instance ids in display
    order (ids without a record are shown ``pending``; records not listed follow).
    ``deps``: instance id → the instance ids it needs, from the plan (None: unknown).
    ``agents``: step path (``draft``, ``polish.revise``) → its own agent's name, or its
    kind for an inline ``uses:`` (None: unknown). ``now`` stands in for the end of a
    run still going. ``levels``, ``edges``: the plan's top-level steps by level and its
    dependencies as (step, needed step) pairs, loop bodies' as ``loop.step`` (for the
    graph; empty: unknown). ``children``: the reports of its child runs.
    """
    ids = list(dict.fromkeys([*order, *sorted(records)]))
    by_step: dict[str, list[Mapping[str, Any]]] = {}
    openings: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for ev in events:
        if ev.get("type") == "breaker.opened" and isinstance(ev.get("agent"), str):
            openings[ev["agent"]] += 1
        if (worker := _lost_worker(ev)) is not None:
            lost[worker] += 1
        step = ev.get("step")
        if isinstance(step, str) and isinstance(ev.get("ts"), int | float):
            by_step.setdefault(step, []).append(ev)
    parents = {parent_id(i) for i in ids}
    linked = run.meta.get("children") if isinstance(run.meta, Mapping) else None
    child_runs = {str(k): str(v) for k, v in linked.items()} if isinstance(linked, Mapping) else {}

    instances: list[InstanceReport] = []
    calls: dict[str, list[Attempt]] = {}
    spent: dict[str, Usage] = {}
    for iid in ids:
        rec = records.get(iid)
        kind = _kind(iid, rec, parents, ids)
        if rec is None:
            instances.append(_pending(iid, kind))
            continue
        evs = by_step.get(iid, [])
        own = _own_agent(iid, rec, evs, agents)
        attempts = _attempts(evs, own) if kind == "task" else []
        for a in attempts:
            calls.setdefault(a.agent, []).append(a)
        inst = _instance(iid, kind, rec, attempts, own, child_runs.get(iid))
        if kind == "task" and inst.agent is not None:
            spent[inst.agent] = spent.get(inst.agent, Usage()) + inst.usage
        instances.append(inst)

    running = run.status == "running" or run.ended_at is None
    end_at = now if running else float(run.ended_at or now)
    start_at = float(run.created_at)
    return Report(
        run_id=run.run_id,
        workflow=run.workflow,
        workflow_version=run.workflow_version,
        status=str(run.status),
        started_at=start_at,
        ended_at=None if running else end_at,
        wall_s=max(0.0, end_at - start_at),
        instances=tuple(instances),
        agents=_agents(calls, spent, openings),
        critical_path=critical_path(instances, deps, start_at=start_at, end_at=end_at),
        graph=graph,
        workers=_workers(instances, lost),
        levels=tuple(tuple(level) for level in levels),
        edges=tuple((str(a), str(b)) for a, b in edges),
        children=tuple(children),
        budgets=_budgets(run.meta.get("usage") if isinstance(run.meta, Mapping) else None),
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values``, interpolated linearly; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _kind(iid: str, rec: StepRecord | None, parents: set[str | None], ids: list[str]) -> str:
    meta = rec.meta if rec is not None else {}
    if "iterations" in meta:
        return "loop"
    if "items" in meta:
        return "map"
    if iid in parents:  # no record, but instances of it: its items or its iterations
        return "loop" if any(i.startswith(iid + "#") for i in ids) else "map"
    return "task"


def _pending(iid: str, kind: str) -> InstanceReport:
    return InstanceReport(
        id=iid, step=_top(iid), parent=parent_id(iid), kind=kind, status="pending",
        attempts=0, agent=None, degraded=False, ready_at=None, first_started_at=None,
        last_started_at=None, ended_at=None, error_class=None, error_message=None,
    )


def _top(iid: str) -> str:
    match = _TOP.match(iid)
    return match.group() if match else iid


def _own_agent(
    iid: str, rec: StepRecord, evs: Sequence[Mapping[str, Any]], agents: Mapping[str, str] | None
) -> str:
    """The step's own agent (not a fallback): from the plan, else as the log and record tell."""
    if agents is not None:
        found = agents.get(step_path(iid))
        if found is not None:
            return found
    for ev in evs:
        if ev.get("type") == "step.fallback" and isinstance(ev.get("agent"), str):
            return str(ev["agent"])
    if rec.agent and not rec.degraded:
        return rec.agent
    return INLINE


def _attempts(evs: Sequence[Mapping[str, Any]], own: str) -> list[Attempt]:
    out: list[Attempt] = []
    serving = own
    opened: tuple[int, float, str] | None = None
    for ev in evs:
        type_ = ev.get("type")
        ts = float(ev["ts"])
        raw_agent, raw_number = ev.get("agent"), ev.get("attempt")
        tagged = raw_agent if ev.get("degraded") and isinstance(raw_agent, str) else None
        number = raw_number if isinstance(raw_number, int) else 0
        if type_ == "step.started":
            # A start with no end before it was lost with its process (a crash).
            opened = (number, ts, str(tagged or serving))
            continue
        outcome = _ENDINGS.get(str(type_))
        if outcome is None:
            continue
        if opened is None and (number < 1 or outcome == "cancelled"):
            continue  # failed or cancelled before any attempt: not a call
        if outcome == "fallback":
            agent = str(ev.get("agent") or serving)
        else:
            agent = opened[2] if opened is not None else str(tagged or serving)
        error = ev.get("error")
        error_class = error.get("class") if isinstance(error, Mapping) else None
        delay = ev.get("delay_s")
        out.append(
            Attempt(
                number=opened[0] if opened is not None and opened[0] else number,
                agent=agent,
                started_at=opened[1] if opened is not None else None,
                ended_at=ts,
                outcome=outcome,
                error_class=str(error_class) if error_class is not None else None,
                delay_s=float(delay) if isinstance(delay, int | float) else 0.0,
                message=_one_line(error.get("message")) if isinstance(error, Mapping) else None,
            )
        )
        opened = None
        if outcome == "fallback" and isinstance(ev.get("fallback"), str):
            serving = ev["fallback"]
    return out


def _instance(
    iid: str, kind: str, rec: StepRecord, attempts: list[Attempt], own: str,
    child_run: str | None,
) -> InstanceReport:
    since = (rec.ready_at if rec.ready_at is not None else -math.inf) - _TOLERANCE_S
    mine = [a for a in attempts if _begin(a) >= since]
    first = _begin(mine[0]) if mine else rec.started_at
    last = _begin(mine[-1]) if mine else rec.started_at
    error = rec.error if isinstance(rec.error, Mapping) else None
    return InstanceReport(
        id=iid,
        step=_top(iid),
        parent=parent_id(iid),
        kind=kind,
        status=str(rec.status),
        attempts=rec.attempts,
        agent=(rec.agent or own) if kind == "task" else None,
        degraded=rec.degraded,
        ready_at=rec.ready_at,
        first_started_at=first,
        last_started_at=last,
        ended_at=rec.ended_at,
        error_class=str(error["class"]) if error and error.get("class") else None,
        error_message=_one_line(error.get("message")) if error else None,
        retries=dict(Counter(a.error_class or "unknown" for a in mine if a.outcome == "retrying")),
        usage=_usage(rec.meta.get("usage")),
        worker=worker if isinstance(worker := rec.meta.get("worker"), str) and worker else None,
        queued=queued if isinstance(queued := rec.meta.get("queued"), str) and queued else None,
        child_run=child_run,
        tries=tuple(mine),
    )


def _begin(a: Attempt) -> float:
    return a.started_at if a.started_at is not None else a.ended_at


def _one_line(text: Any) -> str | None:
    if text is None:
        return None
    return " ".join(str(text).split())


def _budgets(raw: Any) -> tuple[BudgetReport, ...]:
    """The budgets the run's usage records (``budget``, and ``steps`` per step with
    one), each with what was spent under it."""
    if not isinstance(raw, Mapping):
        return ()
    scopes: list[tuple[str, Any, Any]] = [("run", raw.get("budget"), raw)]
    steps = raw.get("steps")
    if isinstance(steps, Mapping):
        scopes += [(str(sid), entry.get("budget"), entry) for sid, entry in steps.items()
                   if isinstance(entry, Mapping)]
    out = []
    for scope, limits, spent in scopes:
        if not isinstance(limits, Mapping):
            continue
        tokens, cost = limits.get("tokens"), limits.get("cost")
        out.append(BudgetReport(
            scope=scope,
            tokens=tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None,
            cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool)
            else None,
            spent_tokens=int(_number(spent, "tokens")),
            spent_cost=_number(spent, "cost"),
            priced=spent.get("priced") is not False,
        ))
    return tuple(out)


def _number(raw: Mapping[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, Mapping):
        return Usage()

    def number(key: str) -> float:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0.0
        return float(value) if math.isfinite(value) else 0.0

    return Usage(
        input_tokens=int(number("input_tokens")),
        output_tokens=int(number("output_tokens")),
        cost=number("cost"),
        calls=int(number("calls")),
    )


def _agents(
    calls: Mapping[str, list[Attempt]], spent: Mapping[str, Usage], openings: Counter[str]
) -> tuple[AgentReport, ...]:
    out = []
    billed = {name for name, usage in spent.items() if usage != Usage()}
    for name in sorted({*calls, *openings, *billed}):
        made = calls.get(name, [])
        failures = Counter(
            a.error_class or "unknown" for a in made if a.outcome in _FAILED_OUTCOMES
        )
        out.append(
            AgentReport(
                agent=name,
                calls=len(made),
                latencies_s=tuple(
                    lat for a in sorted(made, key=lambda a: a.ended_at)
                    if (lat := a.latency_s) is not None
                ),
                failures=dict(failures),
                breaker_openings=openings.get(name, 0),
                usage=spent.get(name, Usage()),
            )
        )
    return tuple(out)


def _lost_worker(ev: Mapping[str, Any]) -> str | None:
    """The worker of a ``worker_lost`` attempt (a retry or a final failure), or None."""
    if ev.get("type") not in ("step.retrying", "step.failed"):
        return None
    error, worker = ev.get("error"), ev.get("worker")
    if not isinstance(error, Mapping) or error.get("class") != "worker_lost":
        return None
    return worker if isinstance(worker, str) and worker else None


def _workers(instances: Sequence[InstanceReport], lost: Counter[str]) -> tuple[WorkerReport, ...]:
    ran: dict[str, list[InstanceReport]] = {}
    for inst in instances:
        if inst.worker is not None:
            ran.setdefault(inst.worker, []).append(inst)
    return tuple(
        WorkerReport(
            worker=name,
            steps=len(ran.get(name, ())),
            busy_s=sum(i.run_s or 0.0 for i in ran.get(name, ())),
            failed=sum(1 for i in ran.get(name, ()) if i.status == "failed"),
            lost=lost.get(name, 0),
        )
        for name in sorted({*ran, *lost})
    )
