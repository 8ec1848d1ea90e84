"""The report as one self-contained HTML page (`report --format html`).

Inline CSS, an inline SVG Gantt timeline (one bar per instance: waiting for a slot,
failed attempts and backoff, and the last attempt, each drawn differently), the
workflow graph as preformatted text and the tables. No script, no external resource,
no URL: the page opens the same offline, from a CI artifact or an e-mail. Every piece
of text from the run is escaped, and ``://`` is written as an entity so that no
message can smuggle a link in.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence

from storyflow.report._build import percentile
from storyflow.report._json import totals
from storyflow.report._model import InstanceReport, Report
from storyflow.report._text import counts, headline, money, seconds, tokens
from storyflow.ui.lines import worker_label

_LABEL_W = 240
_CHART_W = 760
_ROW_H = 20
_BAR_H = 12
_AXIS_H = 24
_NICE_STEPS_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600,
                 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#1f2328;
background:#fff}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:2rem 0 .6rem}
.meta{color:#57606a;margin:0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:.25rem .7rem;border-bottom:1px solid #d0d7de;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.n,th.n{text-align:right}
tr.crit td:first-child{font-weight:700}
pre{background:#f6f8fa;padding:.8rem 1rem;border-radius:6px;overflow:auto}
.badge{display:inline-block;padding:0 .5rem;border-radius:1rem;color:#fff;font-weight:600}
.b-succeeded,.b-cached{background:#1a7f37}.b-failed,.b-cancelled{background:#cf222e}
.b-running,.b-waiting{background:#0969da}.b-interrupted,.b-skipped,.b-pending{background:#6e7781}
.b-retrying{background:#bc4c00}
svg text{font:12px system-ui,sans-serif;fill:#1f2328}svg .crit{font-weight:700}
svg .axis{stroke:#d0d7de}svg .tick{fill:#57606a;font-size:11px}
.run-succeeded,.run-cached{fill:#2da44e}.run-failed{fill:#cf222e}.run-cancelled{fill:#8250df}
.run-skipped,.run-pending{fill:#afb8c1}.run-running,.run-retrying,.run-ready{fill:#0969da}
.wait{fill:url(#hatch)}.retry{fill:url(#stripes)}
.onpath{stroke:#1f2328;stroke-width:1.5}
.legend span{display:inline-block;margin-right:1.2rem}
.legend i{display:inline-block;width:1.6rem;height:.7rem;margin-right:.3rem;vertical-align:middle}
.l-wait{background:repeating-linear-gradient(45deg,#afb8c1 0 2px,#eaeef2 2px 5px)}
.l-retry{background:repeating-linear-gradient(-45deg,#fb8f44 0 3px,#ffd8b5 3px 6px)}
.l-ok{background:#2da44e}.l-fail{background:#cf222e}.l-cancel{background:#8250df}
.l-skip{background:#afb8c1}.l-path{border:2px solid #1f2328;height:.5rem!important}
"""

_DEFS = (
    "<defs>"
    '<pattern id="hatch" width="5" height="5" patternUnits="userSpaceOnUse"'
    ' patternTransform="rotate(45)"><rect width="5" height="5" fill="#eaeef2"/>'
    '<rect width="2" height="5" fill="#afb8c1"/></pattern>'
    '<pattern id="stripes" width="6" height="6" patternUnits="userSpaceOnUse"'
    ' patternTransform="rotate(-45)"><rect width="6" height="6" fill="#ffd8b5"/>'
    '<rect width="3" height="6" fill="#fb8f44"/></pattern>'
    "</defs>"
)


def e(text: object) -> str:
    """Escape for HTML text and attributes; ``://`` becomes an entity (no live URL)."""
    return html.escape(str(text), quote=True).replace("://", ":&#47;&#47;")


def _cls(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", text.lower()) or "unknown"


def render_html(report: Report) -> str:
    """The whole page."""
    on_path = {entry.id for entry in report.critical_path.entries}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>storyflow report · {e(report.workflow)} · {e(report.run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(report.workflow)} <span class=\"badge b-{_cls(report.status)}\">"
        f"{e(report.status)}</span></h1>",
        f'<p class="meta">{e(headline(report))}</p>',
        _summary(report),
        "<h2>Timeline</h2>",
        _legend(),
        _gantt(report, on_path),
        _critical(report),
        "<h2>Steps</h2>",
        _steps(report, on_path),
        "<h2>Agents</h2>",
        _agents(report),
    ]
    if report.workers:
        parts += ["<h2>Workers</h2>", _workers(report)]
    if report.graph:
        parts += ["<h2>Workflow graph</h2>", f"<pre>{e(report.graph)}</pre>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right: set[int],
           row_classes: Sequence[str] = ()) -> str:
    head = "".join(f'<th{" class=n" if i in right else ""}>{e(h)}</th>'
                   for i, h in enumerate(header))
    body = []
    for n, row in enumerate(rows):
        cls = f' class="{row_classes[n]}"' if n < len(row_classes) and row_classes[n] else ""
        cells = "".join(f'<td{" class=n" if i in right else ""}>{e(c)}</td>'
                        for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary(report: Report) -> str:
    t = totals(report)
    rows = [
        ("wall time", seconds(report.wall_s)),
        ("steps", ", ".join(f"{n} {s}" for s, n in sorted(t["steps"].items())) or "-"),
        ("attempts", str(t["attempts"])),
        ("retries", f"{t['retries']} ({counts(t['retries_by_class'])})" if t["retries"] else "0"),
        ("degraded (fallback served)", str(t["degraded"])),
        ("tokens", f"{t['tokens']:,} ({t['input_tokens']:,} in, {t['output_tokens']:,} out)"),
        ("cost", money(t["cost"])),
    ]
    return "<h2>Summary</h2>" + _table(("", ""), rows, set())


def _legend() -> str:
    items = [("l-wait", "waiting for a slot"), ("l-retry", "failed attempts and backoff"),
             ("l-ok", "succeeded"), ("l-fail", "failed"), ("l-cancel", "cancelled"),
             ("l-skip", "skipped / pending"), ("l-path", "on the critical path")]
    spans = "".join(f'<span><i class="{c}"></i>{e(t)}</span>' for c, t in items)
    return f'<p class="legend">{spans}</p>'


def _tick_step(span_s: float) -> float:
    for step in _NICE_STEPS_S:
        if span_s / step <= 10:
            return step
    return span_s / 10


def _gantt(report: Report, on_path: set[str]) -> str:
    rows = [i for i in report.instances if _times(i)]
    t0 = report.started_at
    span = max(report.wall_s, 1e-6)
    height = _AXIS_H + _ROW_H * max(len(rows), 1) + 4
    width = _LABEL_W + _CHART_W + 10

    def x(t: float) -> float:
        return _LABEL_W + max(0.0, min(1.0, (t - t0) / span)) * _CHART_W

    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
           ' role="img" aria-label="timeline">', _DEFS]
    step = _tick_step(span)
    n = 0
    while n * step <= span + 1e-9:
        tx = x(t0 + n * step)
        out.append(f'<line class="axis" x1="{tx:.1f}" y1="{_AXIS_H - 6}" x2="{tx:.1f}"'
                   f' y2="{height}"/><text class="tick" x="{tx:.1f}" y="{_AXIS_H - 10}"'
                   f' text-anchor="middle">{e(seconds(n * step))}</text>')
        n += 1
    end = report.ended_at if report.ended_at is not None else t0 + report.wall_s
    for row, inst in enumerate(rows):
        y = _AXIS_H + row * _ROW_H
        depth = inst.id.count("[") + inst.id.count("#")
        crit = inst.id in on_path
        label = inst.id if len(inst.id) <= 30 else inst.id[:29] + "…"
        out.append(f'<text x="{4 + 12 * depth}" y="{y + _BAR_H}"'
                   f'{" class=crit" if crit else ""}>{e(label)}</text>')
        bar_y = y + (_ROW_H - _BAR_H) // 2
        for cls, start, stop, what in _bars(inst, end):
            x1, x2 = x(start), x(stop)
            w = max(x2 - x1, 1.5)
            extra = " onpath" if crit and cls.startswith("run-") else ""
            out.append(
                f'<rect class="{cls}{extra}" x="{x1:.1f}" y="{bar_y}" width="{w:.1f}"'
                f' height="{_BAR_H}"><title>{e(inst.id)} · {e(what)}'
                f" {e(seconds(stop - start))}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def _times(inst: InstanceReport) -> bool:
    return any(t is not None for t in (inst.ready_at, inst.first_started_at, inst.ended_at))


def _bars(inst: InstanceReport, end: float) -> list[tuple[str, float, float, str]]:
    """``(css class, start, stop, what)`` for the wait, retry and last-attempt segments."""
    stop = inst.ended_at if inst.ended_at is not None else end
    out = []
    if inst.ready_at is not None and inst.first_started_at is not None:
        out.append(("wait", inst.ready_at, inst.first_started_at, "waiting for a slot"))
    if inst.first_started_at is not None and inst.last_started_at is not None:
        if inst.last_started_at > inst.first_started_at:
            retries = counts(inst.retries)
            out.append(("retry", inst.first_started_at, inst.last_started_at,
                        f"failed attempts and backoff ({retries})"))
    begin = inst.last_started_at
    if begin is None:
        begin = inst.ready_at if inst.ready_at is not None else stop
    where = f" on {worker_label(inst.worker)}" if inst.worker else ""
    out.append((f"run-{_cls(inst.status)}", begin, stop, inst.status + where))
    return [b for b in out if b[2] >= b[1]]


def _critical(report: Report) -> str:
    path = report.critical_path
    share = report.share_pct
    rows = [
        (p.id, f"{share(p.segment_s):.1f}%", seconds(p.segment_s), seconds(p.gap_s),
         seconds(p.wait_s), seconds(p.retry_s), seconds(p.run_s))
        for p in path.entries
    ]
    source = "the workflow's plan" if path.source == "plan" else "timings (the file changed)"
    notes = (
        f"<p>Waiting for slots on the path: <b>{e(seconds(path.wait_s))}</b>"
        f" ({share(path.wait_s):.1f}% of the wall time); in retries:"
        f" <b>{e(seconds(path.retry_s))}</b> ({share(path.retry_s):.1f}%);"
        f" after the last step: {e(seconds(path.tail_s))}. Dependencies from {e(source)}.</p>"
    )
    table = _table(("step", "share", "segment", "gap", "wait", "retries", "last attempt"),
                   rows, {1, 2, 3, 4, 5, 6})
    return "<h2>Critical path</h2>" + table + notes


def _steps(report: Report, on_path: set[str]) -> str:
    on_workers = bool(report.workers)
    rows = [
        (i.id, i.status, str(i.attempts), seconds(i.wait_s), seconds(i.duration_s),
         seconds(i.retry_s) if i.retry_s else "-", counts(i.retries),
         (i.agent or "-") + (" (fallback)" if i.degraded else ""), tokens(i.usage),
         money(i.usage.cost))
        + ((worker_label(i.worker) if i.worker else "-",) if on_workers else ())
        + (f"{i.error_class}: {i.error_message}" if i.error_class else "",)
        for i in report.instances
    ]
    classes = ["crit" if i.id in on_path else "" for i in report.instances]
    header = ("step", "status", "attempts", "wait", "running", "in retries", "retries",
              "agent", "tokens", "cost") + (("worker",) if on_workers else ()) + ("error",)
    return _table(header, rows, {2, 3, 4, 5, 8, 9}, classes)


def _agents(report: Report) -> str:
    if not report.agents:
        return "<p>No agent was called.</p>"
    rows = [
        (a.agent, str(a.calls), seconds(percentile(a.latencies_s, 0.5)),
         seconds(percentile(a.latencies_s, 0.95)), counts(a.failures),
         str(a.breaker_openings), tokens(a.usage), money(a.usage.cost))
        for a in report.agents
    ]
    return _table(("agent", "calls", "p50", "p95", "failures", "breaker openings", "tokens",
                   "cost"), rows, {1, 2, 3, 5, 6, 7})


def _workers(report: Report) -> str:
    rows = [
        (w.worker, str(w.steps), seconds(w.busy_s), str(w.failed), str(w.lost))
        for w in report.workers
    ]
    table = _table(("worker", "steps", "busy", "failed steps", "attempts lost (worker_lost)"),
                   rows, {1, 2, 3, 4})
    return table + "<p>Busy: the steps' latest attempts on the worker, summed.</p>"
