"""The Jinja side of `Templates`, imported on first need: parse, compile, run, explain.

`Templates` (``_engine``) keeps the caches and reads plain references itself; everything
here needs jinja2, so a workflow whose templates are all plain references never loads
it. Every jinja2 exception becomes a :class:`TemplateError` chained with ``from``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.environment import Template, TemplateExpression
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.parser import Parser
from jinja2.runtime import Undefined

from storyflow.spec.templates._base import TemplateError, too_nested, with_line
from storyflow.spec.templates._depth import check as check_depth
from storyflow.spec.templates._names import Collector, is_plain, reject_forbidden
from storyflow.spec.templates._plain import single_expression
from storyflow.spec.templates._reads import Parsed
from storyflow.spec.templates._sandbox import make_environment, reject_undefined


class Jinja:
    """The sandboxed environment, and all the work done with it (no caching: `Templates`')."""

    def __init__(self) -> None:
        self.env = make_environment()
        self.ignore = frozenset(self.env.globals)
        """Names a template may read that are not the scope's (``range``, ``dict`` …)."""

    # ----------------------------------------------------------------- compiling

    def template(self, source: str) -> Template:
        """``source`` compiled as a template, refusing ``{% include %}`` and the like."""
        try:
            ast = self.env.parse(source)
        except TemplateSyntaxError as exc:
            raise self.syntax_error(exc, source, 0) from exc
        except RecursionError as exc:  # Jinja's parser and compiler recurse
            raise too_nested() from exc
        reject_forbidden(ast, source)
        check_depth(ast, source)
        try:
            return self.env.from_string(ast)
        except jinja2.TemplateError as exc:  # an unknown filter or test
            raise self.syntax_error(exc, source, 0) from exc
        except (RecursionError, SyntaxError) as exc:  # pragma: no cover - check_depth's limits
            raise too_nested() from exc  # keep Jinja's and Python's compilers within theirs

    def expression(
        self, expr: str, source: str, offset: int
    ) -> tuple[TemplateExpression, bool]:
        """``expr`` (found ``offset`` lines into ``source``) compiled, and whether its
        value must be searched for Undefined."""
        try:
            ast = self.parse_expression(expr)
        except TemplateSyntaxError as exc:
            raise self.syntax_error(exc, source, offset) from exc
        except RecursionError as exc:
            raise too_nested() from exc
        check_depth(ast, source, offset)
        try:
            compiled = self.env.compile_expression(expr, undefined_to_none=False)
        except TemplateSyntaxError as exc:  # an unknown filter or test
            raise self.syntax_error(exc, source, offset) from exc
        except (RecursionError, SyntaxError) as exc:  # pragma: no cover - as in `template`
            raise too_nested() from exc
        return compiled, not is_plain(ast)

    def parse_expression(self, source: str) -> nodes.Expr:
        parser = Parser(self.env, source, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError(
                "chunk after expression", parser.stream.current.lineno, None, None
            )
        return expr

    def shell_expression(self, inner: str) -> nodes.Expr | None:
        """The inside of one ``{{ … }}`` of a shell command, None when it cannot be read."""
        try:
            parser = Parser(self.env, inner, state="variable")
            expr = parser.parse_expression()
        except (TemplateSyntaxError, RecursionError):
            return None  # cut short (a "}}" in a string), a syntax error, too nested
        return expr if parser.stream.eos else None

    # ----------------------------------------------------------------- reading

    def parse(self, source: str, *, expression: bool) -> Parsed:
        """What ``source`` reads and what Jinja's compiler would refuse in it, by parsing."""
        collector = Collector(self.ignore, self.env.filters, self.env.tests)
        offset = 0
        if expression:
            found = single_expression(source)
            inner, offset = found if found is not None else (source, 0)
            try:
                node: nodes.Node = self.parse_expression(inner)
            except TemplateSyntaxError as exc:
                raise self.syntax_error(exc, source, offset) from exc
            except RecursionError as exc:
                raise too_nested() from exc
        else:
            try:
                node = self.env.parse(source)
            except TemplateSyntaxError as exc:
                raise self.syntax_error(exc, source, 0) from exc
            except RecursionError as exc:
                raise too_nested() from exc
            if "{%" in source:  # every forbidden tag is a statement
                reject_forbidden(node, source)
        check_depth(node, source, offset)
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

    def call(self, expr: TemplateExpression, scan: bool, scope: Mapping[str, Any]) -> Any:
        """The native value of a compiled expression; an Undefined in it raises."""
        value = expr(scope)
        if isinstance(value, Undefined) or scan:
            reject_undefined(value)
        return value

    # ----------------------------------------------------------------- errors

    def syntax_error(self, exc: jinja2.TemplateError, source: str, offset: int) -> TemplateError:
        lineno = getattr(exc, "lineno", None)
        if lineno is not None:
            lineno += offset
        message = f"template syntax error: {exc.message or exc}"
        hint = None
        if "+}}" in source and "end of print statement" in message:
            hint = "only `}}` or `-}}` closes a {{ … }}: `+}}` leaves a `+` with nothing after it"
        return TemplateError(with_line(message, source, lineno), lineno=lineno, hint=hint)

    def explain(self, exc: Exception) -> tuple[str, str | None, bool]:
        """Message and hint for ``exc``, raised while rendering; whether a read was undefined
        (then the caller can name the read that missed)."""
        if isinstance(exc, SecurityError):
            return (f"template blocked by the sandbox: {exc}",
                    "templates may only read workflow data, not Python internals", False)
        if isinstance(exc, UndefinedError):
            return str(exc.message or exc), None, True
        if isinstance(exc, jinja2.TemplateError):
            return f"template error: {exc.message or exc}", None, False
        return f"template error: {type(exc).__name__}: {exc}", None, False
