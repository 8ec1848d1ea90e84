"""The sandboxed Jinja2 environment templates render in (imported on first need).

``ImmutableSandboxedEnvironment`` with ``StrictUndefined``: templates read the scope
(plain ``dict``/``list`` values) but cannot reach Python internals or mutate the scope.
On top of it: mapping keys win over methods (``output.items`` is the ``items`` key),
``*`` and ``**`` cannot build huge values, and a container holding an undefined value
is an error rather than text. storyflow adds the filters `tojson`, `fromjson`,
`wordcount` and `shquote`.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any, Final

from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, StrictUndefined, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from storyflow.spec.templates._base import MAX_EXPONENT, MAX_SEQUENCE

OWN_FILTERS: Final = ("tojson", "fromjson", "wordcount", "shquote")
"""Filters storyflow adds to (or replaces in) Jinja's built-in ones."""


def _tojson(value: Any, indent: int | None = None) -> str:
    reject_undefined(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=False, indent=indent)


def _fromjson(value: str) -> Any:
    return json.loads(value)


def _wordcount(value: Any) -> int:
    return len(str(value).split())


def _shquote(value: Any) -> str:
    """``value`` as one shell word: `shlex.quote` of its text (mappings and lists as JSON)."""
    reject_undefined(value)
    if isinstance(value, dict | list | tuple):
        return shlex.quote(json.dumps(value, ensure_ascii=False))
    return shlex.quote(str(value))


def reject_undefined(value: Any, depth: int = 0) -> None:
    """Raise the undefined error of the first Undefined inside a container value."""
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises its UndefinedError / SecurityError here
    if depth > 50:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            reject_undefined(k, depth + 1)
            reject_undefined(v, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            reject_undefined(v, depth + 1)


def _finalize(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        reject_undefined(value)
    return value


class SandboxEnvironment(ImmutableSandboxedEnvironment):
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


def make_environment() -> SandboxEnvironment:
    env = SandboxEnvironment(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson
    env.filters["fromjson"] = _fromjson
    env.filters["wordcount"] = _wordcount
    env.filters["shquote"] = _shquote
    return env
