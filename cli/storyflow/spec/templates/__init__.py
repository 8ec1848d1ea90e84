"""Jinja2 templates and expressions, sandboxed: the only package that imports jinja2.

A workflow string holding ``{{`` or ``{%`` is a template. :class:`Templates` compiles
each distinct source once and renders it in an ``ImmutableSandboxedEnvironment`` with
``StrictUndefined``: templates can read the scope (plain ``dict``/``list`` values) but
cannot reach Python internals, mutate the scope, include or import other templates.

jinja2 is imported on first need: a string that is one plain reference
(``{{ steps.plot.output[0] }}``), or is no template at all, is read without it. Jinja-free:

* ``_engine``: :class:`Templates`, its plans and caches, errors made readable;
* ``_plain``: the fast path: recognise a plain reference and walk it through the scope;
* ``_reads``: :class:`Reference`, what a template reads, and which read missed;
* ``_base``: :class:`TemplateError`, the sandbox's limits, template line numbers;
* ``_shell``: which ``{{ … }}`` of a shell command line are not quoted (``| shquote``).

Imported with jinja2, the first time a string is not a plain reference:

* ``_jinja``: the Jinja side of :class:`Templates`: parse, compile, run, explain errors;
* ``_sandbox``: the environment (limits, filters);
* ``_names``: what a template reads and what Jinja's compiler would refuse, from its AST;
* ``_depth``: how deeply it nests, refused past `MAX_NESTING`, `MAX_BLOCKS`, `MAX_LOOPS`
  before Python's compiler sees it (``_plain`` holds plain paths to the same limit).
"""

from storyflow.spec.templates._base import (
    MAX_BLOCKS,
    MAX_EXPONENT,
    MAX_LOOPS,
    MAX_NESTING,
    MAX_SEQUENCE,
    TemplateError,
)
from storyflow.spec.templates._engine import MAX_CACHE, Templates
from storyflow.spec.templates._plain import JINJA_GLOBALS
from storyflow.spec.templates._reads import Reference
from storyflow.spec.templates._shell import Unquoted

__all__ = [
    "JINJA_GLOBALS",
    "MAX_BLOCKS",
    "MAX_CACHE",
    "MAX_EXPONENT",
    "MAX_LOOPS",
    "MAX_NESTING",
    "MAX_SEQUENCE",
    "Reference",
    "TemplateError",
    "Templates",
    "Unquoted",
]
