"""What a template reads, from its AST: names for dependencies, and misses for messages.

`Collector` walks a parsed template and records every free name it reads with the
constant steps that follow it (``steps.plot.output`` → ``steps``, ``plot``,
``output``), honouring the names a template binds itself (``{% for %}``, ``{% set %}``,
macros). The same walk does what Jinja's compiler would check, without generating
code: filters and tests that do not exist, a ``{% for %}`` assigning ``loop``, a block
defined twice. `misses` explains a failed read against the scope it rendered in.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from jinja2 import nodes

from storyflow.spec.templates._sandbox import OWN_FILTERS, TemplateError, with_line

Segment = str | int

_IDENT_RE: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")

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


@dataclass(frozen=True, slots=True)
class Reference:
    """One name a template reads, with the first two constant steps after it."""

    root: str
    """Top-level name: ``steps``, ``inputs``, ``config``, ``loop``, ``item`` …"""
    key: str | None
    """First constant attribute/subscript after the root (``plot`` in ``steps.plot``)."""
    attr: str | None
    """Second constant attribute (``output``, ``status``, ``attempts``), else None."""


class Chain:
    """A name read by a template, with the constant segments that follow it."""

    __slots__ = ("root", "segments")

    def __init__(self, root: str, segments: list[Segment]) -> None:
        self.root = root
        self.segments = segments


@dataclass(frozen=True, slots=True)
class Issue:
    """What Jinja's compiler would refuse, found in the tree."""

    message: str
    lineno: int
    """1-based line inside the parsed text."""
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class Parsed:
    """One source's reads and compile issues (cached per source)."""

    chains: list[Chain]
    issues: list[TemplateError] = field(default_factory=list)
    """What Jinja's compiler would refuse, located in the source."""


def _constant(node: nodes.Node) -> Segment | None:
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
                const = _constant(node.arg)
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
    yield node
    for child in node.iter_child_nodes():
        yield from _walk(child)


# --------------------------------------------------------------------------- misses


@dataclass(frozen=True, slots=True)
class _Miss:
    name: Segment
    message: str
    hint: str | None


def _display(root: str, segments: Iterable[Segment]) -> str:
    out = root
    for seg in segments:
        if isinstance(seg, str) and _IDENT_RE.match(seg):
            out += f".{seg}"
        else:
            out += f"[{seg!r}]"
    return out


def _suggest(word: str, options: Iterable[Any]) -> str | None:
    names = sorted(str(o) for o in options if isinstance(o, str) and not o.startswith("_"))
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    if names:
        shown = ", ".join(names[:12]) + (", …" if len(names) > 12 else "")
        return f"available: {shown}"
    return None


def _misses(chains: Iterable[Chain], scope: Mapping[str, Any]) -> Iterator[_Miss]:
    """Every read in ``chains`` that fails in ``scope``, as a readable message and hint."""
    for chain in chains:
        if chain.root not in scope:
            hint = _suggest(chain.root, scope.keys())
            yield _Miss(chain.root, f"{chain.root!r} is undefined", hint)
            continue
        cur: Any = scope[chain.root]
        for i, seg in enumerate(chain.segments):
            where = _display(chain.root, chain.segments[:i])
            if isinstance(cur, Mapping):
                if seg in cur:
                    cur = cur[seg]
                    continue
                if isinstance(seg, str) and not seg.startswith("_") and hasattr(cur, seg):
                    break  # a mapping method such as .items(): not a miss
                word = "attribute" if isinstance(seg, str) else "item"
                hint = _suggest(str(seg), cur.keys())
                yield _Miss(seg, f"{where!r} has no {word} {seg!r}", hint)
            elif isinstance(cur, list | tuple) and type(seg) is int:
                if -len(cur) <= seg < len(cur):
                    cur = cur[seg]
                    continue
                count = f"{len(cur)} item" + ("" if len(cur) == 1 else "s")
                yield _Miss(seg, f"{where!r} has no item {seg} (it has {count})", None)
            elif cur is None:
                yield _Miss(seg, f"{where!r} is None, so it has no attribute {seg!r}", None)
            elif isinstance(seg, str) and not seg.startswith("_") and hasattr(cur, seg):
                pass  # a method of a str, list …: not a miss
            else:
                kind = type(cur).__name__
                yield _Miss(seg, f"{where!r} is a {kind} and has no attribute {seg!r}", None)
            break


def diagnose(
    chains: Iterable[Chain], scope: Mapping[str, Any], jinja_message: str
) -> tuple[str, str | None] | None:
    """The miss Jinja's message is about, when we can tell which one it is."""
    for miss in _misses(chains, scope):
        if repr(miss.name) in jinja_message:
            return miss.message, miss.hint
    return None
