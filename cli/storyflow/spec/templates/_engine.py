"""`Templates`: compiles each distinct workflow string once and renders it in the sandbox.

* A string that is exactly one ``{{ expr }}`` yields the expression's native value.
  When ``expr`` is a plain dotted path (``steps.plot.output.sections[0].title``) the
  scope is walked directly, without Jinja; a miss falls back to Jinja so the result
  and the error are the same either way.
* ``when``/``until``/``for_each`` are bare expressions (:meth:`Templates.evaluate`).
* :meth:`Templates.problems` finds what would fail before anything renders: syntax,
  forbidden tags, unknown filters and tests, by parsing (never generating code).
* :meth:`Templates.references` reads the names a template uses from its AST, for
  dependency inference and validation.

Every jinja2 exception, and anything raised while rendering, becomes a
:class:`TemplateError` chained with ``from``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import jinja2
from jinja2 import nodes
from jinja2.environment import Template, TemplateExpression
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.parser import Parser
from jinja2.runtime import Undefined

from storyflow.spec.templates._names import (
    Chain,
    Collector,
    Parsed,
    Reference,
    Segment,
    diagnose,
    is_plain,
    reject_forbidden,
)
from storyflow.spec.templates._sandbox import (
    TemplateError,
    make_environment,
    reject_undefined,
    template_lineno,
    too_nested,
    with_line,
)
from storyflow.spec.templates._shell import Unquoted, unquoted

MAX_CACHE: Final = 4096
"""Compiled sources kept per cache; the cache is cleared when it grows past this."""

_SINGLE_RE: Final = re.compile(r"\A\s*\{\{(.*)\}\}\s*\Z", re.DOTALL)
_PATH_RE: Final = re.compile(
    r"\A([A-Za-z][A-Za-z0-9_]*)"
    r"((?:\.[A-Za-z][A-Za-z0-9_]*|\.(?:0|[1-9][0-9]*)|\[\s*-?(?:0|[1-9][0-9]*)\s*\])*)\Z"
)
_SEGMENT_RE: Final = re.compile(r"\.([A-Za-z][A-Za-z0-9_]*)|\.([0-9]+)|\[\s*(-?[0-9]+)\s*\]")
_RESERVED: Final = frozenset(
    {
        "true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is",
        "if", "else", "recursive", "with", "without",
    }
)

_Path = tuple[str, tuple[Segment, ...]]
_MISSING: Final = object()


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
    segments: list[Segment] = []
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



# --------------------------------------------------------------------------- Templates


class Templates:
    """Compiles each distinct template once and renders it in a sandbox.

    Compiled templates and expressions are cached in dicts keyed by source; the
    environment is an ``ImmutableSandboxedEnvironment`` with ``StrictUndefined``.
    """

    def __init__(self) -> None:
        self._env = make_environment()
        self._plans: dict[str, _Plan] = {}
        self._templates: dict[str, Template] = {}
        self._exprs: dict[str, tuple[TemplateExpression, bool]] = {}
        self._bare: dict[str, _Plan] = {}
        self._chain_cache: dict[tuple[str, bool], Parsed] = {}
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
        """The first of :meth:`problems`, or None."""
        found = self.problems(source, expression=expression)
        return found[0] if found else None

    def problems(self, source: str, *, expression: bool = False) -> list[TemplateError]:
        """What would fail to compile in ``source``, found without rendering or compiling it.

        A syntax error (or a forbidden tag) alone, else every unknown filter or test, a
        ``{% for %}`` assigning ``loop``, a block defined twice. Parsing (not compiling)
        is enough, and its tree is kept for :meth:`references`; a plain reference needs
        no Jinja at all.
        """
        if not expression and not self.is_template(source):
            return []
        if self._plain_path(source, expression=expression) is not None:
            return []
        try:
            return list(self._parsed(source, expression=expression).issues)
        except TemplateError as exc:
            return [exc]

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

    def unquoted_in_shell(self, source: str) -> list[Unquoted]:
        """Each ``{{ … }}`` of ``source`` whose value would reach a shell as code."""
        return unquoted(self._env, source)

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
            except RecursionError as exc:  # Jinja's parser and compiler recurse
                raise too_nested() from exc
            reject_forbidden(ast, source)
            try:
                template = self._env.from_string(ast)
            except jinja2.TemplateError as exc:  # pragma: no cover - parse already passed
                raise self._syntax_error(exc, source, 0) from exc
            except RecursionError as exc:
                raise too_nested() from exc
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
            except RecursionError as exc:
                raise too_nested() from exc
            compiled = (expr, not is_plain(ast))
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

    def _chains(self, source: str, *, expression: bool) -> list[Chain]:
        return self._parsed(source, expression=expression).chains

    def _parsed(self, source: str, *, expression: bool) -> Parsed:
        key = (source, expression)
        cached = self._chain_cache.get(key)
        if cached is None:
            cached = self._compute_chains(source, expression=expression)
            if len(self._chain_cache) >= MAX_CACHE:
                self._chain_cache.clear()
            self._chain_cache[key] = cached
        return cached

    def _compute_chains(self, source: str, *, expression: bool) -> Parsed:
        collector = Collector(self._ignore, self._env.filters, self._env.tests)
        offset = 0
        if expression:
            found = _single_expression(source)
            inner, offset = found if found is not None else (source, 0)
            try:
                node: nodes.Node = self._parse_expression(inner)
            except TemplateSyntaxError as exc:
                raise self._syntax_error(exc, source, offset) from exc
            except RecursionError as exc:
                raise too_nested() from exc
        else:
            try:
                node = self._env.parse(source)
            except TemplateSyntaxError as exc:
                raise self._syntax_error(exc, source, 0) from exc
            except RecursionError as exc:
                raise too_nested() from exc
            if "{%" in source:  # every forbidden tag is a statement
                reject_forbidden(node, source)
        try:
            collector.visit(node, frozenset())
        except RecursionError as exc:
            raise too_nested() from exc
        issues = [
            TemplateError(with_line(i.message, source, i.lineno + offset),
                          lineno=i.lineno + offset, hint=i.hint)
            for i in collector.issues
        ]
        return Parsed(collector.chains, issues)

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
                reject_undefined(value)
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
        return TemplateError(with_line(message, source, lineno), lineno=lineno)

    def _runtime_error(
        self,
        exc: Exception,
        source: str,
        code: str,
        scope: Mapping[str, Any],
        expression: bool,
    ) -> TemplateError:
        lineno = None if expression else template_lineno(exc)
        hint: str | None = None
        if isinstance(exc, SecurityError):
            message = f"template blocked by the sandbox: {exc}"
            hint = "templates may only read workflow data, not Python internals"
        elif isinstance(exc, UndefinedError):
            message = str(exc.message or exc)
            try:
                found = diagnose(self._chains(code, expression=expression), scope, message)
            except TemplateError:  # pragma: no cover - it compiled already
                found = None
            if found is not None:
                message, hint = found
        elif isinstance(exc, jinja2.TemplateError):
            message = f"template error: {exc.message or exc}"
        else:
            message = f"template error: {type(exc).__name__}: {exc}"
        return TemplateError(with_line(message, source, lineno), lineno=lineno, hint=hint)


