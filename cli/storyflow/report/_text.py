"""The report as titled tables (`report --format table`), drawn by `storyflow.ui.tables`."""

from __future__ import annotations

from datetime import datetime

from storyflow.report._advice import advice
from storyflow.report._build import percentile
from storyflow.report._format import by_status, counts, money, seconds, tokens
from storyflow.report._json import totals
from storyflow.report._model import Report
from storyflow.ui.lines import worker_label
from storyflow.ui.tables import Section

__all__ = ["budget_lines", "counts", "headline", "money", "seconds", "sections", "tokens"]

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


def headline(report: Report) -> str:
    when = datetime.fromtimestamp(report.started_at).strftime("%Y-%m-%d %H:%M:%S")
    version = f" v{report.workflow_version}" if report.workflow_version else ""
    return (
        f"run {report.run_id} · {report.workflow}{version} · {report.status}"
        f" · started {when} · wall {seconds(report.wall_s)}"
    )


def budget_lines(report: Report) -> list[str]:
    """``budget: run 300 of 1,000 tokens · step plot 0.0120 of 0.05 cost`` (spent of
    limit); none without budgets."""
    parts = []
    for b in report.budgets:
        limits = []
        if b.tokens is not None:
            limits.append(f"{b.spent_tokens:,} of {b.tokens:,} tokens")
        if b.cost is not None:
            unknown = "" if b.priced else " + unknown"
            limits.append(f"{b.spent_cost:.4f}{unknown} of {b.cost:g} cost")
        parts.append(("run " if b.scope == "run" else f"step {b.scope} ") + ", ".join(limits))
    return [f"budget: {' · '.join(parts)}"] if parts else []


def sections(report: Report) -> list[Section]:
    """Run summary, critical path, steps, agents, and the workers of a run on a cluster."""
    t = totals(report)
    n_steps = sum(t["steps"].values())
    summary = [
        f"{n_steps} step{'' if n_steps == 1 else 's'}: {by_status(t['steps'])}"
        f" · {t['instances']} instance{'' if t['instances'] == 1 else 's'}:"
        f" {by_status(t['instances_by_status'])}",
        f"attempts {t['attempts']} · retries {t['retries']}"
        + (f" ({counts(t['retries_by_class'])})" if t["retries"] else "")
        + f" · tokens {t['tokens']:,} · cost {money(t['cost'])}",
        *budget_lines(report),
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
            seconds(e.latency_s),
            seconds(e.retry_s),
            seconds(e.run_s),
        )
        for e in path.entries
    )
    tips = advice(report)
    path_notes = (
        f"on the path: waiting for a slot {seconds(path.wait_s)} ({share(path.wait_s):.1f}%)"
        f", scheduling latency {seconds(path.latency_s)} ({share(path.latency_s):.1f}%)"
        f", retries {seconds(path.retry_s)} ({share(path.retry_s):.1f}%)",
        *(f"advice: {tip}" for tip in tips),
        "segment = gap (after the previous step) + wait (for a slot, a limit was full) +"
        " latency (ready → started, no limit full) + retry (failed attempts and backoff) +"
        " run (last attempt); dependencies "
        + ("from the workflow's plan" if path.source == "plan" else "inferred from timings")
        + (f"; {seconds(path.tail_s)} after the last step" if path.tail_s >= 0.05 else ""),
    )
    on_workers = bool(report.workers)
    step_rows = tuple(
        (
            i.id,
            i.status,
            str(i.attempts),
            seconds(i.wait_s) if i.wait_s else "-",
            seconds(i.latency_s),
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
            ("STEP", "SHARE", "SEGMENT", "GAP", "WAIT", "LATENCY", "RETRY", "RUN"),
            path_rows,
            right=frozenset({1, 2, 3, 4, 5, 6, 7}),
            notes=path_notes,
        ),
        Section(
            "steps",
            ("STEP", "STATUS", "ATTEMPTS", "WAIT", "LATENCY", "RUNNING", "IN RETRIES", "RETRIES",
             "AGENT", "TOKENS", "COST") + (("WORKER",) if on_workers else ()),
            step_rows,
            right=frozenset({2, 3, 4, 5, 6, 9, 10}),
            notes=("WAIT: ready → first attempt behind a full limit (--max-parallel, a pool);"
                   " LATENCY: ready → first attempt with no limit full",),
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
