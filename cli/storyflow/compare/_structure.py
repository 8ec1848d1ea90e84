"""Structural diff of two JSON values: where they differ, as JSON pointers.

Objects are compared key by key (A's keys in order, then B's new ones), arrays index by
index (an item inserted at the front shows every later index as changed: predictable,
and what a reader of ``/sections/3`` expects). Values of different JSON types differ
(``1`` is not ``true``); ``1`` and ``1.0`` are the same number.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from storyflow.compare._model import SAME, Change, ValueDiff
from storyflow.compare._words import text_diff

MAX_CHANGES = 1_000
"""Changes listed at most per value (the rest are left out, counted in none)."""


def same(a: Any, b: Any) -> bool:
    """JSON equality: ``==``, except that a boolean equals only a boolean."""
    if a is b:
        return True
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            same(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(
            same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def pointer(parts: tuple[str | int, ...]) -> str:
    """A JSON pointer (RFC 6901): ``("plot", "title")`` → ``/plot/title``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def json_changes(a: Any, b: Any, limit: int = MAX_CHANGES) -> tuple[Change, ...]:
    """Every place where ``a`` and ``b`` differ (at most ``limit``), leaves first found
    first."""
    out: list[Change] = []
    for change in _walk(a, b, ()):
        out.append(change)
        if len(out) >= limit:
            break
    return tuple(out)


def _walk(a: Any, b: Any, at: tuple[str | int, ...]) -> Iterator[Change]:
    if same(a, b):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key, value in a.items():
            if key in b:
                yield from _walk(value, b[key], (*at, key))
            else:
                yield Change(pointer((*at, key)), "removed", a=value)
        for key, value in b.items():
            if key not in a:
                yield Change(pointer((*at, key)), "added", b=value)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            if i >= len(b):
                yield Change(pointer((*at, i)), "removed", a=a[i])
            elif i >= len(a):
                yield Change(pointer((*at, i)), "added", b=b[i])
            else:
                yield from _walk(a[i], b[i], (*at, i))
        return
    yield Change(pointer(at), "changed", a=a, b=b)


def value_diff(a: Any, b: Any) -> ValueDiff:
    """Two outputs compared: the same, a word diff of two strings, or JSON changes."""
    if same(a, b):
        return SAME
    if isinstance(a, str) and isinstance(b, str):
        return ValueDiff(same=False, kind="text", text=text_diff(a, b))
    return ValueDiff(same=False, kind="json", changes=json_changes(a, b))
