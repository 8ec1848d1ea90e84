"""The diff as plain text for a terminal (`diff --format text`): no colour, aligned.

Runs of equal steps collapse into one line (``12 steps equal (conflict … plot)``),
unless ``--step`` asked for some. A changed step is followed by what changed in it:
its output as a compact word diff (``[-old-]{+new+}``, long equal stretches cut to
``…``) or as JSON changes (``~ /score: 7 → 9``), and its errors.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Sequence

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
from storyflow.compare._model import Change, Pair, RunDiff, RunSide, StepDiff, TextDiff
from storyflow.compare._words import text_diff

CONTEXT_WORDS = 6
"""Equal words kept on each side of a change in a compact word diff."""
BRIEF_CHARS = 360
"""A word diff is cut to this many characters in the overview (not with --step)."""
BRIEF_CHANGES = 6
"""JSON changes listed per step in the overview (not with --step)."""
BRIEF_LINES = 10
"""Lines under a step in the overview (not with --step)."""
_MARK = {"added": "+", "removed": "-", "changed": "~"}
_OK = ("succeeded", "cached")
"""Statuses of a step that has an output (null is one)."""
_LABEL = 13


def render_text(diff: RunDiff, *, width: int = 100, full: bool | None = None) -> str:
    """The whole diff; ``full`` (default: when ``--step`` was given) lists every step
    and every change in full."""
    full = diff.step is not None if full is None else full
    width = max(60, width)
    lines = [_run_line("A", diff.a), _run_line("B", diff.b), ""]
    lines += _run_fields(diff, width)
    lines.append("")
    lines += _steps(diff, width, full)
    lines.append("")
    lines += _totals(diff)
    if diff.artifacts:
        lines.append("")
        lines += _artifacts(diff, width, full)
    return "\n".join(lines).rstrip() + "\n"


def _run_line(name: str, side: RunSide) -> str:
    version = f" v{side.workflow_version}" if side.workflow_version else ""
    return (f"{name}  {side.run_id} · {side.workflow}{version} · {side.status}"
            f" · started {when(side.created_at)} · wall {seconds(side.wall_s)}")


def _labelled(label: str, lines: Sequence[str]) -> list[str]:
    pad = " " * _LABEL
    return [(label.ljust(_LABEL) if n == 0 else pad) + line for n, line in enumerate(lines)]


def _run_fields(diff: RunDiff, width: int) -> list[str]:
    a, b = diff.a, diff.b
    if a.workflow_path == b.workflow_path:
        where = a.workflow_path + (" (same source)" if a.source_hash == b.source_hash
                                   else f" (source changed: {a.source_hash} → {b.source_hash})")
    else:
        source = "same source" if a.source_hash == b.source_hash else "other source"
        where = f"{a.workflow_path} → {b.workflow_path} ({source})"
    out = _labelled("file", [where])
    if (a.workflow, a.workflow_version) != (b.workflow, b.workflow_version):
        va = f" v{a.workflow_version}" if a.workflow_version else ""
        vb = f" v{b.workflow_version}" if b.workflow_version else ""
        note = " (steps matched by id)" if a.workflow != b.workflow else ""
        out += _labelled("workflow", [f"{a.workflow}{va} → {b.workflow}{vb}{note}"])
    if a.status != b.status:
        out += _labelled("status", [f"{a.status} → {b.status}"])
    out += _labelled("lineage", [lineage_text(diff.lineage)])
    env = both(Pair(a.environment, b.environment), str, missing="(none)")
    out += _labelled("environment", [env if a.environment != b.environment else
                                     f"same {env}"])
    inputs = [_change_line(c, width - _LABEL, full=True, bare=True) for c in diff.inputs]
    n = len(a.inputs)
    out += _labelled("inputs", inputs or [f"same ({n} input{'s' if n != 1 else ''})"])
    sets = [_change_line(c, width - _LABEL, full=True, bare=True, words=False)
            for c in diff.sets]
    out += _labelled("--set", sets or ["same" + (f" ({' '.join(a.sets)})" if a.sets else
                                                 " (none)")])
    return out


def _steps(diff: RunDiff, width: int, full: bool) -> list[str]:
    s = diff.summary
    counts = [f"{s.equal} equal", f"{s.changed} changed"]
    counts += [f"{n} only in {side}" for n, side in ((s.only_a, "A"), (s.only_b, "B")) if n]
    if s.kept:
        counts.append(f"{s.kept} kept by the fork")
    scope = f" (--step {diff.step})" if diff.step is not None else ""
    n = len(diff.steps)
    out = _labelled("steps", [f"{n} instance{'s' if n != 1 else ''}{scope}: "
                              + ", ".join(counts)])
    if s.outputs_differ:
        names = ", ".join(s.outputs_differ)
        out += _labelled("", textwrap.wrap("outputs differ: " + names, width - _LABEL))
    if not diff.steps:
        return out
    header = ("STEP", "STATUS", "ORIGIN", "FP", "REQ", "ATTEMPTS", "TIME", "TOKENS", "COST")
    blocks: list[tuple[tuple[str, ...] | str, list[str]]] = []
    for group in _groups(diff.steps, full):
        if isinstance(group, list):
            n = len(group)
            names = group[0].id if n == 1 else f"{group[0].id} … {group[-1].id}"
            kept = sum(1 for g in group if g.origin == "kept")
            names += f"; {kept} kept by the fork" if kept else ""
            blocks.append((f"{n} step{'s' if n != 1 else ''} equal ({names})", []))
            continue
        blocks.append((_row(group), _details(group, width - 4, full)))
    rows = [header, *(b[0] for b in blocks if isinstance(b[0], tuple))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out += ["", line(header)]
    for row, details in blocks:
        out.append(line(row) if isinstance(row, tuple) else f"  {row}")
        out += [f"    {d}" for d in details]
    out += ["", *textwrap.wrap("FP: fingerprint (agent, configuration, inputs) · REQ: the"
                               " request sent to the agent · = same, ≠ differs, - not known",
                               width)]
    return out


def _groups(steps: Sequence[StepDiff], full: bool) -> Iterator[StepDiff | list[StepDiff]]:
    """Each step that differs; runs of equal steps as one list (each step with ``full``)."""
    run: list[StepDiff] = []
    for step in steps:
        if step.equal and not full:
            run.append(step)
            continue
        if run:
            yield run
            run = []
        yield step
    if run:
        yield run


def _row(step: StepDiff) -> tuple[str, ...]:
    return (
        step.id, both(step.status, str), ORIGINS[step.origin], MARKS[step.fingerprint],
        MARKS[step.request], both(step.attempts, str),
        both(step.duration_s, seconds), step_tokens(step), step_cost(step),
    )


def _details(step: StepDiff, width: int, full: bool) -> list[str]:
    """What changed in a step, at most `BRIEF_LINES` lines unless ``full``."""
    lines = list(_all_details(step, width, full))
    if full or len(lines) <= BRIEF_LINES:
        return lines
    return [*lines[: BRIEF_LINES - 1], f"… (--step {step.id} shows it all)"]


def _all_details(step: StepDiff, width: int, full: bool) -> Iterator[str]:
    for side, error in (("A", step.error.a), ("B", step.error.b)):
        if error is not None and step.error.a != step.error.b:
            yield f"error in {side}: {error_text(error)}"
    out = step.output
    if out.same or step.change in ("only_a", "only_b"):
        if step.change == "changed" and out.same and step.status.same:
            yield "output same" + (", fingerprint differs" if step.fingerprint == "different"
                                   else "") + (", request differs"
                                               if step.request == "different" else "")
        return
    whole = out.changes[0] if len(out.changes) == 1 and not out.changes[0].path else None
    if whole is not None and (whole.a is None or whole.b is None):
        side, value = ("A", whole.a) if whole.b is None else ("B", whole.b)
        if (step.status.b if side == "A" else step.status.a) not in _OK:
            yield f"output only in {side}: {short(value, width - 20)}"
            return
        # else: the other run's step succeeded with the output null, a value: a change
    if out.text is not None:
        yield from _wrapped("output: ", inline(out.text, None if full else BRIEF_CHARS), width)
        return
    changes = out.changes if full else out.changes[:BRIEF_CHANGES]
    for change in changes:
        yield from _wrapped("", _change_line(change, width, full=full), width)
    more = len(out.changes) - len(changes)
    if more > 0:
        yield f"… and {more} more change{'s' if more != 1 else ''} (--step {step.id} lists all)"


def _wrapped(lead: str, text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=lead, subsequent_indent="  ",
                         break_on_hyphens=False) or [lead.rstrip()]


def _change_line(change: Change, width: int, *, full: bool, bare: bool = False,
                 words: bool = True) -> str:
    """``~ /score: 7 → 9`` (a word diff for two strings of words); ``bare``: the path
    without its leading ``/`` (input names)."""
    path = change.path
    name = (path[1:] if bare and path.startswith("/") else path) or "(the whole value)"
    mark = _MARK[change.change]
    if change.change == "added":
        return f"{mark} {name}: {short(change.b)}"
    if change.change == "removed":
        return f"{mark} {name}: {short(change.a)}"
    if words and wordy(change.a, change.b):
        return f"{mark} {name}: " + inline(text_diff(change.a, change.b),
                                           None if full else BRIEF_CHARS // 2)
    return f"{mark} {name}: {short(change.a)} → {short(change.b)}"


def inline(diff: TextDiff, limit: int | None = BRIEF_CHARS) -> str:
    """A word diff on one line: ``… the [-old-]{+new+} word …``; paragraphs as ``¶``."""
    segs = diff.segments
    words: list[str] = []
    for n, (op, text) in enumerate(segs):
        flat = _flat(text)
        if op == "=":
            toks = flat.split()
            keep = CONTEXT_WORDS
            if n == 0 and len(toks) > keep + 2:
                toks = ["…", *toks[-keep:]]
            elif n == len(segs) - 1 and len(toks) > keep + 2:
                toks = [*toks[:keep], "…"]
            elif 0 < n < len(segs) - 1 and len(toks) > 2 * keep + 2:
                toks = [*toks[:keep], "…", *toks[-keep:]]
            words += toks
            continue
        body = " ".join(flat.split()) or ("¶" if "\n" in text else "␣")
        marked = f"[-{body}-]" if op == "-" else f"{{+{body}+}}"
        if op == "+" and words and words[-1].endswith("-]") and n and segs[n - 1][0] == "-":
            words[-1] += marked  # [-old-]{+new+}, as git --word-diff
        else:
            words.append(marked)
    text = " ".join(words)
    if limit is not None and len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text


def _flat(text: str) -> str:
    """Whitespace as single spaces; a blank line between paragraphs as `` ¶ ``."""
    return " ¶ ".join(" ".join(p.split()) for p in text.split("\n\n"))


def _totals(diff: RunDiff) -> list[str]:
    ta, tb = diff.totals.a, diff.totals.b
    wa, wb = diff.a.wall_s, diff.b.wall_s

    rows = [
        ("TOTALS", "A", "B", "B − A"),
        ("instances", str(ta.instances), str(tb.instances),
         signed(tb.instances - ta.instances, lambda v: f"{v:,.0f}")),
        ("attempts", str(ta.attempts), str(tb.attempts),
         signed(tb.attempts - ta.attempts, lambda v: f"{v:,.0f}")),
        ("running time", seconds(ta.duration_s), seconds(tb.duration_s),
         signed_seconds(tb.duration_s - ta.duration_s)),
        ("wall time", seconds(wa), seconds(wb),
         "-" if wa is None or wb is None else signed_seconds(wb - wa)),
        ("tokens", f"{ta.tokens:,}", f"{tb.tokens:,}",
         signed(tb.tokens - ta.tokens, lambda v: f"{v:,.0f}")),
        ("cost", total_cost(ta.tokens, ta.cost, ta.cost_known),
         total_cost(tb.tokens, tb.cost, tb.cost_known),
         cost_delta((ta.tokens, ta.cost, ta.cost_known), (tb.tokens, tb.cost, tb.cost_known))),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
           for r in rows]
    if diff.step is not None:
        out.append(f"(over the instances --step {diff.step} selects)")
    return out


def _artifacts(diff: RunDiff, width: int, full: bool) -> list[str]:
    names = {"same": "same", "changed": "changed", "only_a": "only in A",
             "only_b": "only in B"}
    rows = [(f.name, names[f.change], both(f.size, lambda n: f"{n:,}")) for f in diff.artifacts]
    header = ("ARTIFACT", "CHANGE", "BYTES")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(3)]

    def line(cells: tuple[str, str, str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header)]
    for row, f in zip(rows, diff.artifacts, strict=True):
        out.append(line(row))
        if f.diff is not None:
            brief = None if full else BRIEF_CHARS * 2
            out += [f"    {x}" for x in _wrapped("", inline(f.diff, brief), width - 4)]
        elif f.change == "changed":
            out.append("    (not text, or too large to show)")
    return out


__all__ = ["ABSENT", "inline", "render_text"]
