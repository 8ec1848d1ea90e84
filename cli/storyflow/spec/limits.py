"""Limits on the data storyflow accepts, so hostile input fails with a message, not a crash.

* `MAX_DEPTH`: how deeply lists and mappings may nest in a workflow file, an
  ``--inputs`` file, a ``-i``/``--set`` value and a step's output. Deeper data would
  exhaust the stack of the code that walks it (YAML's composer, JSON, jsonschema,
  templates); it is refused where it enters, with its place.
* `json_value`: a step's output as JSON sees it, the only form a checkpoint, the
  cache, an executor and a template reliably agree on.

Every walk here is iterative: the data being checked may be the deep data refused.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from storyflow.errors import Problem

MAX_DEPTH: Final = 200
"""Most lists and mappings nested in one another (a top-level mapping is depth 1)."""


def depth_hint(what: str) -> str:
    return (f"{what} may nest lists and mappings at most {MAX_DEPTH} deep; flatten the "
            "data, or pass it as text (a JSON string) and parse it where it is used")


class TooDeep(ValueError):
    """YAML or JSON text nested deeper than `MAX_DEPTH`: where the first node past it is."""

    def __init__(self, line: int, col: int, path: str) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")
        self.line, self.col, self.path = line, col, path

    def problem(self, name: str, what: str = "a workflow file") -> Problem:
        return Problem(f"lists and mappings nested deeper than {MAX_DEPTH} levels",
                       file=name, line=self.line, col=self.col, path=self.path,
                       hint=depth_hint(what))


def too_deep(value: Any, limit: int = MAX_DEPTH) -> tuple[str | int, ...] | None:
    """The path to the first list or mapping nested deeper than ``limit``, else None.

    A container shared by several places (a YAML alias) is measured once.
    """
    height: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, leaving = stack.pop()
        if not isinstance(node, dict | list) or (not leaving and id(node) in height):
            continue
        children = list(node.values() if isinstance(node, dict) else node)
        if leaving:
            height[id(node)] = 1 + max(
                (height.get(id(c), 0) for c in children if isinstance(c, dict | list)),
                default=0,
            )
            continue
        height[id(node)] = 0  # on the way down: a node containing itself stops here
        stack.append((node, True))
        stack.extend((c, False) for c in children)
    if height.get(id(value), 0) <= limit:
        return None
    path: list[str | int] = []
    node, depth = value, 1
    while depth <= limit:  # down the first branch that goes past the limit, in order
        items = node.items() if isinstance(node, dict) else enumerate(node)
        key, node = next((k, v) for k, v in items
                         if isinstance(v, dict | list) and height.get(id(v), 0) > limit - depth)
        path.append(key)
        depth += 1
    return tuple(path)


def json_value(value: Any) -> Any:
    """``value`` as JSON sees it: tuples become lists, text subclasses plain text, number
    keys text. Raises ValueError (saying why) for what JSON cannot hold — a set, a
    ``dict_items``, an object, NaN or an infinity, a value containing itself — or data
    nested deeper than `MAX_DEPTH`."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a JSON number")
        return value
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except RecursionError as exc:
        raise ValueError(f"it is nested deeper than {MAX_DEPTH} levels") from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from exc
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return json.loads(text)  # too few brackets to be too deep: the common case
    try:
        out = json.loads(text)
    except RecursionError as exc:
        raise ValueError(f"it is nested deeper than {MAX_DEPTH} levels") from exc
    if too_deep(out) is not None:
        raise ValueError(f"it is nested deeper than {MAX_DEPTH} levels")
    return out
