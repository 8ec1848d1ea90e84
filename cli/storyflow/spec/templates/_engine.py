"""`Templates`: compiles each distinct workflow string once and renders it in the sandbox.

* A string that is exactly one ``{{ expr }}`` yields the expression's native value.
  When ``expr`` is a plain dotted path (``steps.plot.output.sections[0].title``) the
  scope is walked directly, without Jinja (``_plain``); a miss falls back to Jinja so
  the result and the error are the same either way.
* ``when``/``until``/``for_each`` are bare expressions (:meth:`Templates.evaluate`).
* :meth:`Templates.problems` finds what would fail before anything renders: syntax,
  forbidden tags, unknown filters and tests, by parsing (never generating code).
* :meth:`Templates.references` reads the names a template uses from its AST, for
  dependency inference and validation.

This module imports no jinja2: the Jinja side (``_jinja``: the sandboxed environment,
parsing, compiling, running) is imported and built the first time a string is not a
plain reference, so a workflow of plain references never pays for it. Every jinja2
exception, and anything raised while rendering, becomes a :class:`TemplateError`
chained with ``from``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from storyflow.spec.templates._base import MAX_NESTING, TemplateError, template_lineno, with_line
from storyflow.spec.templates._plain import (
    MISSING,
    PlainPath,
    parse_path,
    path_too_long,
    single_expression,
    text_paths,
    walk_path,
)
from storyflow.spec.templates._reads import Chain, Parsed, Reference, diagnose
from storyflow.spec.templates._shell import Unquoted, unquoted

if TYPE_CHECKING:
    from jinja2.environment import Template, TemplateExpression

    from storyflow.spec.templates._jinja import Jinja

MAX_CACHE: Final = 4096
"""Compiled sources kept per cache; the cache is cleared when it grows past this."""


class _Plan:
    """How to render one source string, decided once and cached."""

    __slots__ = ("expr", "long", "offset", "path", "scan", "single", "template")

    def __init__(self) -> None:
        self.single: str | None = None
        """The expression of a ``{{ expr }}`` string, None when the source is text."""
        self.offset = 0
        """Lines before ``single`` starts in the source."""
        self.path: PlainPath | None = None
        """The fast path, when ``single`` is a plain dotted path."""
        self.long = False
        """Whether ``single`` is a plain path past `MAX_NESTING` segments (refused)."""
        self.expr: TemplateExpression | None = None
        self.scan = True
        """Whether the expression's value must be searched for Undefined."""
        self.template: Template | None = None


# --------------------------------------------------------------------------- Templates


class Templates:
    """Compiles each distinct template once and renders it in a sandbox.

    Compiled templates and expressions are cached in dicts keyed by source; the
    environment is an ``ImmutableSandboxedEnvironment`` with ``StrictUndefined``, built
    (with jinja2 imported) the first time a string is not a plain reference.
    """

    def __init__(self) -> None:
        self._backend: Jinja | None = None
        self._plans: dict[str, _Plan] = {}
        self._templates: dict[str, Template] = {}
        self._exprs: dict[str, tuple[TemplateExpression, bool]] = {}
        self._bare: dict[str, _Plan] = {}
        self._chain_cache: dict[tuple[str, bool], Parsed] = {}

    @property
    def _jinja(self) -> Jinja:
        """The Jinja side: imported and built on first need, then kept."""
        backend = self._backend
        if backend is None:
            from storyflow.spec.templates._jinja import Jinja

            backend = self._backend = Jinja()
        return backend

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
        try:
            if self._plain_reads(source, expression=expression) is not None:
                return []
            return list(self._parsed(source, expression=expression).issues)
        except TemplateError as exc:
            return [exc]

    def references(self, source: str, *, expression: bool = False) -> set[Reference]:
        """The scope names ``source`` reads, from its AST; raises TemplateError on bad syntax."""
        if not expression and not self.is_template(source):
            return set()
        paths = self._plain_reads(source, expression=expression)
        if paths is not None:
            return {_reference(p) for p in paths}
        refs: set[Reference] = set()
        for chain in self._chains(source, expression=expression):
            segs = chain.segments
            key = str(segs[0]) if segs else None
            attr = str(segs[1]) if len(segs) > 1 else None
            refs.add(Reference(chain.root, key, attr))
        return refs

    def unquoted_in_shell(self, source: str) -> list[Unquoted]:
        """Each ``{{ … }}`` of ``source`` whose value would reach a shell as code."""
        # not the bound method: the Jinja side is built only for a {{ }} that is not plain
        return unquoted(source, lambda inner: self._jinja.shell_expression(inner))

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
        found = single_expression(source)
        if found is not None:
            plan.single, plan.offset = found
            _set_path(plan)
        self._remember(self._plans, source, plan)
        return plan

    def _bare_plan(self, source: str) -> _Plan:
        plan = _Plan()
        found = single_expression(source)
        if found is not None:
            plan.single, plan.offset = found
        else:
            plan.single = source
        _set_path(plan)
        self._remember(self._bare, source, plan)
        return plan

    # ----------------------------------------------------------------- compiling

    def _template(self, source: str) -> Template:
        template = self._templates.get(source)
        if template is None:
            template = self._jinja.template(source)
            self._remember(self._templates, source, template)
        return template

    def _expression(self, plan: _Plan, source: str) -> tuple[TemplateExpression, bool]:
        assert plan.single is not None
        compiled = self._exprs.get(plan.single)
        if compiled is None:
            compiled = self._jinja.expression(plan.single, source, plan.offset)
            self._remember(self._exprs, plan.single, compiled)
        return compiled

    def _plain_reads(self, source: str, *, expression: bool) -> list[PlainPath] | None:
        """The paths ``source`` reads when it is only plain references (``{{ a.b[0].c }}``,
        that bare expression, or text with such ``{{ }}``), None when it needs Jinja's
        parser; raises TemplateError for a path past `MAX_NESTING` segments."""
        plan = (self._bare.get(source) or self._bare_plan(source)) if expression else (
            self._plans.get(source) or self._plan(source))
        if plan.long:
            assert plan.single is not None
            raise path_too_long(plan.single, source, plan.offset)
        if plan.path is not None:
            return [plan.path]
        return None if expression else text_paths(source)

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
        return self._jinja.parse(source, expression=expression)

    # ----------------------------------------------------------------- running

    def _run(self, source: str, plan: _Plan, scope: Mapping[str, Any], *, textual: bool) -> Any:
        """Evaluate the plan's single expression to its native value.

        ``textual``: the source came from :meth:`render`, so a single ``{{ … }}`` that is
        not a valid expression (``{{ a, b }}``, a syntax error) is handled as a template.
        """
        if plan.path is not None:
            value = walk_path(plan.path, scope)
            if value is not MISSING:
                return value
        if plan.expr is None:
            if plan.long:
                assert plan.single is not None
                raise path_too_long(plan.single, source, plan.offset)
            try:
                plan.expr, plan.scan = self._expression(plan, source)
            except TemplateError:
                if textual:
                    # `{{ a, b }}` is a valid template but not an expression: render text
                    plan.single = plan.path = None
                    return self._render_text(source, plan, scope)
                raise
        try:
            return self._jinja.call(plan.expr, plan.scan, scope)
        except Exception as exc:
            raise self._runtime_error(exc, source, plan.single or source, scope, True) from exc

    def _render_text(self, source: str, plan: _Plan, scope: Mapping[str, Any]) -> str:
        template = plan.template
        if template is None:
            template = plan.template = self._template(source)
        try:
            return template.render(scope)
        except Exception as exc:
            raise self._runtime_error(exc, source, source, scope, False) from exc

    # ----------------------------------------------------------------- errors

    def _runtime_error(
        self,
        exc: Exception,
        source: str,
        code: str,
        scope: Mapping[str, Any],
        expression: bool,
    ) -> TemplateError:
        lineno = None if expression else template_lineno(exc)
        message, hint, undefined = self._jinja.explain(exc)
        if undefined:
            try:
                found = diagnose(self._chains(code, expression=expression), scope, message)
            except TemplateError:  # pragma: no cover - it compiled already
                found = None
            if found is not None:
                message, hint = found
        return TemplateError(with_line(message, source, lineno), lineno=lineno, hint=hint)


def _set_path(plan: _Plan) -> None:
    """Take the fast path when the plan's expression is a plain path within the limit."""
    assert plan.single is not None
    path = parse_path(plan.single)
    if path is not None and len(path[1]) > MAX_NESTING:
        plan.long = True
    else:
        plan.path = path


def _reference(path: PlainPath) -> Reference:
    """What a plain path reads: its root and first two segments."""
    root, parts = path
    return Reference(root, str(parts[0]) if parts else None,
                     str(parts[1]) if len(parts) > 1 else None)
