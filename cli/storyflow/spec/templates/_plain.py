"""Plain references, read without Jinja: ``{{ steps.plot.output.sections[0].title }}``.

Most workflow templates are one dotted path into the scope. Recognising such a string
and walking the path through plain ``dict``/``list`` data needs no parser, no compiled
code and no jinja2 import; anything else (a filter, an operator, a miss, a value that is
not plain data) is left to Jinja, so the result and the error are the same either way.
A path with more than `MAX_NESTING` segments is refused here with the error Jinja's
side gives it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from storyflow.spec.templates._base import MAX_NESTING, TemplateError
from storyflow.spec.templates._reads import Segment, reference_too_long

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

PlainPath = tuple[str, tuple[Segment, ...]]
"""A plain path's root name and its constant segments."""
MISSING: Final = object()
"""What `walk_path` returns when the path does not resolve in plain data."""


def single_expression(source: str) -> tuple[str, int] | None:
    """The inner expression when ``source`` is exactly one ``{{ expr }}``, with its line offset.

    As Jinja's lexer reads it: ``{{-`` and ``{{+`` open it, ``-}}`` closes it, but a ``+``
    before the ``}}`` is part of the expression (``{{ a +}}`` is a syntax error)."""
    m = _SINGLE_RE.match(source)
    if m is None:
        return None
    inner = m.group(1)
    if any(tok in inner for tok in ("{{", "}}", "{%", "%}", "{#", "#}")):
        return None
    if inner[:1] in ("-", "+"):
        inner = inner[1:]
    if inner[-1:] == "-":
        inner = inner[:-1]
    if not inner.strip():
        return None
    return inner, source.count("\n", 0, m.start(1))


_OPEN_RE: Final = re.compile(r"\{\{|\{%|\{#")
"""Where Jinja's lexer leaves text: the earliest ``{{``, ``{%`` or ``{#``."""
_VARIABLE_RE: Final = re.compile(r"\{\{[-+]?([^{}]*?)-?\}\}")
"""A ``{{ … }}`` block as Jinja's lexer ends it: ``{{-``/``{{+`` open one, but only ``-}}``
closes one (``{{ a +}}`` is a syntax error, left to Jinja to report)."""
JINJA_GLOBALS: Final = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace"})
"""The names Jinja's environment defines (``make_environment().globals``): a template
reading one reads no scope name, so it is no reference."""


def text_paths(source: str) -> list[PlainPath] | None:
    """The references of a text template whose only Jinja is plain ``{{ path }}`` blocks
    (``"Chapter {{ steps.plot.output.title }} begins"``), in order; None when it has
    anything else — a statement, a comment, a filter, an operator, an unmatched ``{{``.
    Such a text is valid Jinja and reads exactly these paths (a Jinja global such as
    ``range`` is not the scope's, and not among them, as Jinja's parse does not count
    it): checking it needs no parser (rendering it still does: text output is Jinja's).
    Raises TemplateError, as Jinja's side would, when such a text has a reference with
    more than `MAX_NESTING` segments."""
    paths: list[PlainPath] = []
    too_long: tuple[PlainPath, int] | None = None
    pos = 0
    while (m := _OPEN_RE.search(source, pos)) is not None:
        if m.group() != "{{":
            return None
        block = _VARIABLE_RE.match(source, m.start())
        if block is None:
            return None
        path = parse_path(block.group(1))
        if path is None:
            return None
        if too_long is None and len(path[1]) > MAX_NESTING:
            too_long = path, _name_at(block.group(1), block.start(1))
        if path[0] not in JINJA_GLOBALS:
            paths.append(path)
        pos = block.end()
    if too_long is not None:
        path, at = too_long
        raise reference_too_long(path[0], path[1], source, source.count("\n", 0, at) + 1)
    return paths


def path_too_long(expr: str, source: str, offset: int) -> TemplateError:
    """The error for the plain path ``expr``, ``offset`` lines into ``source``, when it has
    more than `MAX_NESTING` segments (the line is its name's, as in Jinja's tree)."""
    path = parse_path(expr)
    assert path is not None and len(path[1]) > MAX_NESTING
    lineno = offset + expr.count("\n", 0, _name_at(expr)) + 1
    return reference_too_long(path[0], path[1], source, lineno)


def _name_at(expr: str, start: int = 0) -> int:
    """Where the name of the path ``expr`` (found at ``start``) begins."""
    return start + len(expr) - len(expr.lstrip())


def parse_path(expr: str) -> PlainPath | None:
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


def walk_path(path: PlainPath, scope: Mapping[str, Any]) -> Any:
    """Resolve a plain path in plain data; `MISSING` when anything is not plain."""
    cur = scope.get(path[0], MISSING)
    if cur is MISSING:
        return MISSING
    for seg in path[1]:
        if isinstance(cur, Mapping):
            try:
                cur = cur[seg]
            except (KeyError, TypeError):
                return MISSING
        elif type(seg) is int and isinstance(cur, list | tuple):
            try:
                cur = cur[seg]
            except IndexError:
                return MISSING
        else:
            return MISSING
    return cur
