"""One line of the doctor's report, and the helpers every check shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor's report."""

    check: str
    """What was checked, e.g. ``state dir`` or ``agent writer: model``."""
    status: str
    """``ok``, ``warn`` or ``fail``."""
    detail: str
    """What was found."""
    fix: str = ""
    """What to do about it; empty when nothing is needed."""


def literal(value: Any) -> str | None:
    """``value`` when it is a plain string (not a template), else None."""
    if isinstance(value, str) and "{{" not in value and "{%" not in value:
        return value
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """An agent as the file (or one step, merging its ``with``) configures it."""

    label: str
    """How the report names it: ``agent writer``, ``step outline``."""
    kind: str
    """Its agent kind (``uses``)."""
    with_: Mapping[str, Any]
    """Its configuration."""
    secrets: tuple[str, ...]
    """The secrets it declares."""
