"""What a template reads, and what a failed read missed: storyflow's own, without Jinja.

A `Reference` is a name a template reads with the first two constant steps after it
(what validation and dependency inference use); a `Chain` keeps every constant step.
`diagnose` explains a failed read against the scope it rendered in.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from storyflow.spec.templates._base import MAX_NESTING, TemplateError, with_line

Segment = str | int

_IDENT_RE: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, slots=True)
class Reference:
    """One name a template reads, with the first two constant steps after it."""

    root: str
    """Top-level name: ``steps``, ``inputs``, ``config``, ``loop``, ``item`` …"""
    key: str | None
    """First constant attribute/subscript after the root (``plot`` in ``steps.plot``)."""
    attr: str | None
    """Second constant attribute (``output``, ``status``, ``attempts``), else None."""


class Chain:
    """A name read by a template, with the constant segments that follow it."""

    __slots__ = ("root", "segments")

    def __init__(self, root: str, segments: list[Segment]) -> None:
        self.root = root
        self.segments = segments


@dataclass(frozen=True, slots=True)
class Issue:
    """What Jinja's compiler would refuse, found in the tree."""

    message: str
    lineno: int
    """1-based line inside the parsed text."""
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class Parsed:
    """One source's reads and compile issues (cached per source)."""

    chains: list[Chain]
    issues: list[TemplateError] = field(default_factory=list)
    """What Jinja's compiler would refuse, located in the source."""


def reference_too_long(
    root: str | None, segments: Sequence[Segment | None], source: str, lineno: int
) -> TemplateError:
    """A reference with more than `MAX_NESTING` segments after its name (``root`` None:
    it starts at an expression, not a name; a segment None: one that is not a constant).

    The fast path and Jinja's side both build it, so a plain reference fails the same
    whichever reads it."""
    shown = root if root is not None else "(…)"
    for seg in segments[:3]:
        if seg is None:
            shown += "[…]"
        elif isinstance(seg, str) and _IDENT_RE.match(seg):
            shown += f".{seg}"
        else:
            shown += f"[{seg!r}]"
    message = (f"template reference {shown}… has {len(segments)} segments; a reference may "
               f"have at most {MAX_NESTING} after its name")
    return TemplateError(
        with_line(message, source, lineno),
        lineno=lineno,
        hint="read a shorter path: pick the part out in an earlier step, or nest the data less",
    )


# --------------------------------------------------------------------------- misses


@dataclass(frozen=True, slots=True)
class _Miss:
    name: Segment
    message: str
    hint: str | None


def _display(root: str, segments: Iterable[Segment]) -> str:
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


def _misses(chains: Iterable[Chain], scope: Mapping[str, Any]) -> Iterator[_Miss]:
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


def diagnose(
    chains: Iterable[Chain], scope: Mapping[str, Any], jinja_message: str
) -> tuple[str, str | None] | None:
    """The miss Jinja's message is about, when we can tell which one it is."""
    for miss in _misses(chains, scope):
        if repr(miss.name) in jinja_message:
            return miss.message, miss.hint
    return None
