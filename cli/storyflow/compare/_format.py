"""Figures and short values for people, shared by the text and HTML renderers."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from storyflow.compare._model import Lineage, Pair, StepDiff
from storyflow.report._format import seconds as seconds  # one definition, re-exported

T = TypeVar("T")

ABSENT = "—"
"""A side that has no value (a step only in the other run)."""
ORIGINS = {"kept": "kept", "rerun": "re-run", "only_a": "only in A", "only_b": "only in B"}
MARKS = {"same": "=", "different": "≠", None: "-"}
"""Fingerprint and request comparisons, in one character."""




def signed_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return ("−" if value < 0 else "+") + seconds(abs(value))


def money(cost: float | None) -> str:
    """A cost; ``?`` when not known."""
    if cost is None:
        return "?"
    return f"{cost:.4f}" if abs(cost) < 1 else f"{cost:.2f}"


def total_cost(tokens: int, cost: float, known: bool) -> str:
    """A run's cost: ``-`` when nothing reported usage, ``?`` when a cost is not known."""
    if known and not tokens and not cost:
        return "-"
    return money(cost if known else None)


def cost_delta(a: tuple[int, float, bool], b: tuple[int, float, bool]) -> str:
    """B's cost minus A's, each ``(tokens, cost, known)``."""
    if not (a[0] or b[0] or a[1] or b[1]) and a[2] and b[2]:
        return "-"
    if not (a[2] and b[2]):
        return "?"
    return signed(b[1] - a[1], money)


def signed(value: float, fmt: Callable[[float], str]) -> str:
    return "0" if value == 0 else ("−" if value < 0 else "+") + fmt(abs(value))


def when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def both(pair: Pair[T], fmt: Callable[[T], str], *, missing: str = ABSENT) -> str:
    """``x`` when both sides show the same, else ``a → b``."""
    a = missing if pair.a is None else fmt(pair.a)
    b = missing if pair.b is None else fmt(pair.b)
    return a if a == b else f"{a} → {b}"


def step_tokens(step: StepDiff) -> str:
    if step.tokens.a is None and step.tokens.b is None:
        return "-"
    return both(step.tokens, lambda n: f"{n:,}", missing="-")


def step_cost(step: StepDiff) -> str:
    if step.tokens.a is None and step.tokens.b is None:
        return "-"

    def side(tokens: int | None, cost: float | None) -> str:
        return "-" if tokens is None else money(cost)

    a, b = side(step.tokens.a, step.cost.a), side(step.tokens.b, step.cost.b)
    return a if a == b else f"{a} → {b}"


def short(value: Any, limit: int = 60) -> str:
    """A value in one line: JSON, cut to ``limit`` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def wordy(a: Any, b: Any) -> bool:
    """Whether two changed values read better as a word diff (two strings with spaces)."""
    return isinstance(a, str) and isinstance(b, str) and (" " in a or " " in b)


def lineage_text(lin: Lineage) -> str:
    """``B is a fork of A (from plot; inputs: tone; --set seed=8)``."""
    if lin.relation == "unrelated":
        return "unrelated runs (neither was made from the other)"
    if lin.relation == "siblings":
        return f"both were made from run {lin.parent}"
    child, parent = ("B", "A") if lin.relation == "b_from_a" else ("A", "B")
    what = "a replay" if lin.kind == "replay" else "a fork"
    notes = [f"re-run from {', '.join(lin.steps)}"] if lin.steps else []
    if lin.inputs:
        notes.append("inputs changed: " + ", ".join(lin.inputs))
    if lin.sets:
        notes.append(" ".join(f"--set {s}" for s in lin.sets))
    if lin.file:
        notes.append(f"file {lin.file}")
    return f"{child} is {what} of {parent}" + (f" ({'; '.join(notes)})" if notes else "")


def error_text(error: dict[str, Any] | None) -> str:
    if error is None:
        return ""
    message = " ".join(str(error.get("message", "")).split())
    return f"{error.get('class', 'error')}: {message}"
