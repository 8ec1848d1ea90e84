"""The grammar engine's one error, and the "did you mean" hint its messages carry."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GrammarError(ValueError):
    """The grammar is malformed or cannot expand; ``hint`` suggests a fix when one is likely."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def suggest(word: str, choices: Iterable[str], what: str) -> str | None:
    """``did you mean 'x'?`` for a near name, else the few known names, else None."""
    options = sorted(set(choices))
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if match:
        return f"did you mean {match[0]!r}?"
    if options and len(options) <= 12:
        return f"known {what}: {', '.join(options)}"
    return None
