"""URLs as a user is shown them: credentials never appear in a message.

`masked` shows every URL in a text with its credentials as ``***``, as curl and pip
print them: ``http://user:***@host/v1``; a user name alone (a token) is the secret, so
``http://***@host/v1``. `masked_url` does the same for one value a user gave as a URL,
with or without its scheme. The `llm` agent and `storyflow doctor` write every URL
through them.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?<![a-zA-Z0-9+.\-])([a-zA-Z][a-zA-Z0-9+.\-]*://)([^\s/?#]*)@")
"""A URL's scheme and its user:password@ — up to the authority's last ``@``, as URLs
are split. A scheme begins where a word does: a long word is read once, not from each
of its letters."""
_BARE_USERINFO = re.compile(r"^()([^\s/?#]*)@")
"""The user:password@ of a value with no scheme (``user:pw@host/v1``)."""


def masked(text: str) -> str:
    """``text`` with the credentials of every URL in it shown as ``***``."""
    return _USERINFO.sub(_mask, text) if "@" in text else text


def masked_url(value: str) -> str:
    """One URL a user gave, its credentials as ``***`` — a scheme-less one too."""
    if "@" not in value:
        return value
    return masked(value) if "://" in value else _BARE_USERINFO.sub(_mask, value)


def _mask(match: re.Match[str]) -> str:
    user, colon, _ = match[2].partition(":")
    return f"{match[1]}{user}:***@" if colon else f"{match[1]}***@"
