"""How deeply a parsed template nests, checked before Jinja compiles it (Jinja-backed).

Jinja compiles a template to Python source: each operator, filter, call and bracket,
and each ``.key`` or ``[index]`` of a reference, becomes a bracket inside the next;
each block an indent or two; each ``{% for %}`` a Python loop. Python's parser refuses
about 200 nested brackets, 100 indents and 20 nested loops, and Jinja's code generator
slows with the cube of the depth. `check` refuses a tree past storyflow's limits
(`MAX_NESTING`, `MAX_BLOCKS`, `MAX_LOOPS`, inside Python's) at the line where it
passes one, so ``validate`` (which only parses) reports what a run would meet, and a
run never hands Python code it refuses. The walk is iterative: Jinja's parser builds
``a + a + … + a`` or a long ``a.b.c…`` without recursing, as deep as it is long.
"""

from __future__ import annotations

from typing import Final

from jinja2 import nodes

from storyflow.spec.templates._base import (
    MAX_BLOCKS,
    MAX_LOOPS,
    MAX_NESTING,
    nested_too_deep,
)
from storyflow.spec.templates._names import constant
from storyflow.spec.templates._reads import Segment, reference_too_long

_CHAIN: Final = (nodes.Getattr, nodes.Getitem)


def check(tree: nodes.Node, source: str, offset: int = 0) -> None:
    """Raise TemplateError at the first place ``tree`` nests past a limit, in source order.

    ``offset``: lines of ``source`` before the text ``tree`` was parsed from.
    """
    # (node, expression depth, blocks around it, loops around it, whether it continues
    # the reference its parent is a segment of)
    stack: list[tuple[nodes.Node, int, int, int, bool]] = [(tree, 0, 0, 0, False)]
    while stack:
        node, depth, blocks, loops, linked = stack.pop()
        if isinstance(node, _CHAIN) and not linked:
            _check_reference(node, source, offset)
        children = list(node.iter_child_nodes())
        if isinstance(node, nodes.Stmt):
            depth = 0
            if "body" in node.fields:
                blocks += 1
                if blocks > MAX_BLOCKS:
                    raise nested_too_deep("blocks ({% if %}, {% for %} …)", MAX_BLOCKS,
                                          source, node.lineno + offset)
            if isinstance(node, nodes.For):
                loops += 1
                if loops > MAX_LOOPS:
                    raise nested_too_deep("{% for %} loops", MAX_LOOPS,
                                          source, node.lineno + offset)
        elif isinstance(node, nodes.Expr) and children:
            depth += 1
            if depth > MAX_NESTING:
                raise nested_too_deep("expressions (operators, filters, brackets …)",
                                      MAX_NESTING, source, node.lineno + offset)
        link = node.node if isinstance(node, _CHAIN) else None
        if isinstance(node, nodes.Getitem) and constant(node.arg) is not None:
            children = [node.node]  # ``[-1]`` is one segment, as ``[1]`` is
        for child in reversed(children):
            stack.append((child, depth, blocks, loops, child is link))


def _check_reference(top: nodes.Getattr | nodes.Getitem, source: str, offset: int) -> None:
    """Raise when the reference ending at ``top`` has more than `MAX_NESTING` segments."""
    segments: list[Segment | None] = []
    node: nodes.Node = top
    while isinstance(node, _CHAIN):
        segments.append(node.attr if isinstance(node, nodes.Getattr) else constant(node.arg))
        node = node.node
    if len(segments) > MAX_NESTING:
        segments.reverse()
        root = node.name if isinstance(node, nodes.Name) else None
        raise reference_too_long(root, segments, source, node.lineno + offset)
