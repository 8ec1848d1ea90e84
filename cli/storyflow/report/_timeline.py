"""The HTML report's timeline: one row per step instance, as wide as the window.

The labels are an HTML column; the bars are one inline SVG whose horizontal axis
stretches to the width left (``preserveAspectRatio="none"``, strokes that do not
scale), so the chart always fills the page. Per instance: its time ready → first
attempt (hatched when it waited for a slot behind a full limit, pale for scheduling
latency), each attempt (red when it failed, with its error in the tooltip), the
backoff after a failed attempt (striped), and the last attempt in its outcome's
colour. A map or a loop is an outline over the time its parts took. The bar and label
of a sub-workflow step link to its child run's section.
"""

from __future__ import annotations

from collections.abc import Sequence

from storyflow.report._format import counts, limit_name, seconds
from storyflow.report._markup import FAILED, Anchors, cls, e
from storyflow.report._model import Attempt, InstanceReport, Report
from storyflow.ui.lines import worker_label

ROW_H = 22
BAR_H = 14
VIEW_W = 1000.0
"""The chart's width in SVG units; the page stretches it to the width left."""
MAX_ROWS = 2000
"""Rows drawn at most (the rest are counted under the chart)."""
_NICE_STEPS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30,
                 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)

Bar = tuple[str, float, float, str]
"""(css class, start, stop, tooltip)."""


def _tick_step(span_s: float) -> float:
    for step in _NICE_STEPS_S:
        if span_s / step <= 10:
            return step
    return span_s / 10


def timeline(report: Report, on_path: set[str], anchors: Anchors) -> str:
    """The timeline of one run, or a line saying there is nothing to draw."""
    rows = [i for i in report.instances if _has_times(i)]
    if not rows:
        return "<p>No step has started yet.</p>"
    hidden = max(0, len(rows) - MAX_ROWS)
    rows = rows[:MAX_ROWS]
    t0 = report.started_at
    span = max(report.wall_s, 1e-6)
    end = report.ended_at if report.ended_at is not None else t0 + report.wall_s
    height = ROW_H * len(rows)

    def x(t: float) -> float:
        return max(0.0, min(1.0, (t - t0) / span)) * VIEW_W

    step = _tick_step(span)
    ticks, grid = [], []
    n = 0
    while n * step <= span + 1e-9:
        pct = 100.0 * n * step / span
        ticks.append(f'<span style="left:{pct:.3f}%">{e(seconds(n * step))}</span>')
        grid.append(f'<line class="grid" x1="{x(t0 + n * step):.2f}" y1="0"'
                    f' x2="{x(t0 + n * step):.2f}" y2="{height}"/>')
        n += 1
    labels, bars = [], []
    for row, inst in enumerate(rows):
        labels.append(_label(inst, on_path, anchors))
        y = row * ROW_H + (ROW_H - BAR_H) / 2
        parts = []
        for css, start, stop, what in _bars(inst, end):
            x1, x2 = x(start), x(stop)
            width = max(x2 - x1, 1.0)
            path = " onpath" if inst.id in on_path and css.startswith(("run-", "att-")) else ""
            parts.append(
                f'<rect class="{css}{path}" x="{x1:.2f}" y="{y:.1f}" width="{width:.2f}"'
                f' height="{BAR_H}"><title>{e(inst.id)} · {e(what)}'
                f" · {e(seconds(stop - start))}</title></rect>"
            )
        href = anchors.href(inst) if inst.child_run else None
        drawn = "".join(parts)
        bars.append(f'<a href="{e(href)}">{drawn}</a>' if href else drawn)
    svg = (f'<svg class="tl-bars" width="100%" height="{height}" viewBox="0 0 {VIEW_W:g}'
           f' {height}" preserveAspectRatio="none" role="img" aria-label="timeline">'
           f"{_DEFS}{''.join(grid)}{''.join(bars)}</svg>")
    more = f"<p>… and {hidden:,} more instances (see the steps table).</p>" if hidden else ""
    return (f'<div class="tl"><div class="tl-labels">{"".join(labels)}</div>'
            f'<div class="tl-chart"><div class="tl-axis">{"".join(ticks)}</div>{svg}</div>'
            f"</div>{more}")


_DEFS = (
    "<defs>"
    '<pattern id="hatch" width="5" height="5" patternUnits="userSpaceOnUse"'
    ' patternTransform="rotate(45)"><rect width="5" height="5" fill="#eaeef2"/>'
    '<rect width="2" height="5" fill="#8c959f"/></pattern>'
    '<pattern id="stripes" width="6" height="6" patternUnits="userSpaceOnUse"'
    ' patternTransform="rotate(-45)"><rect width="6" height="6" fill="#ffd8b5"/>'
    '<rect width="3" height="6" fill="#fb8f44"/></pattern>'
    "</defs>"
)


def _label(inst: InstanceReport, on_path: set[str], anchors: Anchors) -> str:
    depth = inst.id.count("[") + inst.id.count("#")
    classes = ["tl-label"]
    if inst.id in on_path:
        classes.append("crit")
    if inst.status in FAILED or any(t.failed for t in inst.tries):
        classes.append("bad")
    href = anchors.href(inst)
    text = e(inst.id)
    if href:
        text = f'<a href="{e(href)}">{text}</a>'
    mark = ""
    if inst.status in FAILED:
        mark = f' <span class="badge b-{cls(inst.status)}">{e(inst.status)}</span>'
    elif any(t.failed for t in inst.tries):
        failed = sum(1 for t in inst.tries if t.failed)
        mark = f' <span class="warn">{failed} failed attempt{"s" if failed > 1 else ""}</span>'
    if inst.child_run:
        mark += ' <span class="child">child run ↓</span>'
    return (f'<div class="{" ".join(classes)}" style="padding-left:{0.3 + depth:.1f}rem"'
            f' title="{e(inst.id)}">{text}{mark}</div>')


def _has_times(inst: InstanceReport) -> bool:
    return any(t is not None for t in (inst.ready_at, inst.first_started_at, inst.ended_at))


def _bars(inst: InstanceReport, end: float) -> list[Bar]:
    """The bars of one instance, in drawing order."""
    stop = inst.ended_at if inst.ended_at is not None else end
    out: list[Bar] = []
    if inst.ready_at is not None and inst.first_started_at is not None:
        if inst.queued:
            out.append(("wait", inst.ready_at, inst.first_started_at,
                        f"waiting for a slot ({limit_name(inst.queued)} was full)"))
        else:
            out.append(("latency", inst.ready_at, inst.first_started_at,
                        "scheduling latency (no limit was full)"))
    if inst.kind != "task":
        begin = inst.first_started_at if inst.first_started_at is not None else inst.ready_at
        out.append((f"box-{cls(inst.status)}", begin if begin is not None else stop, stop,
                    f"{inst.kind} · {inst.status}"))
    elif inst.tries:
        out += _attempt_bars(inst, inst.tries, stop)
    else:
        out += _summary_bars(inst, stop)
    return [b for b in out if b[2] >= b[1]]


def _attempt_bars(inst: InstanceReport, tries: Sequence[Attempt], stop: float) -> list[Bar]:
    out: list[Bar] = []
    where = f" on {worker_label(inst.worker)}" if inst.worker else ""
    for n, attempt in enumerate(tries):
        begin = attempt.started_at if attempt.started_at is not None else attempt.ended_at
        if attempt.failed:
            why = f"{attempt.error_class or 'failed'}: {attempt.message or ''}".rstrip(": ")
            verb = {"retrying": "failed, retried", "fallback": "failed, fell back"}.get(
                attempt.outcome, "failed")
            out.append(("att-failed", begin, max(attempt.ended_at, begin),
                        f"attempt {attempt.number} ({attempt.agent}) {verb} · {why}"))
            following = tries[n + 1] if n + 1 < len(tries) else None
            nxt = (following.started_at or following.ended_at) if following else None
            if nxt is None and attempt.outcome != "failed" and inst.last_started_at:
                nxt = inst.last_started_at
            if nxt is not None and nxt > attempt.ended_at:
                out.append(("retry", attempt.ended_at, nxt, f"backoff {attempt.delay_s:g}s"))
        else:
            css = "run-succeeded" if attempt.outcome == "succeeded" else "att-cancelled"
            out.append((css, begin, max(attempt.ended_at, begin),
                        f"attempt {attempt.number} ({attempt.agent}) {attempt.outcome}{where}"))
    last = tries[-1]
    open_from = inst.last_started_at
    if inst.ended_at is None and open_from is not None and open_from > last.ended_at:
        out.append((f"run-{cls(inst.status)}", open_from, stop, f"{inst.status}{where}"))
    return out


def _summary_bars(inst: InstanceReport, stop: float) -> list[Bar]:
    """Without its attempts in the event log: retries as one striped span, then the last."""
    out: list[Bar] = []
    first, last = inst.first_started_at, inst.last_started_at
    if first is not None and last is not None and last > first:
        out.append(("retry", first, last, f"failed attempts and backoff ({counts(inst.retries)})"))
    begin = last if last is not None else (inst.ready_at if inst.ready_at is not None else stop)
    css = "att-failed" if inst.status == "failed" else f"run-{cls(inst.status)}"
    where = f" on {worker_label(inst.worker)}" if inst.worker else ""
    error = f" · {inst.error_class}: {inst.error_message}" if inst.error_class else ""
    out.append((css, begin, stop, f"{inst.status}{where}{error}"))
    return out
