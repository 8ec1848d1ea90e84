"""Jinja2 templates and expressions, sandboxed: the only module that imports jinja2.

A workflow string holding ``{{`` or ``{%`` is a template. :class:`Templates` compiles
each distinct source once and renders it in an ``ImmutableSandboxedEnvironment`` with
``StrictUndefined``: templates can read the scope (plain ``dict``/``list`` values) but
cannot reach Python internals, mutate the scope, include or import other templates.

* A string that is exactly one ``{{ expr }}`` yields the expression's native value.
  When ``expr`` is a plain dotted path (``steps.plot.output.sections[0].title``) the
  scope is walked directly, without Jinja; a miss falls back to Jinja so the result
  and the error are the same either way.
* Attribute access on a mapping prefers the mapping's key: ``output.items`` is the
  ``items`` key of the output when it has one, not ``dict.items``.
* ``when``/``until``/``for_each`` are bare expressions (:meth:`Templates.evaluate`).
* :meth:`Templates.references` reads the names a template uses from its AST, for
  dependency inference and validation.

Every jinja2 exception, and anything raised while rendering, becomes a
:class:`TemplateError` chained with ``from``.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jinja2
from jinja2 import nodes
from jinja2.environment import Template, TemplateExpression
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.parser import Parser
from jinja2.runtime import Context, StrictUndefined, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from storyflow.errors import PermanentError

__all__ = ["Reference", "TemplateError", "Templates"]

MAX_CACHE: Final = 4096
"""Compiled sources kept per cache; the cache is cleared when it grows past this."""
MAX_SEQUENCE: Final = 10_000_000
"""Largest string or list a template may build with ``*``."""
MAX_EXPONENT: Final = 4096
"""Largest integer exponent a template may use with ``**``."""

_TEMPLATE_FILE: Final = "<template>"
_MARKERS: Final = ("{{", "{%")
_SINGLE_RE: Final = re.compile(r"\A\s*\{\{(.*)\}\}\s*\Z", re.DOTALL)
_PATH_RE: Final = re.compile(
    r"\A([A-Za-z][A-Za-z0-9_]*)"
    r"((?:\.[A-Za-z][A-Za-z0-9_]*|\.(?:0|[1-9][0-9]*)|\[\s*-?(?:0|[1-9][0-9]*)\s*\])*)\Z"
)
_SEGMENT_RE: Final = re.compile(r"\.([A-Za-z][A-Za-z0-9_]*)|\.([0-9]+)|\[\s*(-?[0-9]+)\s*\]")
_IDENT_RE: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_RESERVED: Final = frozenset(
    {
        "true",
        "false",
        "none",
        "True",
        "False",
        "None",
        "and",
        "or",
        "not",
        "in",
        "is",
        "if",
        "else",
        "recursive",
        "with",
        "without",
    }
)
_FORBIDDEN: Final[dict[type[nodes.Node], str]] = {
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

_Segment = str | int
_Path = tuple[str, tuple[_Segment, ...]]
_MISSING: Final = object()


class TemplateError(PermanentError):
    """A template failed to compile or render.

    ``lineno`` is the 1-based line inside the template source, or None.
    """

    def __init__(self, message: str, *, lineno: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.lineno = lineno


@dataclass(frozen=True, slots=True)
class Reference:
    """One name a template reads, with the first two constant steps after it."""

    root: str
    """Top-level name: ``steps``, ``inputs``, ``config``, ``loop``, ``item`` …"""
    key: str | None
    """First constant attribute/subscript after the root (``plot`` in ``steps.plot``)."""
    attr: str | None
    """Second constant attribute (``output``, ``status``, ``attempts``), else None."""


# --------------------------------------------------------------------------- environment


def _tojson(value: Any, indent: int | None = None) -> str:
    _reject_undefined(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=False, indent=indent)


def _fromjson(value: str) -> Any:
    return json.loads(value)


def _wordcount(value: Any) -> int:
    return len(str(value).split())


def _reject_undefined(value: Any, depth: int = 0) -> None:
    """Raise the undefined error of the first Undefined inside a container value."""
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises its UndefinedError / SecurityError here
    if depth > 50:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_undefined(k, depth + 1)
            _reject_undefined(v, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            _reject_undefined(v, depth + 1)


def _finalize(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        _reject_undefined(value)
    return value


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with mapping keys winning over methods and size limits on ``*``/``**``."""

    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT and left not in (0, 1, -1):
                raise SecurityError(f"exponent {right} is too large for a template")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(n, int)
                    and len(seq) * n > MAX_SEQUENCE
                ):
                    raise SecurityError("a template may not build a sequence this large")
        return super().call_binop(context, operator, left, right)


def _make_environment() -> _Environment:
    env = _Environment(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson
    env.filters["fromjson"] = _fromjson
    env.filters["wordcount"] = _wordcount
    return env


# --------------------------------------------------------------------------- plans


class _Plan:
    """How to render one source string, decided once and cached."""

    __slots__ = ("expr", "offset", "path", "scan", "single", "template")

    def __init__(self) -> None:
        self.single: str | None = None
        """The expression of a ``{{ expr }}`` string, None when the source is text."""
        self.offset = 0
        """Lines before ``single`` starts in the source."""
        self.path: _Path | None = None
        """The fast path, when ``single`` is a plain dotted path."""
        self.expr: TemplateExpression | None = None
        self.scan = True
        """Whether the expression's value must be searched for Undefined."""
        self.template: Template | None = None


def _single_expression(source: str) -> tuple[str, int] | None:
    """The inner expression when ``source`` is exactly one ``{{ expr }}``, with its line offset."""
    m = _SINGLE_RE.match(source)
    if m is None:
        return None
    inner = m.group(1)
    if any(tok in inner for tok in ("{{", "}}", "{%", "%}", "{#", "#}")):
        return None
    if inner[:1] in ("-", "+"):
        inner = inner[1:]
    if inner[-1:] in ("-", "+"):
        inner = inner[:-1]
    if not inner.strip():
        return None
    return inner, source.count("\n", 0, m.start(1))


def _parse_path(expr: str) -> _Path | None:
    """``root`` and constant segments of a plain dotted path, or None."""
    m = _PATH_RE.match(expr.strip())
    if m is None or m.group(1) in _RESERVED:
        return None
    segments: list[_Segment] = []
    for seg in _SEGMENT_RE.finditer(m.group(2)):
        name, dot_index, index = seg.groups()
        if name is not None:
            segments.append(name)
        else:
            segments.append(int(dot_index if dot_index is not None else index))
    return m.group(1), tuple(segments)


def _walk_path(path: _Path, scope: Mapping[str, Any]) -> Any:
    """Resolve a plain path in plain data; ``_MISSING`` when anything is not plain."""
    cur = scope.get(path[0], _MISSING)
    if cur is _MISSING:
        return _MISSING
    for seg in path[1]:
        if isinstance(cur, Mapping):
            try:
                cur = cur[seg]
            except (KeyError, TypeError):
                return _MISSING
        elif type(seg) is int and isinstance(cur, list | tuple):
            try:
                cur = cur[seg]
            except IndexError:
                return _MISSING
        else:
            return _MISSING
    return cur


# --------------------------------------------------------------------------- AST helpers


def _constant(node: nodes.Node) -> _Segment | None:
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


class _Chain:
    """A name read by a template, with the constant segments that follow it."""

    __slots__ = ("root", "segments")

    def __init__(self, root: str, segments: list[_Segment]) -> None:
        self.root = root
        self.segments = segments


@dataclass(frozen=True, slots=True)
class _Miss:
    name: _Segment
    message: str
    hint: str | None


class _Collector:
    """Walks an AST collecting the free names it reads, honouring template-bound names."""

    def __init__(self, ignore: Iterable[str]) -> None:
        self.ignore = frozenset(ignore)
        self.chains: list[_Chain] = []

    def body(self, stmts: Iterable[nodes.Node], bound: frozenset[str]) -> set[str]:
        leaked: set[str] = set()
        for stmt in stmts:
            new = self.visit(stmt, bound | leaked)
            leaked |= new
        return leaked

    def children(self, node: nodes.Node, bound: frozenset[str]) -> set[str]:
        leaked: set[str] = set()
        for field in node.fields:
            value = getattr(node, field, None)
            if isinstance(value, nodes.Node):
                leaked |= self.visit(value, bound | leaked)
            elif isinstance(value, list):
                leaked |= self.body((v for v in value if isinstance(v, nodes.Node)), bound | leaked)
        return leaked

    def visit(self, node: nodes.Node, bound: frozenset[str]) -> set[str]:
        """Record the reads under ``node``; return the names it binds for what follows."""
        if isinstance(node, nodes.Name):
            if node.ctx == "load" and node.name not in bound and node.name not in self.ignore:
                self.chains.append(_Chain(node.name, []))
            return set()
        if isinstance(node, nodes.Getattr | nodes.Getitem):
            self.chain(node, bound)
            return set()
        if isinstance(node, nodes.For):
            self.visit(node.iter, bound)
            inner = bound | _target_names(node.target) | {"loop"}
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
                    self.chains.append(_Chain(node.target.name, []))
                return set()
            return _target_names(node.target)
        if isinstance(node, nodes.AssignBlock):
            self.body(node.body, bound)
            if node.filter is not None:
                self.visit(node.filter, bound)
            return _target_names(node.target)
        if isinstance(node, nodes.Block | nodes.Scope | nodes.FilterBlock):
            self.children(node, bound)
            return set()
        return self.children(node, bound)

    def chain(self, node: nodes.Node, bound: frozenset[str]) -> None:
        steps: list[_Segment | None] = []
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
            segments: list[_Segment] = []
            for seg in steps:
                if seg is None:
                    break
                segments.append(seg)
            self.chains.append(_Chain(node.name, segments))
        else:
            self.visit(node, bound)


def _is_plain(expr: nodes.Node) -> bool:
    return isinstance(expr, _PLAIN_NODES) and all(
        _is_plain(child) for child in expr.iter_child_nodes()
    )


def _display(root: str, segments: Iterable[_Segment]) -> str:
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


def _misses(chains: Iterable[_Chain], scope: Mapping[str, Any]) -> Iterator[_Miss]:
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


def _diagnose(
    chains: Iterable[_Chain], scope: Mapping[str, Any], jinja_message: str
) -> tuple[str, str | None] | None:
    """The miss Jinja's message is about, when we can tell which one it is."""
    for miss in _misses(chains, scope):
        if repr(miss.name) in jinja_message:
            return miss.message, miss.hint
    return None


def _template_lineno(exc: BaseException) -> int | None:
    lineno = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILE:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return lineno


# --------------------------------------------------------------------------- Templates


class Templates:
    """Compiles each distinct template once and renders it in a sandbox.

    Compiled templates and expressions are cached in dicts keyed by source; the
    environment is an ``ImmutableSandboxedEnvironment`` with ``StrictUndefined``.
    """

    def __init__(self) -> None:
        self._env = _make_environment()
        self._plans: dict[str, _Plan] = {}
        self._templates: dict[str, Template] = {}
        self._exprs: dict[str, tuple[TemplateExpression, bool]] = {}
        self._bare: dict[str, _Plan] = {}
        self._chain_cache: dict[tuple[str, bool], list[_Chain]] = {}
        self._ignore = frozenset(self._env.globals)

    # ----------------------------------------------------------------- public API

    def is_template(self, value: object) -> bool:
        """Whether ``value`` is a string holding ``{{`` or ``{%``."""
        return isinstance(value, str) and ("{{" in value or "{%" in value)

    def render(self, value: Any, scope: Mapping[str, Any]) -> Any:
        """Render ``value``: strings are templates, dicts and lists are rendered recursively.

        A string that is exactly one ``{{ expr }}`` gives the expression's native value;
        any other template string gives text; anything else is returned as it is.
        """
        if isinstance(value, str):
            if "{{" not in value and "{%" not in value:
                return value
            plan = self._plans.get(value)
            if plan is None:
                plan = self._plan(value)
            if plan.single is None:
                return self._render_text(value, plan, scope)
            return self._run(value, plan, scope, textual=True)
        if isinstance(value, dict):
            return {k: self.render(v, scope) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render(v, scope) for v in value]
        if isinstance(value, tuple):
            return tuple(self.render(v, scope) for v in value)
        if isinstance(value, Mapping):
            return {k: self.render(v, scope) for k, v in value.items()}
        return value

    def evaluate(self, expr: str | bool, scope: Mapping[str, Any]) -> Any:
        """Evaluate a bare expression; surrounding ``{{ }}`` is optional; a bool passes through."""
        if not isinstance(expr, str):
            return expr
        plan = self._bare.get(expr)
        if plan is None:
            plan = self._bare_plan(expr)
        return self._run(expr, plan, scope, textual=False)

    def check(self, source: str, *, expression: bool = False) -> TemplateError | None:
        """Parse ``source`` without rendering it; the syntax error found, or None.

        Parsing (not compiling) is enough to find syntax errors, and its tree is kept
        for :meth:`references`; a plain reference needs no Jinja at all.
        """
        if not expression and not self.is_template(source):
            return None
        if self._plain_path(source, expression=expression) is not None:
            return None
        try:
            self._chains(source, expression=expression)
        except TemplateError as exc:
            return exc
        return None

    def references(self, source: str, *, expression: bool = False) -> set[Reference]:
        """The scope names ``source`` reads, from its AST; raises TemplateError on bad syntax."""
        if not expression and not self.is_template(source):
            return set()
        path = self._plain_path(source, expression=expression)
        if path is not None:
            root, parts = path
            return {Reference(root, str(parts[0]) if parts else None,
                              str(parts[1]) if len(parts) > 1 else None)}
        refs: set[Reference] = set()
        for chain in self._chains(source, expression=expression):
            segs = chain.segments
            key = str(segs[0]) if segs else None
            attr = str(segs[1]) if len(segs) > 1 else None
            refs.add(Reference(chain.root, key, attr))
        return refs

    def cache_size(self) -> int:
        """How many compiled templates and expressions are cached."""
        return len(self._templates) + len(self._exprs)

    # ----------------------------------------------------------------- planning

    def _remember(self, cache: dict[str, Any], key: str, value: Any) -> None:
        if len(cache) >= MAX_CACHE:
            cache.clear()
        cache[key] = value

    def _plan(self, source: str) -> _Plan:
        plan = _Plan()
        found = _single_expression(source)
        if found is not None:
            plan.single, plan.offset = found
            plan.path = _parse_path(plan.single)
        self._remember(self._plans, source, plan)
        return plan

    def _bare_plan(self, source: str) -> _Plan:
        plan = _Plan()
        found = _single_expression(source)
        if found is not None:
            plan.single, plan.offset = found
        else:
            plan.single = source
        plan.path = _parse_path(plan.single)
        self._remember(self._bare, source, plan)
        return plan

    # ----------------------------------------------------------------- compiling

    def _template(self, source: str) -> Template:
        template = self._templates.get(source)
        if template is None:
            try:
                ast = self._env.parse(source)
            except TemplateSyntaxError as exc:
                raise self._syntax_error(exc, source, 0) from exc
            _reject_forbidden(ast, source)
            try:
                template = self._env.from_string(ast)
            except jinja2.TemplateError as exc:  # pragma: no cover - parse already passed
                raise self._syntax_error(exc, source, 0) from exc
            self._remember(self._templates, source, template)
        return template

    def _expression(self, plan: _Plan, source: str) -> tuple[TemplateExpression, bool]:
        assert plan.single is not None
        compiled = self._exprs.get(plan.single)
        if compiled is None:
            try:
                ast = self._parse_expression(plan.single)
                expr = self._env.compile_expression(plan.single, undefined_to_none=False)
            except TemplateSyntaxError as exc:
                raise self._syntax_error(exc, source, plan.offset) from exc
            compiled = (expr, not _is_plain(ast))
            self._remember(self._exprs, plan.single, compiled)
        return compiled

    def _parse_expression(self, source: str) -> nodes.Expr:
        parser = Parser(self._env, source, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError(
                "chunk after expression", parser.stream.current.lineno, None, None
            )
        return expr

    def _plain_path(self, source: str, *, expression: bool) -> _Path | None:
        """The dotted path when ``source`` is just ``{{ a.b[0].c }}`` (or that bare expression)."""
        plan = (self._bare.get(source) or self._bare_plan(source)) if expression else (
            self._plans.get(source) or self._plan(source))
        return plan.path

    def _chains(self, source: str, *, expression: bool) -> list[_Chain]:
        key = (source, expression)
        cached = self._chain_cache.get(key)
        if cached is None:
            cached = self._compute_chains(source, expression=expression)
            if len(self._chain_cache) >= MAX_CACHE:
                self._chain_cache.clear()
            self._chain_cache[key] = cached
        return cached

    def _compute_chains(self, source: str, *, expression: bool) -> list[_Chain]:
        collector = _Collector(self._ignore)
        if expression:
            found = _single_expression(source)
            inner, offset = found if found is not None else (source, 0)
            try:
                node: nodes.Node = self._parse_expression(inner)
            except TemplateSyntaxError as exc:
                raise self._syntax_error(exc, source, offset) from exc
        else:
            try:
                node = self._env.parse(source)
            except TemplateSyntaxError as exc:
                raise self._syntax_error(exc, source, 0) from exc
            _reject_forbidden(node, source)
        collector.visit(node, frozenset())
        return collector.chains

    # ----------------------------------------------------------------- running

    def _run(self, source: str, plan: _Plan, scope: Mapping[str, Any], *, textual: bool) -> Any:
        """Evaluate the plan's single expression to its native value.

        ``textual``: the source came from :meth:`render`, so a single ``{{ … }}`` that is
        not a valid expression (``{{ a, b }}``, a syntax error) is handled as a template.
        """
        if plan.path is not None:
            value = _walk_path(plan.path, scope)
            if value is not _MISSING:
                return value
        if plan.expr is None:
            try:
                plan.expr, plan.scan = self._expression(plan, source)
            except TemplateError:
                if textual:
                    # `{{ a, b }}` is a valid template but not an expression: render text
                    plan.single = plan.path = None
                    return self._render_text(source, plan, scope)
                raise
        try:
            value = plan.expr(scope)
            if isinstance(value, Undefined) or plan.scan:
                _reject_undefined(value)
        except Exception as exc:
            raise self._runtime_error(exc, source, plan.single or source, scope, True) from exc
        return value

    def _render_text(self, source: str, plan: _Plan, scope: Mapping[str, Any]) -> str:
        template = plan.template
        if template is None:
            template = plan.template = self._template(source)
        try:
            return template.render(scope)
        except Exception as exc:
            raise self._runtime_error(exc, source, source, scope, False) from exc

    # ----------------------------------------------------------------- errors

    def _syntax_error(self, exc: jinja2.TemplateError, source: str, offset: int) -> TemplateError:
        lineno = getattr(exc, "lineno", None)
        if lineno is not None:
            lineno += offset
        message = f"template syntax error: {exc.message or exc}"
        return TemplateError(_with_line(message, source, lineno), lineno=lineno)

    def _runtime_error(
        self,
        exc: Exception,
        source: str,
        code: str,
        scope: Mapping[str, Any],
        expression: bool,
    ) -> TemplateError:
        lineno = None if expression else _template_lineno(exc)
        hint: str | None = None
        if isinstance(exc, SecurityError):
            message = f"template blocked by the sandbox: {exc}"
            hint = "templates may only read workflow data, not Python internals"
        elif isinstance(exc, UndefinedError):
            message = str(exc.message or exc)
            try:
                found = _diagnose(self._chains(code, expression=expression), scope, message)
            except TemplateError:  # pragma: no cover - it compiled already
                found = None
            if found is not None:
                message, hint = found
        elif isinstance(exc, jinja2.TemplateError):
            message = f"template error: {exc.message or exc}"
        else:
            message = f"template error: {type(exc).__name__}: {exc}"
        return TemplateError(_with_line(message, source, lineno), lineno=lineno, hint=hint)


def _with_line(message: str, source: str, lineno: int | None) -> str:
    if lineno is not None and "\n" in source.rstrip("\n"):
        return f"{message} (template line {lineno})"
    return message


def _reject_forbidden(ast: nodes.Template, source: str) -> None:
    for node in _walk(ast):
        tag = _FORBIDDEN.get(type(node))
        if tag is not None:
            lineno = node.lineno
            raise TemplateError(
                _with_line(f"templates cannot use {{% {tag} %}}", source, lineno),
                lineno=lineno,
                hint="put the text in the workflow, or pass it in through inputs or a step",
            )


def _walk(node: nodes.Node) -> Iterator[nodes.Node]:
    yield node
    for child in node.iter_child_nodes():
        yield from _walk(child)
