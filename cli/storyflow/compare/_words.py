"""Word-level text diff (difflib over word tokens), like ``git diff --word-diff``.

A token is a word with the whitespace that follows it; words are matched on their
letters alone, so a word whose spacing changed shows as the same word followed by a
changed space. Joining the ``=`` and ``-`` pieces gives back A's text exactly, the ``=``
and ``+`` pieces B's. Long texts (a story) are matched line by line first, then word by
word inside the lines that changed; texts too long for words (`MAX_TOKENS`) stay a line
diff; beyond that, they are compared as a whole.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from storyflow.compare._model import Segment, TextDiff

MAX_TOKENS = 20_000
"""Above this many words on a side, texts are compared line by line."""
DIRECT_TOKENS = 2_000
"""Up to this many words, texts are matched word by word at once; longer ones line by
line first, then word by word inside the lines that changed (much faster on stories)."""

_WORD = re.compile(r"\s+|\S+\s*")
_LEAD = re.compile(r"\S+")


def text_diff(a: str, b: str) -> TextDiff:
    """The word diff of ``a`` and ``b`` (a line diff for very long texts)."""
    ta, tb = _WORD.findall(a), _WORD.findall(b)
    if max(len(ta), len(tb)) <= DIRECT_TOKENS:
        return TextDiff("word", _diff(ta, tb, word=True))
    la, lb = a.splitlines(keepends=True), b.splitlines(keepends=True)
    if max(len(la), len(lb)) > MAX_TOKENS:
        return TextDiff("line", _merge([("-", a), ("+", b)]))
    lines = _diff(la, lb, word=False)
    if max(len(ta), len(tb)) > MAX_TOKENS:
        return TextDiff("line", lines)
    out: list[Segment] = []
    removed: list[str] = []
    for op, text in (*lines, ("=", "")):  # the changed lines, diffed word by word
        if op == "-":
            removed.append(text)
            continue
        if op == "+" or removed:
            out += _diff(_WORD.findall("".join(removed)),
                         _WORD.findall(text if op == "+" else ""), word=True)
            removed = []
        if op == "=":
            out.append((op, text))
    return TextDiff("word", _merge(out))


def _key(token: str) -> str:
    found = _LEAD.match(token)
    return found.group() if found else ""


def _diff(ta: list[str], tb: list[str], *, word: bool) -> tuple[Segment, ...]:
    ka = [_key(t) for t in ta] if word else ta
    kb = [_key(t) for t in tb] if word else tb
    out: list[Segment] = []
    head = 0  # the same tokens at both ends need no matching
    while head < min(len(ta), len(tb)) and ta[head] == tb[head]:
        head += 1
    tail = 0
    while tail < min(len(ta), len(tb)) - head and ta[-1 - tail] == tb[-1 - tail]:
        tail += 1
    out.append(("=", "".join(ta[:head])))
    matcher = SequenceMatcher(None, ka[head:len(ka) - tail], kb[head:len(kb) - tail],
                              autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        i1, i2, j1, j2 = i1 + head, i2 + head, j1 + head, j2 + head
        if tag != "equal":
            out.append(("-", "".join(ta[i1:i2])))
            out.append(("+", "".join(tb[j1:j2])))
            continue
        for pa, pb in zip(ta[i1:i2], tb[j1:j2], strict=True):
            if pa == pb:
                out.append(("=", pa))
            else:  # the same word, other spacing
                key = _key(pa)
                out += [("=", key), ("-", pa[len(key):]), ("+", pb[len(key):])]
    out.append(("=", "".join(ta[len(ta) - tail:])))
    return _merge(out)


def _merge(pieces: list[Segment]) -> tuple[Segment, ...]:
    """Adjacent pieces of one kind joined, empty ones dropped; in a run of changes, the
    removals come before the additions."""
    out: list[Segment] = []
    pending: dict[str, list[str]] = {"-": [], "+": []}

    def flush() -> None:
        for op in "-+":
            if pending[op]:
                out.append((op, "".join(pending[op])))
                pending[op] = []

    for op, text in pieces:
        if not text:
            continue
        if op == "=":
            flush()
            if out and out[-1][0] == "=":
                out[-1] = ("=", out[-1][1] + text)
            else:
                out.append(("=", text))
        else:
            pending[op].append(text)
    flush()
    return tuple(out)
