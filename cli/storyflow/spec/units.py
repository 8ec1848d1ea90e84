"""Durations, rates and "did you mean" suggestions."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}


def duration_s(value: object) -> float:
    """``30`` → 30.0, ``"500ms"`` → 0.5, ``"5m"`` → 300.0. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"not a duration: {value!r} (use 30, \"500ms\", \"30s\", \"5m\" or \"1h\")")


def rate_per_s(value: str) -> float:
    """``"60/min"`` → 1.0 per second. Raises ValueError."""
    m = _RATE.match(value)
    if not m:
        raise ValueError(f"not a rate: {value!r} (use \"10/s\", \"60/min\" or \"1000/h\")")
    return float(m.group(1)) / _RATE_UNITS[m.group(2)]


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to ``word``, if any is close enough."""
    options = [c for c in choices if isinstance(c, str)]
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if match:
        return match[0]
    prefixed = [c for c in options if word and c.lower().startswith(word.lower())]
    if len(prefixed) == 1:
        return prefixed[0]
    lowered = {c.lower(): c for c in options}
    return lowered.get(word.lower())


def did_you_mean(word: str, choices: Iterable[str], *, what: str = "") -> str | None:
    options = sorted({c for c in choices if isinstance(c, str)})
    guess = nearest(word, options)
    if guess is not None:
        return f"did you mean {guess!r}?"
    if options and len(options) <= 12:
        return f"valid {what or 'names'}: {', '.join(options)}"
    return None
