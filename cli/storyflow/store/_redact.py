"""Scrub secret values out of anything before it is persisted or shown."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MASK = "***"
MIN_SECRET_LEN = 4
"""Shorter values are not masked: they would mangle ordinary text."""


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """A deep copy of a JSON-like value with every secret inside strings replaced by ``***``.

    Dict keys are scrubbed too; tuples come back as lists (as JSON would have them);
    values of other types are returned as they are.
    """
    needles = sorted(
        {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LEN},
        key=len,
        reverse=True,  # longest first, so a secret containing another is masked whole
    )
    return _scrub(value, needles)


def _scrub(value: Any, needles: list[str]) -> Any:
    if isinstance(value, str):
        for needle in needles:
            if needle in value:
                value = value.replace(needle, MASK)
        return value
    if isinstance(value, dict):
        return {_scrub(k, needles): _scrub(v, needles) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, needles) for v in value]
    return value
