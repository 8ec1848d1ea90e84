"""The report as one self-contained HTML page (`report --format html`).

One section per run: the run itself, then each sub-workflow step's child run (with
its own children), each with an anchor (``#run-ID``) that the parent's rows, bars and
graph boxes link to. A section holds the summary, the failures (failed and cancelled
steps and every failed attempt, with their errors, in red), the timeline
(`storyflow.report._timeline`), the critical path with its advice, the workflow graph
as an SVG picture (`storyflow.report._graph_svg`) and the tables. The page uses the
window's width. Inline CSS and SVG only: no script, no external resource, no URL (links
are fragments inside the page); every piece of text from a run is escaped.
"""

from __future__ import annotations

from storyflow.report._advice import advice
from storyflow.report._build import percentile
from storyflow.report._format import by_status, counts, limit_name, money, seconds, tokens
from storyflow.report._graph_svg import graph_svg
from storyflow.report._json import totals
from storyflow.report._markup import FAILED, Anchors, Raw, badge, cls, e, run_anchor, table
from storyflow.report._model import Report
from storyflow.report._text import headline
from storyflow.report._timeline import timeline
from storyflow.ui.lines import worker_label

MAX_FAILURES = 50
"""Failure lines listed at most per run (the rest are counted)."""

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2rem 1.5rem;
color:#1f2328;background:#fff}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.15rem;margin:1.8rem 0 .6rem}
h3{font-size:1rem;margin:1.4rem 0 .5rem}
section.run{border-top:3px solid #d0d7de;margin-top:2rem;padding-top:.4rem}
section.run:first-of-type{border-top:none;margin-top:0}
.meta{color:#57606a;margin:0}.note{color:#57606a}
a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;width:100%}
th,td{padding:.25rem .6rem;border-bottom:1px solid #d0d7de;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600;white-space:nowrap}td.n,th.n{text-align:right}
td.n{white-space:nowrap}td .wrap{overflow-wrap:anywhere;min-width:14rem}
tr.crit td:first-child{font-weight:700}
tr.failed td,tr.cancelled td{background:#ffebe9}
tr.failed td:first-child,tr.cancelled td:first-child{box-shadow:inset 4px 0 #cf222e}
tr.retried td:first-child{box-shadow:inset 4px 0 #fb8f44}
.err{color:#a40e26;font-weight:600}
.badge{display:inline-block;padding:0 .5rem;border-radius:1rem;color:#fff;font-weight:600;
font-size:.85em;white-space:nowrap}
.b-succeeded,.b-cached,.b-kept{background:#1a7f37}.b-failed,.b-cancelled{background:#cf222e}
.b-running,.b-waiting,.b-ready{background:#0969da}
.b-interrupted,.b-skipped,.b-pending{background:#6e7781}.b-retrying{background:#bc4c00}
.failures{border:2px solid #cf222e;background:#fff5f5;border-radius:6px;padding:.6rem 1rem}
.failures h3{color:#a40e26;margin:0 0 .4rem}.failures ul{margin:0;padding-left:1.2rem}
.failures li{margin:.2rem 0}.warn{color:#bc4c00;font-weight:600;font-size:.85em}
.advice{border-left:4px solid #0969da;background:#f6f8fa;padding:.5rem 1rem;margin:.6rem 0}
.advice ul{margin:.2rem 0;padding-left:1.2rem}
.child{color:#0969da;font-size:.85em}
.tl{display:grid;grid-template-columns:minmax(9rem,max-content) minmax(0,1fr);gap:0 .6rem;
font-size:12px}
.tl-labels{padding-top:22px;max-width:32rem}
.tl-label{height:22px;line-height:22px;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}
.tl-label.crit{font-weight:700}.tl-label.bad{background:#ffebe9}
.tl-label .badge{font-size:10px;line-height:14px}
.tl-axis{position:relative;height:22px;border-bottom:1px solid #d0d7de;color:#57606a}
.tl-axis span{position:absolute;top:2px;transform:translateX(-50%);font-size:11px;
white-space:nowrap}.tl-axis span:first-child{transform:none}
.tl-bars{display:block}
.grid{stroke:#eaeef2;vector-effect:non-scaling-stroke}
.run-succeeded,.run-cached,.run-kept{fill:#2da44e}.att-failed,.run-failed{fill:#cf222e}
.att-cancelled,.run-cancelled{fill:#8250df}.run-skipped,.run-pending{fill:#afb8c1}
.run-running,.run-retrying,.run-ready{fill:#0969da}
.wait{fill:url(#hatch)}.latency{fill:#d8dee4}.retry{fill:url(#stripes)}
[class^=box-]{fill:none;stroke:#57606a;stroke-width:1.5;vector-effect:non-scaling-stroke}
.box-failed,.box-cancelled{stroke:#cf222e}.box-succeeded{stroke:#1a7f37}
.onpath{stroke:#1f2328;stroke-width:2;vector-effect:non-scaling-stroke}
.legend span{display:inline-block;margin-right:1.1rem}
.legend i{display:inline-block;width:1.6rem;height:.7rem;margin-right:.3rem;
vertical-align:middle}
.l-wait{background:repeating-linear-gradient(45deg,#8c959f 0 2px,#eaeef2 2px 5px)}
.l-lat{background:#d8dee4}
.l-retry{background:repeating-linear-gradient(-45deg,#fb8f44 0 3px,#ffd8b5 3px 6px)}
.l-ok{background:#2da44e}.l-fail{background:#cf222e}.l-cancel{background:#8250df}
.l-skip{background:#afb8c1}.l-box{border:2px solid #57606a;height:.6rem!important}
.l-path{border:2px solid #1f2328;height:.6rem!important}
.graph{overflow-x:auto;border:1px solid #d0d7de;border-radius:6px;padding:.5rem}
.graph svg{display:block;margin:0 auto}
.graph text{font:12px system-ui,sans-serif;fill:#1f2328}
.graph .label{font-weight:600}.graph .sub,.graph .kind{fill:#57606a;font-weight:400}
.graph .part{font-size:11px}.graph .iter{font-size:11px;fill:#57606a;font-weight:600}
.node,.group{stroke-width:1.5}.group{fill-opacity:.35}
.s-succeeded,.s-cached,.s-kept{fill:#dafbe1;stroke:#1a7f37}
.s-failed,.s-cancelled{fill:#ffebe9;stroke:#cf222e}.bad{stroke-width:3}
.s-running,.s-retrying,.s-ready{fill:#ddf4ff;stroke:#0969da}
.s-skipped,.s-pending{fill:#f6f8fa;stroke:#8c959f;stroke-dasharray:4 3}
.edge{fill:none;stroke:#8c959f;stroke-width:1.3}
"""


def render_html(report: Report) -> str:
    """The whole page: the run, then its child runs, each in a section of its own."""
    runs = _flatten(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>storyflow report · {e(report.workflow)} · {e(report.run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(report.workflow)} {badge(report.status)}</h1>",
        f'<p class="meta">{e(headline(report))}</p>',
    ]
    if len(runs) > 1:
        links = "".join(
            f'<li><a href="#{run_anchor(r.run_id)}">{e(r.run_id)}</a> · {e(r.workflow)}'
            f" {badge(r.status)}{e(f' (step {step} of {parent})' if step else '')}</li>"
            for r, parent, step in runs
        )
        parts.append(f"<p>Runs on this page:</p><ul>{links}</ul>")
    for n, (run, parent, step) in enumerate(runs):
        parts.append(_section(run, f"r{n}", parent, step))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _flatten(report: Report) -> list[tuple[Report, str | None, str | None]]:
    """The run and its child runs, depth first: (report, parent run id, parent step)."""
    out: list[tuple[Report, str | None, str | None]] = [(report, None, None)]
    seen = {report.run_id}
    stack = [(report, child) for child in reversed(report.children)]
    while stack:
        parent, child = stack.pop()
        if child.run_id in seen:
            continue
        seen.add(child.run_id)
        step = next((i.id for i in parent.instances if i.child_run == child.run_id), None)
        out.append((child, parent.run_id, step))
        stack += [(child, c) for c in reversed(child.children)]
    return out


def _section(report: Report, prefix: str, parent: str | None, step: str | None) -> str:
    anchors = Anchors(prefix, report)
    on_path = {entry.id for entry in report.critical_path.entries}
    head = ""
    if parent is not None:
        back = f'<a href="#{run_anchor(parent)}">{e(parent)}</a>'
        head = (f"<h2>Child run {e(report.run_id)} · {e(report.workflow)} {badge(report.status)}"
                f"</h2><p class=meta>{e(headline(report))}</p><p class=note>The sub-workflow"
                f" of step {e(step or '?')} of run {back}.</p>")
    return "\n".join([
        f'<section class="run" id="{run_anchor(report.run_id)}">',
        head,
        _summary(report),
        _failures(report, anchors),
        "<h3>Timeline</h3>",
        _legend(),
        timeline(report, on_path, anchors),
        _critical(report),
        "<h3>Workflow graph</h3>",
        graph_svg(report, anchors),
        "<h3>Steps</h3>",
        _steps(report, on_path, anchors),
        "<h3>Agents</h3>",
        _agents(report),
        *(["<h3>Workers</h3>", _workers(report)] if report.workers else []),
        "</section>",
    ])


def _summary(report: Report) -> str:
    t = totals(report)
    n_steps = sum(t["steps"].values())
    rows = [
        ("wall time", seconds(report.wall_s)),
        ("steps", f"{n_steps}: {by_status(t['steps'])} (the plan's top-level steps)"),
        ("instances", f"{t['instances']}: {by_status(t['instances_by_status'])}"
                      " (map items and loop iterations' steps included)"),
        ("attempts", str(t["attempts"])),
        ("retries", f"{t['retries']} ({counts(t['retries_by_class'])})" if t["retries"] else "0"),
        ("degraded (fallback served)", str(t["degraded"])),
        ("tokens", f"{t['tokens']:,} ({t['input_tokens']:,} in, {t['output_tokens']:,} out)"),
        ("cost", money(t["cost"])),
    ]
    return "<h3>Summary</h3>" + table(("", ""), rows, set())


def _failures(report: Report, anchors: Anchors) -> str:
    """Every failed or cancelled instance and every failed attempt, with its error."""
    lines: list[str] = []
    for inst in report.instances:
        href = anchors.href(inst)
        name = f'<a href="{e(href)}">{e(inst.id)}</a>' if href else e(inst.id)
        if inst.status in FAILED:
            why = f"{inst.error_class or inst.status}: {inst.error_message or ''}".rstrip(": ")
            lines.append(f"<li>{badge(inst.status)} <b>{name}</b>"
                         f' <span class="err">{e(why)}</span></li>')
        for attempt in inst.tries:
            if attempt.failed and attempt.outcome != "failed":
                then = "retried" if attempt.outcome == "retrying" else "fell back"
                why = f"{attempt.error_class or 'failed'}: {attempt.message or ''}".rstrip(": ")
                lines.append(f'<li><span class="warn">attempt {attempt.number} failed</span>'
                             f" {name} ({e(attempt.agent)}, {then}):"
                             f' <span class="err">{e(why)}</span></li>')
    if not lines:
        return ""
    more = len(lines) - MAX_FAILURES
    tail = f"<li>… and {more:,} more</li>" if more > 0 else ""
    return (f'<div class="failures"><h3>Failures</h3><ul>{"".join(lines[:MAX_FAILURES])}'
            f"{tail}</ul></div>")


def _legend() -> str:
    items = [("l-wait", "waiting for a slot (a limit was full)"),
             ("l-lat", "scheduling latency"), ("l-retry", "backoff after a failed attempt"),
             ("l-ok", "succeeded"), ("l-fail", "failed attempt / failed"),
             ("l-cancel", "cancelled"), ("l-skip", "skipped / pending"),
             ("l-box", "a map or a loop"), ("l-path", "on the critical path")]
    spans = "".join(f'<span><i class="{c}"></i>{e(t)}</span>' for c, t in items)
    return f'<p class="legend">{spans}</p>'


def _critical(report: Report) -> str:
    path = report.critical_path
    share = report.share_pct
    rows = [
        (p.id, f"{share(p.segment_s):.1f}%", seconds(p.segment_s), seconds(p.gap_s),
         seconds(p.wait_s) + (f" ({limit_name(p.queued)})" if p.queued and p.wait_s else ""),
         seconds(p.latency_s), seconds(p.retry_s), seconds(p.run_s))
        for p in path.entries
    ]
    source = "the workflow's plan" if path.source == "plan" else "timings (the file changed)"
    notes = (
        f"<p>On the path: waiting for a slot <b>{e(seconds(path.wait_s))}</b>"
        f" ({share(path.wait_s):.1f}% of the wall time), scheduling latency"
        f" <b>{e(seconds(path.latency_s))}</b> ({share(path.latency_s):.1f}%), retries"
        f" <b>{e(seconds(path.retry_s))}</b> ({share(path.retry_s):.1f}%);"
        f" after the last step: {e(seconds(path.tail_s))}. Dependencies from {e(source)}.</p>"
    )
    tips = advice(report)
    box = ""
    if tips:
        box = ('<div class="advice"><b>Advice</b><ul>'
               + "".join(f"<li>{e(t)}</li>" for t in tips) + "</ul></div>")
    body = table(("step", "share", "segment", "gap", "wait for a slot", "latency", "retries",
                  "last attempt"), rows, {1, 2, 3, 4, 5, 6, 7})
    return "<h3>Critical path</h3>" + body + notes + box


def _steps(report: Report, on_path: set[str], anchors: Anchors) -> str:
    on_workers = bool(report.workers)
    rows, attrs = [], []
    for inst in report.instances:
        name = Raw(e(inst.id) + (
            f'<br><a class="child" href="{e(anchors.href(inst))}">→ child run'
            f" {e(inst.child_run)}</a>" if inst.child_run else ""))
        error = Raw(f'<div class="wrap err">{e(f"{inst.error_class}: {inst.error_message}")}'
                    "</div>" if inst.error_class else "")
        wait = seconds(inst.wait_s) if inst.wait_s else "-"
        if inst.queued and inst.wait_s:
            wait += f" ({limit_name(inst.queued)})"
        rows.append(
            (name, badge(inst.status), str(inst.attempts), wait, seconds(inst.latency_s),
             seconds(inst.duration_s), seconds(inst.retry_s) if inst.retry_s else "-",
             counts(inst.retries), (inst.agent or "-") + (" (fallback)" if inst.degraded else ""),
             tokens(inst.usage), money(inst.usage.cost))
            + ((worker_label(inst.worker) if inst.worker else "-",) if on_workers else ())
            + (error,)
        )
        classes = [c for c, on in (("crit", inst.id in on_path),
                                   (cls(inst.status), inst.status in FAILED),
                                   ("retried", any(t.failed for t in inst.tries))) if on]
        row_id = anchors.of(inst.id)
        attrs.append(f'id="{row_id}"' + (f' class="{" ".join(classes)}"' if classes else ""))
    header = ("step", "status", "attempts", "wait for a slot", "latency", "running",
              "in retries", "retries", "agent", "tokens", "cost") + (
        ("worker",) if on_workers else ()) + ("error",)
    return table(header, rows, {2, 3, 4, 5, 6, 9, 10}, attrs)


def _agents(report: Report) -> str:
    if not report.agents:
        return "<p>No agent was called.</p>"
    rows = [
        (a.agent, str(a.calls), seconds(percentile(a.latencies_s, 0.5)),
         seconds(percentile(a.latencies_s, 0.95)), counts(a.failures),
         str(a.breaker_openings), tokens(a.usage), money(a.usage.cost))
        for a in report.agents
    ]
    return table(("agent", "calls", "p50", "p95", "failures", "breaker openings", "tokens",
                  "cost"), rows, {1, 2, 3, 5, 6, 7})


def _workers(report: Report) -> str:
    rows = [
        (w.worker, str(w.steps), seconds(w.busy_s), str(w.failed), str(w.lost))
        for w in report.workers
    ]
    body = table(("worker", "steps", "busy", "failed steps", "attempts lost (worker_lost)"),
                 rows, {1, 2, 3, 4})
    return body + "<p>Busy: the steps' latest attempts on the worker, summed.</p>"
