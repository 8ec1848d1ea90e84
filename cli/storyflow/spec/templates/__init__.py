"""Jinja2 templates and expressions, sandboxed: the only package that imports jinja2.

A workflow string holding ``{{`` or ``{%`` is a template. :class:`Templates` compiles
each distinct source once and renders it in an ``ImmutableSandboxedEnvironment`` with
``StrictUndefined``: templates can read the scope (plain ``dict``/``list`` values) but
cannot reach Python internals, mutate the scope, include or import other templates.

* ``_sandbox``: the environment (limits, filters) and :class:`TemplateError`;
* ``_names``: what a template reads and what Jinja's compiler would refuse, from its AST;
* ``_engine``: :class:`Templates`, plans, the fast path for plain references, errors;
* ``_shell``: which ``{{ … }}`` of a shell command line are not quoted (``| shquote``).
"""

from storyflow.spec.templates._engine import MAX_CACHE, Templates
from storyflow.spec.templates._names import Reference
from storyflow.spec.templates._sandbox import MAX_EXPONENT, MAX_SEQUENCE, TemplateError
from storyflow.spec.templates._shell import Unquoted

__all__ = [
    "MAX_CACHE",
    "MAX_EXPONENT",
    "MAX_SEQUENCE",
    "Reference",
    "TemplateError",
    "Templates",
    "Unquoted",
]
