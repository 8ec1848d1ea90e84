"""The HTML report's workflow graph: the plan as a picture, an inline SVG.

Top-level steps are boxes laid out by plan level, top to bottom (level 0 can start at
once); arrows are the direct dependencies (one implied by a longer path is left out).
A map is a labelled group holding its items, a loop a labelled group holding one row
per iteration with the body's steps in order — as far as the run knows them. Each box
is coloured by its status (a failure is red and thick) and links to its row in the
steps table, or to its child run's section for a sub-workflow step. Without the plan
(the workflow file changed or is gone) the steps are stacked in the order they ran,
with no arrows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from storyflow.report._markup import FAILED, Anchors, cls, e
from storyflow.report._model import InstanceReport, Report

BOX_H = 40
PART_W, PART_H = 104, 24
GAP = 14
LEVEL_GAP = 40
HEAD_H = 24
MAX_PARTS = 48
"""A map's items drawn at most (the rest are counted)."""
MAX_ITERATIONS = 12
_ITERATION = re.compile(r"#(\d+)\.")


@dataclass
class _Box:
    """One drawn thing: a step box, or a group (map, loop) with parts inside."""

    inst: InstanceReport
    w: float
    h: float
    x: float = 0.0
    y: float = 0.0
    inner: list[str] = field(default_factory=list)
    """The group's drawing, relative to its top-left corner."""


def graph_svg(report: Report, anchors: Anchors) -> str:
    """The workflow graph of one run."""
    steps = {i.id: i for i in report.steps}
    if not steps:
        return "<p>The run has no steps.</p>"
    levels = [[s for s in level if s in steps] for level in report.levels]
    levels = [level for level in levels if level]
    placed = {s for level in levels for s in level}
    note = ""
    if not levels:
        note = ("<p class=note>Dependencies unknown (the workflow file changed or is gone):"
                " the steps are stacked in plan order, without arrows.</p>")
    levels += [[s] for s in steps if s not in placed]
    parts = _parts(report)
    body_edges = _body_edges(report.edges)
    boxes = {sid: _box(steps[sid], parts.get(sid, []), body_edges, anchors) for level in levels
             for sid in level}
    width = max(sum(boxes[s].w for s in level) + GAP * (len(level) - 1) for level in levels)
    y = 8.0
    for level in levels:
        row_w = sum(boxes[s].w for s in level) + GAP * (len(level) - 1)
        x = 8 + (width - row_w) / 2
        for sid in level:
            box = boxes[sid]
            box.x, box.y = x, y
            x += box.w + GAP
        y += max(boxes[s].h for s in level) + LEVEL_GAP
    total_w, total_h = width + 16, y - LEVEL_GAP + 8
    arrows = [_arrow(boxes[step], boxes[needed]) for step, needed in _reduced(report.edges, boxes)]
    drawn = [_draw(box, anchors) for box in boxes.values()]
    return (f'{note}<div class="graph"><svg width="100%" viewBox="0 0 {total_w:.0f}'
            f' {total_h:.0f}" style="max-width:{total_w:.0f}px" role="img"'
            f' aria-label="workflow graph">{_MARKER}{"".join(arrows)}{"".join(drawn)}</svg></div>')


_MARKER = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"'
           ' markerHeight="7" orient="auto-start-reverse"><path d="M0 0L10 5L0 10z"'
           ' fill="#57606a"/></marker></defs>')


def _parts(report: Report) -> dict[str, list[InstanceReport]]:
    """Each map's items and each loop's iterations' steps, by top-level step."""
    out: dict[str, list[InstanceReport]] = {}
    for inst in report.instances:
        if inst.parent is not None and inst.parent == inst.step:
            out.setdefault(inst.step, []).append(inst)
    return out


def _body_edges(edges: Iterable[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Loop body dependencies (``loop.b`` needs ``loop.a``) by loop: [(b, a)]."""
    out: dict[str, list[tuple[str, str]]] = {}
    for step, needed in edges:
        loop, dot, inner = step.partition(".")
        if dot and needed.startswith(loop + "."):
            out.setdefault(loop, []).append((inner, needed[len(loop) + 1:]))
    return out


def _label_w(text: str) -> float:
    return max(110.0, min(240.0, 7.2 * len(text) + 26))


def _box(inst: InstanceReport, parts: list[InstanceReport],
         body_edges: Mapping[str, list[tuple[str, str]]], anchors: Anchors) -> _Box:
    if inst.kind == "map":
        return _map_box(inst, parts, anchors)
    if inst.kind == "loop":
        return _loop_box(inst, parts, body_edges.get(inst.id, []), anchors)
    sub = _sub(inst)
    return _Box(inst, max(_label_w(inst.id), _label_w(sub) * 0.9), BOX_H)


def _part(inst: InstanceReport, x: float, y: float, label: str, anchors: Anchors) -> str:
    href = anchors.href(inst)
    rect = (f'<rect class="node s-{cls(inst.status)}" x="{x:.0f}" y="{y:.0f}" width="{PART_W}"'
            f' height="{PART_H}" rx="4"><title>{e(inst.id)} · {e(inst.status)}</title></rect>'
            f'<text class="part" x="{x + PART_W / 2:.0f}" y="{y + 16:.0f}"'
            f' text-anchor="middle">{e(_clip(label, 14))}</text>')
    return f'<a href="{e(href)}">{rect}</a>' if href else rect


def _map_box(inst: InstanceReport, items: list[InstanceReport], anchors: Anchors) -> _Box:
    shown = items[:MAX_PARTS]
    per_row = max(1, min(len(shown), 6))
    rows = (len(shown) + per_row - 1) // per_row if shown else 0
    more = len(items) - len(shown)
    w = max(_label_w(inst.id) + 90, per_row * (PART_W + 6) + 18)
    h = HEAD_H + rows * (PART_H + 6) + (18 if more or not items else 0) + 10
    box = _Box(inst, w, h)
    for n, item in enumerate(shown):
        x = 12 + (n % per_row) * (PART_W + 6)
        y = HEAD_H + 4 + (n // per_row) * (PART_H + 6)
        box.inner.append(_part(item, x, y, item.id[len(inst.id):], anchors))
    tail = f"… and {more:,} more items" if more else ("" if items else "no items yet")
    if tail:
        box.inner.append(f'<text class="part" x="12" y="{h - 12:.0f}">{e(tail)}</text>')
    return box


def _loop_box(inst: InstanceReport, parts: list[InstanceReport],
              edges: Sequence[tuple[str, str]], anchors: Anchors) -> _Box:
    iterations: dict[int, list[InstanceReport]] = {}
    for part in parts:
        found = _ITERATION.search(part.id[len(inst.id):])
        if found:
            iterations.setdefault(int(found.group(1)), []).append(part)
    order = sorted(iterations)
    shown = order[-MAX_ITERATIONS:]
    level = _body_levels(edges)
    columns = 1 + max((level.get(_inner(p, inst.id), 0) for p in parts), default=0)
    stacked = max((sum(1 for p in iterations[n] if level.get(_inner(p, inst.id), 0) == c)
                   for n in shown for c in range(columns)), default=1)
    row_h = stacked * (PART_H + 6) + 6
    w = max(_label_w(inst.id) + 110, 48 + columns * (PART_W + 22) + 10)
    h = HEAD_H + max(len(shown), 1) * row_h + (18 if len(shown) < len(order) else 0) + 8
    box = _Box(inst, w, h)
    for r, n in enumerate(shown):
        y0 = HEAD_H + 4 + r * row_h
        box.inner.append(f'<text class="iter" x="10" y="{y0 + 16:.0f}">#{n}</text>')
        where: dict[str, tuple[float, float]] = {}
        used = [0] * columns
        for part in iterations[n]:
            c = level.get(_inner(part, inst.id), 0)
            x, y = 48 + c * (PART_W + 22), y0 + used[c] * (PART_H + 6)
            used[c] += 1
            where[_inner(part, inst.id)] = (x, y)
            box.inner.append(_part(part, x, y, _inner(part, inst.id), anchors))
        for step, needed in edges:
            if step in where and needed in where:
                (x2, y2), (x1, y1) = where[step], where[needed]
                box.inner.insert(0, f'<path class="edge" d="M{x1 + PART_W:.0f} {y1 + 12:.0f}'
                                    f' L{x2 - 2:.0f} {y2 + 12:.0f}" marker-end="url(#arrow)"/>')
    if not order:
        box.inner.append(f'<text class="part" x="12" y="{HEAD_H + 20}">no iteration yet</text>')
    elif len(shown) < len(order):
        box.inner.append(f'<text class="part" x="12" y="{h - 10:.0f}">… iterations'
                         f" {order[0]}–{order[-len(shown) - 1]} not drawn</text>")
    return box


def _inner(part: InstanceReport, loop: str) -> str:
    """``polish#2.revise`` → ``revise``."""
    return part.id[len(loop):].partition(".")[2]


def _body_levels(edges: Sequence[tuple[str, str]]) -> dict[str, int]:
    needs: dict[str, list[str]] = {}
    for step, needed in edges:
        needs.setdefault(step, []).append(needed)
    level: dict[str, int] = {}

    def of(step: str, seen: frozenset[str] = frozenset()) -> int:
        if step not in level:
            up = [of(n, seen | {step}) + 1 for n in needs.get(step, ()) if n not in seen]
            level[step] = max(up, default=0)
        return level[step]

    for step in list(needs):
        of(step)
    return level


def _reduced(edges: Iterable[tuple[str, str]], boxes: Mapping[str, _Box]) -> list[tuple[str, str]]:
    """Top-level (step, needed) pairs, without those a longer path implies."""
    needs: dict[str, set[str]] = {}
    for step, needed in edges:
        if step in boxes and needed in boxes:
            needs.setdefault(step, set()).add(needed)
    above: dict[str, set[str]] = {}

    def ancestors(step: str) -> set[str]:
        if step not in above:
            above[step] = set()  # a guard: plans have no cycles
            found: set[str] = set()
            for n in needs.get(step, ()):
                found |= {n} | ancestors(n)
            above[step] = found
        return above[step]

    out = []
    for step, direct in needs.items():
        for needed in sorted(direct):
            if not any(needed in ancestors(other) for other in direct if other != needed):
                out.append((step, needed))
    return out


def _arrow(child: _Box, parent: _Box) -> str:
    x1, y1 = parent.x + parent.w / 2, parent.y + parent.h
    x2, y2 = child.x + child.w / 2, child.y - 2
    bend = max(18.0, (y2 - y1) / 2)
    return (f'<path class="edge" d="M{x1:.0f} {y1:.0f} C{x1:.0f} {y1 + bend:.0f},'
            f' {x2:.0f} {y2 - bend:.0f}, {x2:.0f} {y2:.0f}" marker-end="url(#arrow)"/>')


def _draw(box: _Box, anchors: Anchors) -> str:
    inst = box.inst
    bad = " bad" if inst.status in FAILED else ""
    group = inst.kind != "task"
    css = f"{'group' if group else 'node'} s-{cls(inst.status)}{bad}"
    kind = {"map": " · map", "loop": " · loop"}.get(inst.kind, "")
    sub = _sub(inst)
    title = f"{inst.id}{kind} · {inst.status}"
    if inst.error_class:
        title += f" · {inst.error_class}: {inst.error_message or ''}"
    rect = (f'<rect class="{css}" x="{box.x:.0f}" y="{box.y:.0f}" width="{box.w:.0f}"'
            f' height="{box.h:.0f}" rx="6"><title>{e(title)}</title></rect>')
    if group:
        head = (f'<text class="label" x="{box.x + 10:.0f}" y="{box.y + 17:.0f}">'
                f'{e(_clip(inst.id, 24))}<tspan class="kind">{e(kind)} · {e(inst.status)}'
                "</tspan></text>")
    else:
        head = (f'<text class="label" x="{box.x + box.w / 2:.0f}" y="{box.y + 17:.0f}"'
                f' text-anchor="middle">{e(_clip(inst.id, 30))}</text>'
                f'<text class="sub" x="{box.x + box.w / 2:.0f}" y="{box.y + 32:.0f}"'
                f' text-anchor="middle">{e(sub)}</text>')
    href = anchors.href(inst)
    own = rect + head
    if href:
        own = f'<a href="{e(href)}">{own}</a>'
    inner = "".join(box.inner)
    if inner:
        inner = f'<g transform="translate({box.x:.0f} {box.y:.0f})">{inner}</g>'
    return f"<g>{own}{inner}</g>"


def _sub(inst: InstanceReport) -> str:
    """The second line of a step's box."""
    return inst.status + (" · child run ↓" if inst.child_run else "")


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
