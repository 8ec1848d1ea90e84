"""The `report --format json` document (schemas/report.schema.json)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from storyflow.report._advice import advice
from storyflow.report._build import percentile
from storyflow.report._model import (
    AgentReport,
    BudgetReport,
    InstanceReport,
    Report,
    Usage,
    WorkerReport,
)

_DIGITS = 6


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, _DIGITS)


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "tokens": usage.tokens,
        "cost": round(usage.cost, _DIGITS),
        "model_calls": usage.calls,
    }


def totals(report: Report) -> dict[str, Any]:
    """Steps (the plan's top-level steps) and instances by status, attempts, retries,
    tokens and cost over the whole run."""
    tasks = report.tasks
    retries: Counter[str] = Counter()
    for inst in tasks:
        retries.update(inst.retries)
    usage = sum((i.usage for i in tasks), Usage())
    return {
        "instances": len(report.instances),
        "steps": dict(Counter(i.status for i in report.steps)),
        "instances_by_status": dict(Counter(i.status for i in report.instances)),
        "attempts": sum(i.attempts for i in tasks),
        "retries": sum(retries.values()),
        "retries_by_class": dict(retries),
        "degraded": sum(1 for i in tasks if i.degraded),
        **_usage(usage),
    }


def _instance(inst: InstanceReport) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": inst.id,
        "step": inst.step,
        "parent": inst.parent,
        "kind": inst.kind,
        "status": inst.status,
        "attempts": inst.attempts,
        "agent": inst.agent,
        "degraded": inst.degraded,
        "ready_at": inst.ready_at,
        "started_at": inst.first_started_at,
        "ended_at": inst.ended_at,
        "wait_s": _r(inst.wait_s),
        "latency_s": _r(inst.latency_s),
        "queued": inst.queued,
        "retry_s": _r(inst.retry_s),
        "run_s": _r(inst.run_s),
        "duration_s": _r(inst.duration_s),
        "retries": dict(inst.retries),
        "error": None
        if inst.error_class is None
        else {"class": inst.error_class, "message": inst.error_message or ""},
        **_usage(inst.usage),
    }
    if inst.worker is not None:
        entry["worker"] = inst.worker
    if inst.child_run is not None:
        entry["child_run"] = inst.child_run
    return entry


def _worker(worker: WorkerReport) -> dict[str, Any]:
    return {
        "worker": worker.worker,
        "steps": worker.steps,
        "busy_s": _r(worker.busy_s),
        "failed": worker.failed,
        "worker_lost": worker.lost,
    }


def _agent(agent: AgentReport) -> dict[str, Any]:
    lat = agent.latencies_s
    return {
        "agent": agent.agent,
        "calls": agent.calls,
        "p50_s": _r(percentile(lat, 0.50)),
        "p95_s": _r(percentile(lat, 0.95)),
        "max_s": _r(max(lat)) if lat else None,
        "failures": dict(agent.failures),
        "breaker_openings": agent.breaker_openings,
        **_usage(agent.usage),
    }


def _budget(budget: BudgetReport) -> dict[str, Any]:
    return {
        "scope": budget.scope,
        "tokens": budget.tokens,
        "cost": budget.cost,
        "spent_tokens": budget.spent_tokens,
        "spent_cost": round(budget.spent_cost, _DIGITS),
        "priced": budget.priced,
    }


def to_document(report: Report) -> dict[str, Any]:
    """The report as plain JSON values."""
    path = report.critical_path
    share = report.share_pct
    return {
        "run_id": report.run_id,
        "workflow": report.workflow,
        "workflow_version": report.workflow_version,
        "status": report.status,
        "started_at": report.started_at,
        "ended_at": report.ended_at,
        "wall_s": _r(report.wall_s),
        "totals": totals(report),
        "critical_path": {
            "source": path.source,
            "instances": [
                {
                    "id": e.id,
                    "step": e.step,
                    "gap_s": _r(e.gap_s),
                    "wait_s": _r(e.wait_s),
                    "latency_s": _r(e.latency_s),
                    "queued": e.queued,
                    "retry_s": _r(e.retry_s),
                    "run_s": _r(e.run_s),
                    "segment_s": _r(e.segment_s),
                    "share_pct": round(share(e.segment_s), 2),
                }
                for e in path.entries
            ],
            "tail_s": _r(path.tail_s),
            "bottlenecks": {
                "wait_s": _r(path.wait_s),
                "wait_share_pct": round(share(path.wait_s), 2),
                "retry_s": _r(path.retry_s),
                "retry_share_pct": round(share(path.retry_s), 2),
                "latency_s": _r(path.latency_s),
                "latency_share_pct": round(share(path.latency_s), 2),
                "wait_by_limit": {k: _r(v) for k, v in sorted(path.waits_by_limit().items())},
                "advice": advice(report),
            },
        },
        "steps": [_instance(i) for i in report.instances],
        "agents": [_agent(a) for a in report.agents],
        "workers": [_worker(w) for w in report.workers],
        "budgets": [_budget(b) for b in report.budgets],
    }
