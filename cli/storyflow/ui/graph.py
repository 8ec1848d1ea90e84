"""The compiled plan as a picture: Mermaid, Graphviz dot, or indented text."""

from __future__ import annotations

import re

from storyflow.engine.plan import Node, Plan

FORMATS = ("mermaid", "dot", "text")


def render(plan: Plan, fmt: str, *, title: str = "") -> str:
    if fmt == "mermaid":
        return _mermaid(plan)
    if fmt == "dot":
        return _dot(plan, title)
    return _text(plan)


def _label(node: Node) -> str:
    step = node.step
    what = step.agent or step.uses or "loop"
    if step.kind == "map":
        items = step.for_each if isinstance(step.for_each, str) else f"{len(step.for_each)} items"
        order = (
            "in order" if step.sequential else f"≤{step.max_parallel}" if step.max_parallel else ""
        )
        return f"{step.id} ({what}) × for_each {items}" + (f" [{order}]" if order else "")
    if step.kind == "loop" and step.loop is not None:
        loop = step.loop
        until = f" until {loop.until}" if loop.until else ""
        return f"{step.id} loop ≤{loop.max_iterations}{until}"
    if step.uses == "human":
        return f"{step.id} (human approval)"
    if step.uses == "workflow":
        return f"{step.id} (sub-workflow {step.with_.get('path', '?')})"
    return f"{step.id} ({what})"


_MERMAID_RESERVED = frozenset(
    {
        "end",
        "graph",
        "subgraph",
        "flowchart",
        "direction",
        "style",
        "class",
        "classdef",
        "click",
        "linkstyle",
        "default",
    }
)
"""Words Mermaid reads as keywords: a node id spelt like one breaks the diagram."""


class _MermaidIds:
    """A unique, valid Mermaid id per step path (step ids may hold '-', loops nest)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, ...], str] = {}
        self._used: set[str] = set()

    def __call__(self, path: tuple[str, ...]) -> str:
        found = self._ids.get(path)
        if found is not None:
            return found
        base = "__".join(re.sub(r"[^A-Za-z0-9_]", "_", part) for part in path)
        if base.lower() in _MERMAID_RESERVED:
            base += "_"
        candidate, n = base, 1
        while candidate in self._used:
            n += 1
            candidate = f"{base}_{n}"
        self._used.add(candidate)
        self._ids[path] = candidate
        return candidate


def _mermaid_quote(text: str) -> str:
    return '"' + text.replace('"', "#quot;") + '"'


def _mermaid(plan: Plan) -> str:
    lines = ["flowchart TD"]
    _mermaid_body(plan, lines, (), "  ", _MermaidIds())
    return "\n".join(lines) + "\n"


def _mermaid_body(
    plan: Plan, lines: list[str], prefix: tuple[str, ...], indent: str, ids: _MermaidIds
) -> None:
    for sid in plan.order:
        node = plan.nodes[sid]
        mid = ids((*prefix, sid))
        label = _mermaid_quote(_label(node))
        if node.body is not None:
            lines.append(f"{indent}subgraph {mid} [{label}]")
            lines.append(f"{indent}  direction TB")
            _mermaid_body(node.body, lines, (*prefix, sid), indent + "  ", ids)
            lines.append(f"{indent}end")
        elif node.step.kind == "map":
            lines.append(f"{indent}{mid}[[{label}]]")
        elif node.step.uses == "human":
            lines.append(f"{indent}{mid}{{{{{label}}}}}")
        elif node.step.uses == "workflow":
            lines.append(f"{indent}{mid}[/{label}/]")
        else:
            lines.append(f"{indent}{mid}[{label}]")
    for sid in plan.order:
        for dep in plan.nodes[sid].deps:
            lines.append(f"{indent}{ids((*prefix, dep))} --> {ids((*prefix, sid))}")
    for sid in plan.order:
        node = plan.nodes[sid]
        if node.body is not None and node.step.loop and node.step.loop.until:
            mid = ids((*prefix, sid))
            cond = _mermaid_quote(f"until {node.step.loop.until}")
            lines.append(f"{indent}{mid} -. {cond} .-> {mid}")


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot(plan: Plan, title: str) -> str:
    lines = [
        f"digraph {_dot_quote(title or 'workflow')} {{",
        "  rankdir=TB;",
        "  node [shape=box, style=rounded];",
    ]
    _dot_body(plan, lines, "", "  ")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_body(plan: Plan, lines: list[str], prefix: str, indent: str) -> None:
    for sid in plan.order:
        node = plan.nodes[sid]
        nid = _dot_quote(prefix + sid)
        if node.body is not None:
            lines.append(f"{indent}subgraph {_dot_quote('cluster_' + prefix + sid)} {{")
            lines.append(f"{indent}  label={_dot_quote(_label(node))}; style=dashed;")
            lines.append(f'{indent}  {nid} [shape=point, label=""];')
            _dot_body(node.body, lines, prefix + sid + ".", indent + "  ")
            lines.append(f"{indent}}}")
            continue
        shape = {"map": "box3d"}.get(node.step.kind, "box")
        if node.step.uses == "human":
            shape = "hexagon"
        elif node.step.uses == "workflow":
            shape = "component"
        lines.append(f"{indent}{nid} [label={_dot_quote(_label(node))}, shape={shape}];")
    for sid in plan.order:
        for dep in plan.nodes[sid].deps:
            lines.append(f"{indent}{_dot_quote(prefix + dep)} -> {_dot_quote(prefix + sid)};")


def _text(plan: Plan, indent: str = "") -> str:
    out = []
    for sid in plan.order:
        node = plan.nodes[sid]
        after = f"  ← {', '.join(node.deps)}" if node.deps else ""
        out.append(f"{indent}{_label(node)}{after}")
        if node.body is not None:
            out.append(_text(node.body, indent + "    ").rstrip("\n"))
    return "\n".join(out) + "\n"
