"""What a template reads, from its AST (Jinja-backed, imported on first need).

`Collector` walks a parsed template and records every free name it reads with the
constant steps that follow it (``steps.plot.output`` → ``steps``, ``plot``,
``output``), honouring the names a template binds itself (``{% for %}``, ``{% set %}``,
macros). The same walk does what Jinja's compiler would check, without generating
code: filters and tests that do not exist, a ``{% for %}`` assigning ``loop``, a block
defined twice. The types it fills (`Chain`, `Issue`) live in the Jinja-free ``_reads``.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Iterator
from typing import Final

from jinja2 import nodes

from storyflow.spec.templates._base import TemplateError, with_line
from storyflow.spec.templates._reads import Chain, Issue, Segment
from storyflow.spec.templates._sandbox import OWN_FILTERS

FORBIDDEN: Final[dict[type[nodes.Node], str]] = {
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from … import",
    nodes.Extends: "extends",
}
# Expression nodes that cannot build a container holding an Undefined.
_PLAIN_NODES: Final = (
    nodes.Name,
    nodes.Getattr,
    nodes.Getitem,
    nodes.Const,
    nodes.Compare,
    nodes.Operand,
    nodes.BinExpr,
    nodes.UnaryExpr,
    nodes.CondExpr,
    nodes.Concat,
    nodes.Slice,
    nodes.Test,
)


def constant(node: nodes.Node) -> Segment | None:
    """The value of a constant segment (``"k"``, ``0``, ``-1``), None for any other expression."""
    if isinstance(node, nodes.Const):
        value: object = node.value
        if type(value) is str or type(value) is int:
            return value
    if (
        isinstance(node, nodes.Neg)
        and isinstance(node.node, nodes.Const)
        and type(node.node.value) is int
    ):
        return -int(node.node.value)
    return None


def _target_names(node: nodes.Node) -> set[str]:
    if isinstance(node, nodes.Name):
        return {node.name}
    return {n.name for n in node.find_all(nodes.Name)}


class Collector:
    """Walks an AST collecting the free names it reads, honouring template-bound names.

    ``filters`` and ``tests`` are the names the environment defines; a filter or test
    outside them, and the other things Jinja's compiler refuses, land in ``issues``.
    """

    def __init__(
        self, ignore: Iterable[str], filters: Collection[str], tests: Collection[str]
    ) -> None:
        self.ignore = frozenset(ignore)
        self.filters = filters
        self.tests = tests
        self.chains: list[Chain] = []
        self.issues: list[Issue] = []
        self._blocks: set[str] = set()

    def body(self, stmts: Iterable[nodes.Node], bound: frozenset[str]) -> set[str]:
        leaked: set[str] = set()
        for stmt in stmts:
            new = self.visit(stmt, bound | leaked)
            leaked |= new
        return leaked

    def children(self, node: nodes.Node, bound: frozenset[str]) -> set[str]:
        leaked: set[str] = set()
        for name in node.fields:
            value = getattr(node, name, None)
            if isinstance(value, nodes.Node):
                leaked |= self.visit(value, bound | leaked)
            elif isinstance(value, list):
                leaked |= self.body((v for v in value if isinstance(v, nodes.Node)), bound | leaked)
        return leaked

    def visit(self, node: nodes.Node, bound: frozenset[str]) -> set[str]:
        """Record the reads under ``node``; return the names it binds for what follows."""
        if isinstance(node, nodes.Name):
            if node.ctx == "load" and node.name not in bound and node.name not in self.ignore:
                self.chains.append(Chain(node.name, []))
            return set()
        if isinstance(node, nodes.Getattr | nodes.Getitem):
            self.chain(node, bound)
            return set()
        if isinstance(node, nodes.Filter | nodes.Test):
            self._check_name(node)
            return self.children(node, bound)
        if isinstance(node, nodes.For):
            self.visit(node.iter, bound)
            targets = _target_names(node.target)
            if "loop" in targets:
                self.issues.append(Issue("template assigns to `loop` in a {% for %}", node.lineno,
                                         "`loop` is the loop's own variable; pick another name"))
            inner = bound | targets | {"loop"}
            if node.test is not None:
                self.visit(node.test, inner)
            self.body(node.body, inner)
            self.body(node.else_, bound)
            return set()
        if isinstance(node, nodes.Macro | nodes.CallBlock):
            for default in node.defaults:
                self.visit(default, bound)
            if isinstance(node, nodes.CallBlock):
                self.visit(node.call, bound)
            params = {arg.name for arg in node.args}
            inner = bound | params | {"varargs", "kwargs", "caller"}
            if isinstance(node, nodes.Macro):
                inner |= {node.name}
            self.body(node.body, inner)
            return {node.name} if isinstance(node, nodes.Macro) else set()
        if isinstance(node, nodes.With):
            for value in node.values:
                self.visit(value, bound)
            names: set[str] = set()
            for target in node.targets:
                names |= _target_names(target)
            self.body(node.body, bound | names)
            return set()
        if isinstance(node, nodes.Assign):
            self.visit(node.node, bound)
            if isinstance(node.target, nodes.NSRef):
                if node.target.name not in bound and node.target.name not in self.ignore:
                    self.chains.append(Chain(node.target.name, []))
                return set()
            return _target_names(node.target)
        if isinstance(node, nodes.AssignBlock):
            self.body(node.body, bound)
            if node.filter is not None:
                self.visit(node.filter, bound)
            return _target_names(node.target)
        if isinstance(node, nodes.Block):
            if node.name in self._blocks:
                self.issues.append(Issue(f"template defines block {node.name!r} twice", node.lineno,
                                         "give each {% block %} its own name"))
            self._blocks.add(node.name)
            self.children(node, bound)
            return set()
        if isinstance(node, nodes.Scope | nodes.FilterBlock):
            self.children(node, bound)
            return set()
        return self.children(node, bound)

    def _check_name(self, node: nodes.Filter | nodes.Test) -> None:
        is_filter = isinstance(node, nodes.Filter)
        known = self.filters if is_filter else self.tests
        if node.name in known:
            return
        what = "filter" if is_filter else "test"
        close = difflib.get_close_matches(node.name, sorted(known), n=1)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif is_filter:
            hint = f"use a Jinja built-in filter, or storyflow's {', '.join(OWN_FILTERS)}"
        else:
            hint = "use a Jinja built-in test, such as defined, none, number or string"
        message = f"template uses an unknown {what} {node.name!r}"
        self.issues.append(Issue(message, node.lineno, hint))

    def chain(self, node: nodes.Node, bound: frozenset[str]) -> None:
        steps: list[Segment | None] = []
        while isinstance(node, nodes.Getattr | nodes.Getitem):
            if isinstance(node, nodes.Getattr):
                steps.append(node.attr)
            else:
                const = constant(node.arg)
                if const is None:
                    self.visit(node.arg, bound)
                steps.append(const)
            node = node.node
        steps.reverse()
        if isinstance(node, nodes.Name) and node.ctx == "load":
            if node.name in bound or node.name in self.ignore:
                return
            segments: list[Segment] = []
            for seg in steps:
                if seg is None:
                    break
                segments.append(seg)
            self.chains.append(Chain(node.name, segments))
        else:
            self.visit(node, bound)


def is_plain(expr: nodes.Node) -> bool:
    """Whether ``expr`` cannot build a container that holds an Undefined."""
    return isinstance(expr, _PLAIN_NODES) and all(
        is_plain(child) for child in expr.iter_child_nodes()
    )


def reject_forbidden(ast: nodes.Template, source: str) -> None:
    """Raise `TemplateError` for ``{% include %}``, ``{% import %}``, ``{% extends %}``."""
    for node in _walk(ast):
        tag = FORBIDDEN.get(type(node))
        if tag is not None:
            lineno = node.lineno
            raise TemplateError(
                with_line(f"templates cannot use {{% {tag} %}}", source, lineno),
                lineno=lineno,
                hint="put the text in the workflow, or pass it in through inputs or a step",
            )


def _walk(node: nodes.Node) -> Iterator[nodes.Node]:
    """Every node under ``node``, in source order; iterative, as a tree may be deeper
    than Python's stack (Jinja parses ``a + a + … + a`` without recursing)."""
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(list(node.iter_child_nodes())))
