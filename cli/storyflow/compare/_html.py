"""The diff as one self-contained HTML page (`diff --format html`).

The look of `storyflow report --format html` (its escaping and pieces of markup are
shared: `storyflow.report._markup`): the two runs side by side, their inputs, the steps
(runs of equal ones folded into one row), totals, and the artifacts — a changed text
file (the story) in two columns like a diff viewer, A's words that went in
``<del>``, B's new ones in ``<ins>``. Inline CSS only: no script, no external resource,
no URL; every piece of text from a run is escaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from storyflow.compare._format import (
    ABSENT,
    MARKS,
    ORIGINS,
    both,
    cost_delta,
    error_text,
    lineage_text,
    seconds,
    short,
    signed,
    signed_seconds,
    step_cost,
    step_tokens,
    total_cost,
    when,
    wordy,
)
from storyflow.compare._model import ArtifactDiff, Change, RunDiff, StepDiff, TextDiff
from storyflow.compare._words import text_diff
from storyflow.report._markup import Raw, badge, e, table

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2rem 1.5rem;
color:#1f2328;background:#fff}
h1{font-size:1.4rem;margin:0 0 .3rem}h3{font-size:1rem;margin:1.4rem 0 .5rem}
h4{font-size:.95rem;margin:1rem 0 .4rem}
.meta{color:#57606a;margin:0}.note{color:#57606a}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;width:100%}
th,td{padding:.25rem .6rem;border-bottom:1px solid #d0d7de;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600;white-space:nowrap}td.n,th.n{text-align:right}
td.n{white-space:nowrap}
tr.diff td{background:#fff8c5}tr.diff td:first-child{box-shadow:inset 4px 0 #d4a72c}
tr.only td:first-child{box-shadow:inset 4px 0 #8250df}
tr.same td{color:#57606a}tr.fold td{color:#57606a;font-style:italic}
tr.detail td{background:#fff;border-bottom:2px solid #d0d7de}
.badge{display:inline-block;padding:0 .5rem;border-radius:1rem;color:#fff;font-weight:600;
font-size:.85em;white-space:nowrap}
.b-succeeded,.b-cached,.b-kept{background:#1a7f37}.b-failed,.b-cancelled{background:#cf222e}
.b-running,.b-waiting,.b-ready{background:#0969da}
.b-interrupted,.b-skipped,.b-pending{background:#6e7781}.b-retrying{background:#bc4c00}
.err{color:#a40e26;font-weight:600}
del{background:#ffebe9;color:#82071e;text-decoration:line-through}
ins{background:#dafbe1;color:#116329;text-decoration:none}
.sbs{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:.8rem}
.pane{white-space:pre-wrap;overflow-wrap:anywhere;border:1px solid #d0d7de;border-radius:6px;
padding:.5rem .8rem;font:13px/1.5 ui-serif,Georgia,serif;max-height:40rem;overflow-y:auto}
.pane.full{max-height:none}.pane.code{font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,monospace}
.pane .absent{color:#57606a;font-style:italic}
.side{font-weight:600;color:#57606a;font-size:.85em;margin-bottom:.2rem}
details summary{cursor:pointer;color:#0969da}
"""


def render_html(diff: RunDiff) -> str:
    a, b = diff.a, diff.b
    title = a.workflow if a.workflow == b.workflow else f"{a.workflow} → {b.workflow}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>storyflow diff · {e(a.run_id)} · {e(b.run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>storyflow diff · {e(title)}</h1>",
        f'<p class="meta">A {e(a.run_id)} {badge(a.status)} · B {e(b.run_id)}'
        f" {badge(b.status)} · {e(lineage_text(diff.lineage))}</p>",
        "<h3>Runs</h3>", _runs(diff),
        "<h3>Inputs and settings</h3>", _inputs(diff),
        "<h3>Steps</h3>", _steps(diff),
        "<h3>Totals</h3>", _totals(diff),
    ]
    if diff.artifacts:
        parts += ["<h3>Artifacts</h3>", _artifacts(diff.artifacts)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _rows_table(header: Sequence[str], rows: Iterable[tuple[Sequence[Any], bool]],
                right: frozenset[int] = frozenset()) -> str:
    """A table whose rows that differ (the flag) are marked."""
    cells, attrs = [], []
    for row, differs in rows:
        cells.append(row)
        attrs.append('class="diff"' if differs else "")
    return table(header, cells, set(right), attrs)


def _runs(diff: RunDiff) -> str:
    a, b = diff.a, diff.b
    rows: list[tuple[Sequence[Any], bool]] = [
        (("run", a.run_id, b.run_id), False),
        (("workflow", a.workflow, b.workflow), a.workflow != b.workflow),
        (("version", a.workflow_version or "-", b.workflow_version or "-"),
         a.workflow_version != b.workflow_version),
        (("file", a.workflow_path, b.workflow_path), a.workflow_path != b.workflow_path),
        (("source hash", a.source_hash, b.source_hash), a.source_hash != b.source_hash),
        (("status", badge(a.status), badge(b.status)), a.status != b.status),
        (("environment", a.environment or "-", b.environment or "-"),
         a.environment != b.environment),
        (("started", when(a.created_at), when(b.created_at)), False),
        (("wall time", seconds(a.wall_s), seconds(b.wall_s)), False),
        (("made from", a.forked_from or "-", b.forked_from or "-"), False),
    ]
    return _rows_table(("", "A", "B"), rows)


def _inputs(diff: RunDiff) -> str:
    a, b = diff.a, diff.b
    changed = {c.path for c in diff.inputs}
    rows: list[tuple[Sequence[Any], bool]] = []
    for key in [*a.inputs, *(k for k in b.inputs if k not in a.inputs)]:
        va = short(a.inputs[key], 200) if key in a.inputs else ABSENT
        vb = short(b.inputs[key], 200) if key in b.inputs else ABSENT
        differs = any(p == "/" + key or p.startswith(f"/{key}/") for p in changed)
        rows.append(((f"input {key}", va, vb), differs))
    set_paths = {c.path for c in diff.sets}
    for path in dict.fromkeys([*_paths(a.sets), *_paths(b.sets)]):
        va, vb = _set_value(a.sets, path), _set_value(b.sets, path)
        rows.append(((f"--set {path}", va, vb), path in set_paths))
    if not rows:
        return '<p class="note">No inputs and no --set in either run.</p>'
    return _rows_table(("", "A", "B"), rows)


def _paths(sets: Sequence[str]) -> list[str]:
    return [s.partition("=")[0].strip() for s in sets]


def _set_value(sets: Sequence[str], path: str) -> str:
    found = [s.partition("=")[2] for s in sets if s.partition("=")[0].strip() == path]
    return found[-1] if found else ABSENT


def _steps(diff: RunDiff) -> str:
    s = diff.summary
    counts = (f"{len(diff.steps):,} instances: {s.equal:,} equal, {s.changed:,} changed,"
              f" {s.only_a:,} only in A, {s.only_b:,} only in B; {s.kept:,} kept by the fork")
    scope = f" (--step {diff.step})" if diff.step is not None else ""
    lead = f'<p class="note">{e(counts + scope)}.'
    if s.outputs_differ:
        lead += f" Outputs differ: {e(', '.join(s.outputs_differ))}."
    lead += (" Fingerprint: the step's agent, configuration and inputs; request: what was"
             " sent to the agent (= same, ≠ differs, - not known).</p>")
    if not diff.steps:
        return lead
    head = ("step", "status A", "status B", "origin", "fingerprint", "request", "attempts",
            "time", "tokens", "cost")
    right = {6, 7, 8, 9}
    ths = "".join(f'<th{" class=n" if i in right else ""}>{e(h)}</th>' for i, h in
                  enumerate(head))
    body: list[str] = []
    fold: list[StepDiff] = []

    def flush() -> None:
        if fold:
            names = ", ".join(f.id for f in fold[:12]) + (" …" if len(fold) > 12 else "")
            n, kept = len(fold), sum(1 for f in fold if f.origin == "kept")
            note = f" ({kept:,} kept by the fork)" if kept else ""
            body.append(f'<tr class="fold"><td colspan="{len(head)}">{n:,} step'
                        f"{'s' if n != 1 else ''} equal{note}: {e(names)}</td></tr>")
            fold.clear()

    for step in diff.steps:
        if step.equal and diff.step is None:
            fold.append(step)
            continue
        flush()
        cells = (e(step.id), _status(step.status.a), _status(step.status.b),
                 e(ORIGINS[step.origin]), e(MARKS[step.fingerprint]), e(MARKS[step.request]),
                 e(both(step.attempts, str)), e(both(step.duration_s, seconds)),
                 e(step_tokens(step)), e(step_cost(step)))
        kind = "same" if step.equal else "only" if step.origin.startswith("only") else "diff"
        tds = "".join(f'<td{" class=n" if i in right else ""}>{c}</td>'
                      for i, c in enumerate(cells))
        body.append(f'<tr class="{kind}">{tds}</tr>')
        detail = _detail(step)
        if detail:
            body.append(f'<tr class="detail"><td colspan="{len(head)}">{detail}</td></tr>')
    flush()
    return (f"{lead}<div class=scroll><table><thead><tr>{ths}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _status(status: str | None) -> str:
    return ABSENT if status is None else badge(status)


def _detail(step: StepDiff) -> str:
    parts = [f'<p class="err">error in {side}: {e(error_text(err))}</p>'
             for side, err in (("A", step.error.a), ("B", step.error.b))
             if err is not None and step.error.a != step.error.b]
    out = step.output
    if out.same or step.origin.startswith("only"):
        return "".join(parts)
    if out.text is not None:
        parts.append(side_by_side(out.text, code=False))
    else:
        parts.append(_changes(out.changes))
    return "".join(parts)


def _changes(changes: Sequence[Change]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    for c in changes:
        name = c.path or "(the whole value)"
        if c.change == "changed" and wordy(c.a, c.b):
            words = text_diff(c.a, c.b)
            rows.append((name, c.change, Raw(_pane_text(words, "a")),
                         Raw(_pane_text(words, "b"))))
        else:
            rows.append((name, c.change, short(c.a, 300) if c.change != "added" else ABSENT,
                         short(c.b, 300) if c.change != "removed" else ABSENT))
    return table(("path", "change", "A", "B"), rows, set())


def _pane_text(diff: TextDiff, side: str) -> str:
    """One side of a diff: the words both have, and this side's own marked."""
    own, tag = ("-", "del") if side == "a" else ("+", "ins")
    return "".join(e(t) if op == "=" else f"<{tag}>{e(t)}</{tag}>"
                   for op, t in diff.segments if op in ("=", own))


def side_by_side(diff: TextDiff | None, *, code: bool, a: str | None = None,
                 b: str | None = None, full: bool = False) -> str:
    """Two columns, A and B; from a diff, or (no diff) each side's text as it is.
    ``full``: as long as the text (else the panes scroll)."""
    cls = "pane" + (" code" if code else "") + (" full" if full else "")

    def pane(side: str, text: str | None) -> str:
        if diff is not None:
            body = _pane_text(diff, side)
        else:
            body = '<span class="absent">(not in this run)</span>' if text is None else e(text)
        return f'<div><div class="side">{side.upper()}</div><div class="{cls}">{body}</div></div>'

    return f'<div class="sbs">{pane("a", a)}{pane("b", b)}</div>'


def _totals(diff: RunDiff) -> str:
    ta, tb = diff.totals.a, diff.totals.b
    wa, wb = diff.a.wall_s, diff.b.wall_s

    number = "{:,.0f}".format
    rows = [
        ("instances", f"{ta.instances:,}", f"{tb.instances:,}",
         signed(tb.instances - ta.instances, number)),
        ("attempts", f"{ta.attempts:,}", f"{tb.attempts:,}",
         signed(tb.attempts - ta.attempts, number)),
        ("running time", seconds(ta.duration_s), seconds(tb.duration_s),
         signed_seconds(tb.duration_s - ta.duration_s)),
        ("wall time", seconds(wa), seconds(wb),
         "-" if wa is None or wb is None else signed_seconds(wb - wa)),
        ("tokens", f"{ta.tokens:,}", f"{tb.tokens:,}", signed(tb.tokens - ta.tokens, number)),
        ("cost", total_cost(ta.tokens, ta.cost, ta.cost_known),
         total_cost(tb.tokens, tb.cost, tb.cost_known),
         cost_delta((ta.tokens, ta.cost, ta.cost_known), (tb.tokens, tb.cost, tb.cost_known))),
    ]
    return table(("", "A", "B", "B − A"), rows, {1, 2, 3})


def _artifacts(files: Sequence[ArtifactDiff]) -> str:
    names = {"same": "same", "changed": "changed", "only_a": "only in A",
             "only_b": "only in B"}
    rows = [((f.name, names[f.change], both(f.size, "{:,}".format)), f.change != "same")
            for f in files]
    out = [_rows_table(("file", "change", "bytes"), rows, frozenset({2}))]
    for f in files:
        code = not f.name.endswith((".md", ".txt"))
        if f.change == "changed" and f.diff is not None:
            out.append(f"<h4>{e(f.name)} · changed</h4>"
                       + side_by_side(f.diff, code=code, full=True))
        elif f.change == "same" and f.text.a is not None:
            out.append(f"<details><summary>{e(f.name)} · the same in both runs</summary>"
                       f'<div class="{"pane code" if code else "pane"}">{e(f.text.a)}</div>'
                       "</details>")
        elif f.change in ("only_a", "only_b") and (f.text.a or f.text.b) is not None:
            out.append(f"<h4>{e(f.name)} · {names[f.change]}</h4>"
                       + side_by_side(None, code=code, a=f.text.a, b=f.text.b, full=True))
        elif f.change == "changed":
            out.append(f'<p class="note">{e(f.name)}: not text, or too large to show.</p>')
    return "\n".join(out)
