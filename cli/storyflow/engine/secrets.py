"""Which environment variables are secrets, and taking them out of the process.

A run takes every secret out of ``os.environ`` when it starts (`take_secrets`): the
names its agents declare, and every name that *looks* like a secret (`looks_secret`,
`SECRET_SUFFIXES`) — a child workflow's agents are loaded later, and an undeclared
key should not sit where any python step can read it. The values stay in the run's
private mapping (`storyflow.engine.options.Options.environ`): an agent gets those it
declares, and every value is redacted from what the run writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

SECRET_SUFFIXES: tuple[str, ...] = (
    "_API_KEY", "_APIKEY", "_TOKEN", "_SECRET", "_SECRET_KEY", "_ACCESS_KEY", "_PRIVATE_KEY",
    "_PASSWORD", "_PASSWD",
)
"""A variable whose name (upper-cased) ends with one of these, or is one of them
without its leading underscore (``API_KEY``, ``TOKEN``…), is a secret:
``OPENAI_API_KEY``, ``GITHUB_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``DB_PASSWORD``."""

MIN_UNDECLARED_CHARS = 8
"""A pattern-matched value no agent declares is redacted only from this length up, so
that ``MAX_TOKEN=4096`` does not blank every ``4096`` of a run."""


def looks_secret(name: str) -> bool:
    """Whether ``name`` matches one of the secret patterns (`SECRET_SUFFIXES`)."""
    upper = name.upper()
    return any(upper.endswith(s) or upper == s[1:] for s in SECRET_SUFFIXES)


def secret_names(environ: Mapping[str, str], declared: Iterable[str]) -> set[str]:
    """The names of ``environ`` that are secrets: ``declared`` ones and look-alikes."""
    names = {n for n in declared if n in environ}
    names.update(n for n in environ if looks_secret(n))
    return names


def take_secrets(environ: MutableMapping[str, str], declared: Iterable[str]) -> dict[str, str]:
    """Remove every secret (`secret_names`) from ``environ`` (``os.environ``: from the
    process and what it starts from now on); the values, by name."""
    return {n: environ.pop(n) for n in sorted(secret_names(environ, declared))}


def redacted_values(environ: Mapping[str, str], declared: Iterable[str]) -> list[str]:
    """The values a run redacts: each declared secret of 4 characters or more, and
    each pattern-matched one of `MIN_UNDECLARED_CHARS` or more. Longest first, so that
    a value containing another is replaced whole."""
    names = set(declared)
    values = {v for n in names if len(v := environ.get(n, "")) >= 4}
    values.update(
        v for n, v in environ.items()
        if n not in names and looks_secret(n) and len(v) >= MIN_UNDECLARED_CHARS
    )
    return sorted(values, key=len, reverse=True)
