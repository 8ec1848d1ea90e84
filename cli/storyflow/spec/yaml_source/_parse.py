"""The ruamel side of loading: YAML text → plain data, and what is refused before and after.

`safe_load` reads with ruamel's safe loader (the C parser where ruamel.yaml.clib is
installed) after `too_deep_at` has made sure the text does not nest past `MAX_DEPTH`:
ruamel's composer recurses, in C, and would crash the process rather than raise. Once
loaded, `alias_trouble` finds data that aliases make unusable: an alias inside its own
anchor, or aliases expanding past `MAX_EXPANDED_NODES` values ("billion laughs").
"""

from __future__ import annotations

import functools
from typing import Any

from storyflow.spec.limits import MAX_DEPTH, TooDeep, depth_hint, too_deep

PathKey = tuple[str | int, ...]


def json_path(path: PathKey) -> str:
    out = "$"
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif not isinstance(part, str):
            out += f"[{part!r}]"  # a null, boolean or float key: YAML allows them
        elif part.replace("_", "a").replace("-", "a").isalnum():
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


MAX_EXPANDED_NODES = 1_000_000
"""Values a file may hold once its aliases are expanded (a "billion laughs" guard)."""


def alias_trouble(data: Any, what: str) -> tuple[PathKey, str, str] | None:
    """Where the aliases of ``data`` make it unusable: (path, message, hint), else None."""
    found = _recursion(data)
    if found is not None:
        where, recursive = found
        if recursive:
            return (where, "a YAML alias refers to a mapping or list that contains it",
                    "an alias (*name) cannot be used inside its own anchor (&name)")
        return (where, f"YAML aliases expand {what} past {MAX_EXPANDED_NODES:,} values",
                "use fewer nested aliases (*name)")
    deep = too_deep(data)  # an alias nests what it names: the text's depth can grow
    if deep is not None:
        return (deep, f"YAML aliases nest {what} deeper than {MAX_DEPTH} levels",
                depth_hint("a workflow file" if what == "this file" else "a data file"))
    return None


def _recursion(data: Any) -> tuple[PathKey, bool] | None:
    """Where the data contains itself (path, True) or expands too far (path, False).

    Iterative; each shared container (an alias used many times) is walked once and
    its expanded size remembered.
    """
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, PathKey, bool]] = [(data, (), False)]
    while stack:
        node, path, leaving = stack.pop()
        if not isinstance(node, dict | list):
            continue
        ident = id(node)
        if leaving:
            open_.discard(ident)
            children = node.values() if isinstance(node, dict) else node
            total = 1 + sum(size.get(id(c), 1) for c in children)
            if total > MAX_EXPANDED_NODES:
                return path, False
            size[ident] = total
            continue
        if ident in open_:
            return path, True
        if ident in size:
            continue
        open_.add(ident)
        stack.append((node, path, True))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            stack.append((value, (*path, key), False))
    return None


def safe_yaml() -> Any:
    """A ruamel loader for plain data (the C parser where installed), resolving tags with
    `_resolver_class`."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    yaml.Resolver = _resolver_class()
    return yaml


@functools.cache
def _resolver_class() -> type:
    """ruamel's resolver, minus a cost: it looks up the YAML version being read for each
    scalar (the C parser does not expose it, so each lookup fails through two attribute
    errors — a fifth of loading a large file). Here the lookup is made once per load:
    the version cannot change inside a document, and a loader reads one document."""
    from ruamel.yaml.resolver import VersionedResolver

    class OncePerLoad(VersionedResolver):
        _chosen: Any = None

        @property
        def versioned_resolver(self) -> Any:
            chosen = self._chosen
            if chosen is None:
                chosen = self._chosen = super().versioned_resolver
            return chosen

    return OncePerLoad


def safe_load(text: str, *, allow_duplicates: bool) -> tuple[Any, Exception | None]:
    from ruamel.yaml.error import YAMLError

    deep = too_deep_at(text)  # before composing: ruamel's composer recurses
    if deep is not None:
        return None, deep
    yaml = safe_yaml()
    yaml.allow_duplicate_keys = allow_duplicates
    try:
        return yaml.load(text), None
    except YAMLError as exc:
        return None, exc
    except (ValueError, TypeError, RecursionError) as exc:  # oddities ruamel lets through
        return None, exc


def too_deep_at(text: str) -> TooDeep | None:
    """Where ``text`` first nests past `MAX_DEPTH`, from the parser's events (the parser is
    iterative; composing the node tree is not). A syntax error is left to the load."""
    # Each list or mapping opens with its own indicator: fewer of them, no need to parse.
    if sum(text.count(c) for c in "[{-:?") <= MAX_DEPTH:
        return None
    found = _scan_depth(text, paths=False)
    return _scan_depth(text, paths=True) if found is not None else None


def _scan_depth(text: str, *, paths: bool) -> TooDeep | None:
    """One pass over the parser's events; with ``paths``, keeping the path of each node
    (slower: only to name the place once the first pass found one)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.events import (
        MappingEndEvent,
        MappingStartEvent,
        NodeEvent,
        SequenceEndEvent,
        SequenceStartEvent,
    )

    depth = 0
    # per open collection: [its key in its parent, is a mapping, next is a key, last key/index]
    frames: list[list[Any]] = []
    try:
        for event in YAML(typ="safe").parse(text):
            kind = type(event)
            elem: Any = None
            if paths and frames and isinstance(event, NodeEvent):
                top = frames[-1]
                if not top[1]:
                    top[3] += 1
                    elem = top[3]
                elif top[2]:  # a key: remember it, it names the next node
                    top[3] = getattr(event, "value", "?")
                    top[2] = False
                else:
                    elem, top[2] = top[3], True
            if kind is MappingStartEvent or kind is SequenceStartEvent:
                depth += 1
                if depth > MAX_DEPTH:
                    mark = event.start_mark
                    where = tuple(f[0] for f in frames[1:]) + ((elem,) if frames else ())
                    return TooDeep(mark.line + 1, mark.column + 1, json_path(where))
                if paths:
                    frames.append([elem, kind is MappingStartEvent, True, -1])
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                depth -= 1
                if paths:
                    frames.pop()
    except (YAMLError, ValueError, TypeError):
        return None
    return None
