"""Template expressions a shell would read as code: the check behind `validate`'s
warning on a shell-string ``run:`` (the `shquote` filter is the sandbox's).

A ``command`` step whose ``run`` is a string goes through ``sh -c``: a value pasted into
it by ``{{ … }}`` is shell code (``x; rm -rf ~``, ``$(…)``, a back-quote, a quote that
ends the author's quoting) — the injection GitHub Actions' ``${{ }}`` is known for. An
expression is safe when its value is quoted by `shquote`, is a literal of the file, or
can only be a number or a boolean. A plain reference (``{{ steps.a.output }}``) is never
safe, which is known without parsing it: jinja2 is needed only for the other kinds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from storyflow.spec.templates._plain import parse_path

if TYPE_CHECKING:
    from jinja2 import nodes

_OUTPUT: Final = re.compile(r"\{\{(.*?)\}\}", re.S)
_RAW: Final = re.compile(r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}", re.S)
NUMERIC_FILTERS: Final = frozenset({"int", "float", "length", "count", "wordcount", "abs",
                                    "round", "sum"})
"""Filters whose value a shell reads as a number at most, never as code."""


@dataclass(frozen=True, slots=True)
class Unquoted:
    """A ``{{ … }}`` whose value would reach the shell unquoted."""

    offset: int
    """Where its ``{{`` starts in the template."""
    text: str
    """The ``{{ … }}`` as written."""


def unquoted(source: str, parse: Callable[[str], nodes.Expr | None]) -> list[Unquoted]:
    """Every ``{{ … }}`` of ``source`` whose value is not safe in a shell command line.

    ``parse`` reads one expression, None when it cannot (a syntax error, cut short by a
    ``}}`` inside a string, nested too deeply); it is not called for plain references.
    """
    scan = _RAW.sub(lambda m: " " * len(m.group(0)), source)  # {% raw %} prints no value
    out = []
    for m in _OUTPUT.finditer(scan):
        inner = m.group(1)
        inner = inner[1:] if inner[:1] in "-+" else inner
        inner = inner[:-1] if inner[-1:] == "-" else inner  # ``+}}`` closes no {{ }}
        if parse_path(inner) is None:
            expr = parse(inner)
            if expr is not None and _safe(expr):
                continue
        out.append(Unquoted(m.start(), m.group(0)))
    return out


def _safe(expr: nodes.Expr) -> bool:
    from jinja2 import nodes  # loaded already: `expr` came from Jinja's parser

    if isinstance(expr, nodes.Filter):
        return expr.name == "shquote" or expr.name in NUMERIC_FILTERS
    if isinstance(expr, nodes.CondExpr):
        return _safe(expr.expr1) and (expr.expr2 is None or _safe(expr.expr2))
    return isinstance(expr, nodes.Const | nodes.Test | nodes.Compare | nodes.Not)
