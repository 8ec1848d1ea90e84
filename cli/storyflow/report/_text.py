"""The report as titled tables (`report --format table`), drawn by `storyflow.ui.tables`."""

from __future__ import annotations

from datetime import datetime

from storyflow.report._build import percentile
from storyflow.report._json import totals
from storyflow.report._model import Report, Usage
from storyflow.ui.lines import format_duration, worker_label
from storyflow.ui.tables import Section

_STATUS_STYLES = {
    "succeeded": "green",
    "cached": "green",
    "failed": "red",
    "cancelled": "red",
    "skipped": "dim",
    "pending": "dim",
    "running": "cyan",
    "retrying": "yellow",
}


def seconds(value: float | None) -> str:
    """A duration for people (``85ms``, ``1.6s``, ``2m05s``); ``-`` when unknown."""
    if value is None:
        return "-"
    if value < 0.9995:
        return f"{max(value, 0.0) * 1000:.0f}ms"
    return format_duration(value)


def money(cost: float) -> str:
    """A cost: ``-`` for none, more digits for tiny amounts."""
    if cost <= 0:
        return "-"
    return f"{cost:.4f}" if cost < 1 else f"{cost:.2f}"


def tokens(usage: Usage) -> str:
    return f"{usage.tokens:,}" if usage.tokens else "-"


def counts(mapping: dict[str, int]) -> str:
    """``transient×2, timeout×1``; ``-`` for none."""
    return ", ".join(f"{k}×{v}" for k, v in sorted(mapping.items())) or "-"


def headline(report: Report) -> str:
    when = datetime.fromtimestamp(report.started_at).strftime("%Y-%m-%d %H:%M:%S")
    version = f" v{report.workflow_version}" if report.workflow_version else ""
    return (
        f"run {report.run_id} · {report.workflow}{version} · {report.status}"
        f" · started {when} · wall {seconds(report.wall_s)}"
    )


def sections(report: Report) -> list[Section]:
    """Run summary, critical path, steps, agents, and the workers of a run on a cluster."""
    t = totals(report)
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(t["steps"].items())) or "no steps"
    summary = [
        f"steps: {by_status} ({t['instances']} instances)",
        f"attempts {t['attempts']} · retries {t['retries']}"
        + (f" ({counts(t['retries_by_class'])})" if t["retries"] else "")
        + f" · tokens {t['tokens']:,} · cost {money(t['cost'])}",
    ]
    path = report.critical_path
    share = report.share_pct
    path_rows = tuple(
        (
            e.id,
            f"{share(e.segment_s):.1f}%",
            seconds(e.segment_s),
            seconds(e.gap_s),
            seconds(e.wait_s),
            seconds(e.retry_s),
            seconds(e.run_s),
        )
        for e in path.entries
    )
    path_notes = (
        f"bottlenecks on the path: waiting for slots {seconds(path.wait_s)}"
        f" ({share(path.wait_s):.1f}%), retries {seconds(path.retry_s)}"
        f" ({share(path.retry_s):.1f}%)",
        "segment = gap (after the previous step) + wait (for a slot) + retry (failed attempts"
        " and backoff) + run (last attempt); dependencies "
        + ("from the workflow's plan" if path.source == "plan" else "inferred from timings")
        + (f"; {seconds(path.tail_s)} after the last step" if path.tail_s >= 0.05 else ""),
    )
    on_workers = bool(report.workers)
    step_rows = tuple(
        (
            i.id,
            i.status,
            str(i.attempts),
            seconds(i.wait_s),
            seconds(i.duration_s),
            seconds(i.retry_s) if i.retry_s else "-",
            counts(i.retries),
            (i.agent or "-") + (" (fallback)" if i.degraded else ""),
            tokens(i.usage),
            money(i.usage.cost),
        )
        + ((worker_label(i.worker) if i.worker else "-",) if on_workers else ())
        for i in report.instances
    )
    agent_rows = tuple(
        (
            a.agent,
            str(a.calls),
            seconds(percentile(a.latencies_s, 0.5)),
            seconds(percentile(a.latencies_s, 0.95)),
            counts(a.failures),
            str(a.breaker_openings) if a.breaker_openings else "-",
            tokens(a.usage),
            money(a.usage.cost),
        )
        for a in report.agents
    )
    worker_rows = tuple(
        (worker_label(w.worker), str(w.steps), seconds(w.busy_s), counts(w.failures))
        for w in report.workers
    )
    return [
        Section(headline(report), notes=tuple(summary)),
        Section(
            "critical path",
            ("STEP", "SHARE", "SEGMENT", "GAP", "WAIT", "RETRY", "RUN"),
            path_rows,
            right=frozenset({1, 2, 3, 4, 5, 6}),
            notes=path_notes,
        ),
        Section(
            "steps",
            ("STEP", "STATUS", "ATTEMPTS", "WAIT", "RUNNING", "IN RETRIES", "RETRIES", "AGENT",
             "TOKENS", "COST") + (("WORKER",) if on_workers else ()),
            step_rows,
            right=frozenset({2, 3, 4, 5, 8, 9}),
            styles={1: _STATUS_STYLES},
        ),
        Section(
            "agents",
            ("AGENT", "CALLS", "P50", "P95", "FAILURES", "BREAKER", "TOKENS", "COST"),
            agent_rows,
            right=frozenset({1, 2, 3, 5, 6, 7}),
            notes=() if agent_rows else ("no agent was called",),
        ),
        *(
            [Section("workers", ("WORKER", "STEPS", "BUSY", "FAILURES"), worker_rows,
                     right=frozenset({1, 2}),
                     notes=("busy = the steps' latest attempts on the worker, summed",))]
            if worker_rows else []
        ),
    ]
