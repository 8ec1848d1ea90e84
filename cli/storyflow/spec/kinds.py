"""What each built-in agent kind needs and reads in ``with:``, for `validate`.

A table, not an import of the agents: validation must not pay for them. Each entry
mirrors how the agent treats its inputs at run time (tests hold the two together):

* ``llm`` fails a step on a key it does not know (`agents/llm_agent/_request.py`
  ``KEYS``) but ignores the ``builtin/grammar`` keys, so an environment can switch a
  grammar agent to ``llm``: an unknown key is an error here too.
* ``command``, ``template``, ``workflow`` and ``human`` read a fixed set of keys and
  ignore the rest, so an unknown key is reported only when it is the near miss of a
  key the kind requires (``tempalte`` for ``template``): the step could not run.
* ``python`` passes every key to the function as a keyword argument, and
  ``builtin/grammar`` ignores other keys on purpose (an environment may switch an
  ``llm`` agent to it): neither is checked. Nor are third-party kinds.

A ``command`` whose ``run`` is a shell string gets a warning (not an error: the run
does what the author wrote) for each ``{{ … }}`` pasted into it unquoted.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from storyflow.errors import Problem
from storyflow.spec.units import nearest
from storyflow.spec.yaml_source import PathKey, Source

if TYPE_CHECKING:
    from storyflow.spec.templates import Templates

BUILTIN_KINDS: Final[dict[str, tuple[str, ...]]] = {
    "python": ("callable",),
    "command": ("run",),
    "template": ("template",),
    "llm": (),
    "workflow": ("path",),
    "human": (),
    "builtin/grammar": (),
}
"""Built-in agent kind → the ``with`` keys it requires."""

LLM_KEYS: Final = frozenset({
    "model", "base_url", "system", "prompt", "messages", "temperature", "max_tokens",
    "seed", "timeout", "api_key_secret", "repair_attempts", "cache", "sample",
    "json_mode", "params", "stream", "idle_timeout",
})
"""Every ``with`` key the ``llm`` agent reads (its ``KEYS``)."""
GRAMMAR_KEYS: Final = frozenset({"grammar", "start", "vars"})
"""The ``builtin/grammar`` agent's own keys (the ``llm`` agent's ``OFFLINE_KEYS``)."""


@dataclass(frozen=True, slots=True)
class WithKeys:
    """The ``with`` keys one agent kind reads."""

    reads: frozenset[str]
    """Keys the kind uses."""
    ignores: frozenset[str] = frozenset()
    """Keys of another kind it ignores on purpose, so an environment can switch kinds."""
    strict: bool = False
    """An unknown key fails the step at run time, rather than being ignored."""
    note: str | None = None
    """Where keys the kind does not read belong instead, when somewhere does."""

    def knows(self, key: str) -> bool:
        return key in self.reads or key in self.ignores


WITH_KEYS: Final[dict[str, WithKeys]] = {
    "llm": WithKeys(LLM_KEYS, GRAMMAR_KEYS, strict=True,
                    note="other request fields go in `with.params`"),
    "command": WithKeys(frozenset({"run", "stdin", "env", "output", "cwd"})),
    "template": WithKeys(frozenset({"template"})),
    "workflow": WithKeys(frozenset({"path", "inputs"})),
    "human": WithKeys(frozenset({"question", "schema", "prompt"})),
}
"""Built-in kind → the ``with`` keys it reads; kinds absent here are not checked."""
_SECRET_HINT: Final = ("the key comes only from the agent's secrets: declare "
                       "`secrets: [OPENAI_API_KEY]`, or name another with api_key_secret")
_KEY_HINTS: Final = {("llm", key): _SECRET_HINT for key in ("api_key", "key", "token")}
"""Hints for keys users often try, as the agents give them at run time."""


def check_agent_with(src: Source, name: str, raw: Mapping[str, Any],
                     templates: Templates | None = None) -> list[Problem]:
    """The keys of agent ``name``'s ``with`` its kind does not read; with ``templates``,
    a warning for each value a shell-string ``run`` would paste in unquoted."""
    kind = raw.get("uses")
    if not isinstance(kind, str):
        return []
    problems = _unknown_keys(src, kind, raw.get("with"), ("agents", name, "with"))
    if kind == "command" and templates is not None:
        problems += check_shell(src, raw.get("with"), ("agents", name, "with"), templates)
    return problems


def check_step_with(
    src: Source,
    sid: str,
    path: PathKey,
    raw: Mapping[str, Any],
    kind: str,
    required: Sequence[str],
    agents: Mapping[str, Any],
    templates: Templates | None = None,
) -> list[Problem]:
    """A step's ``with`` (merged over its agent's) against what ``kind`` needs and reads;
    with ``templates``, a warning for each value its own shell-string ``run`` would paste
    in unquoted (the agent's ``run`` is checked with the agent)."""
    agent_name = raw.get("agent")
    agent = _mapping(agents.get(agent_name)) if isinstance(agent_name, str) else {}
    own, inherited = _mapping(raw.get("with")), _mapping(agent.get("with"))
    merged = {**inherited, **own}
    if raw.get("prompt") is not None:
        merged.setdefault("prompt", raw["prompt"])
    missing = [key for key in required if key not in merged]
    if kind == "human" and "question" not in merged and "prompt" not in merged:
        missing.append("question")
    problems = _unknown_keys(src, kind, own, (*path, "with"), needed=missing)
    if missing and inherited and isinstance(agent_name, str):
        problems += _unknown_keys(src, kind, inherited, ("agents", agent_name, "with"),
                                  needed=missing)
    spec = WITH_KEYS.get(kind)
    misspelt = {
        _near(kind, k) for k in (*own, *inherited) if isinstance(k, str) and not spec.knows(k)
    } if missing and spec is not None else set()
    for key in missing:
        if key in misspelt:
            continue  # reported at the misspelt key
        what = "a question" if key == "question" else f"with.{key}"
        also = " (or a prompt)" if key == "question" else ""
        problems.append(src.problem(path, f"step {sid!r} ({kind}) needs {what}",
                                    hint=f"add `with: {{{key}: ...}}`{also} to the step or its "
                                    "agent", at_key=True))
    if kind == "command" and templates is not None:
        problems += check_shell(src, own, (*path, "with"), templates)
    child = merged.get("path")
    if kind == "workflow" and isinstance(child, str) and "{" not in child:
        problems += _check_child(src, child, (*path, "with", "path") if "path" in own else path)
    if isinstance(agent_name, str) and own:
        # A fallback agent gets the step's own `with` too: a strict kind refuses keys it lacks.
        for fb, fb_kind in _fallbacks(raw, agent_name, agents):
            if fb_kind != kind and fb_kind in WITH_KEYS and WITH_KEYS[fb_kind].strict:
                problems += _unknown_keys(src, fb_kind, own, (*path, "with"),
                                          via=f" (the kind of fallback agent {fb!r})")
    return problems


def _unknown_keys(
    src: Source,
    kind: str,
    with_: Any,
    path: PathKey,
    *,
    needed: Sequence[str] = (),
    via: str = "",
) -> list[Problem]:
    spec = WITH_KEYS.get(kind)
    if spec is None or not isinstance(with_, dict):
        return []
    out = []
    for key in with_:
        if not isinstance(key, str) or spec.knows(key):
            continue
        reads = ", ".join(sorted(spec.reads))
        near = _near(kind, key)
        if near is not None and near in needed:
            hint = f"rename it: the {kind} kind needs with.{near}"
        elif spec.strict:
            hint = _KEY_HINTS.get((kind, key)) or spec.note or f"the {kind} kind reads {reads}"
        else:
            continue  # ignored at run time: not an error
        message = f"with.{key}: unknown key for agent kind {kind}{via}"
        if near is not None:
            message += f"; did you mean {near}?"
        out.append(src.problem((*path, key), message, hint=hint, at_key=True))
    return out


def _near(kind: str, key: str) -> str | None:
    spec = WITH_KEYS.get(kind)
    return nearest(key, spec.reads) if spec is not None else None


def _fallbacks(raw: Mapping[str, Any], agent_name: str, agents: Mapping[str, Any]
               ) -> list[tuple[str, Any]]:
    """(name, kind) of each agent in the step's fallback chain, as the build follows it."""
    seen = {agent_name}
    chain = []
    name = raw.get("fallback") or _mapping(agents.get(agent_name)).get("fallback")
    while isinstance(name, str) and name in agents and name not in seen:
        seen.add(name)
        fb = _mapping(agents[name])
        chain.append((name, fb.get("uses")))
        name = fb.get("fallback")
    return chain


SHELL_HINT: Final = ("use the argv form `run: [prog, arg]`, pass it through `env:` "
                     "(run: 'echo \"$TITLE\"', env: {TITLE: ...}), or `| shquote`")


def check_shell(src: Source, with_: Any, path: PathKey, templates: Templates) -> list[Problem]:
    """A warning for each ``{{ … }}`` a shell-string ``with.run`` pastes in unquoted: its
    value is read by ``sh -c``, so ``;``, ``$( )``, back-quotes and quotes in it run."""
    run = with_.get("run") if isinstance(with_, dict) else None
    if not isinstance(run, str) or not templates.is_template(run):
        return []
    out = []
    after = 0  # where the previous one was found, for a repeated {{ … }}
    for found in templates.unquoted_in_shell(run):
        p = src.problem((*path, "run"), f"{found.text} reaches the shell unquoted: a value "
                        "holding ;, $( ), a back-quote or a quote would run as a command",
                        hint=SHELL_HINT, severity="warning",
                        line_offset=run.count("\n", 0, found.offset))
        line, col, after = _locate(src.text, found.text, p.line, p.col, after)
        out.append(replace(p, line=line, col=col))
    return out


def _locate(text: str, needle: str, line: int, col: int, after: int) -> tuple[int, int, int]:
    """Where ``needle`` is written, searching from line:col (and past ``after``): its line,
    column and end; line:col itself when it is not written as is (escapes, folding)."""
    starts = _line_starts(text)
    if not 1 <= line <= len(starts):
        return line, col, after
    at = text.find(needle, max(starts[line - 1] + col - 1, after))
    if at < 0 or text.count("\n", starts[line - 1], at) > needle.count("\n") + 2:
        return line, col, after
    first = bisect.bisect_right(starts, at)
    return first, at - starts[first - 1] + 1, at + len(needle)


@functools.lru_cache(maxsize=4)
def _line_starts(text: str) -> list[int]:
    starts = [0]
    at = text.find("\n")
    while at >= 0:
        starts.append(at + 1)
        at = text.find("\n", at + 1)
    return starts


def _check_child(src: Source, rel: str, path: PathKey) -> list[Problem]:
    """A sub-workflow's file must exist, and not be this file."""
    try:
        if not src.path or not Path(src.path).is_file():
            return []  # checking text with no file behind it
        here = Path(src.path).resolve()
        target = (here.parent / rel).resolve()
        found = target.is_file()
    except (OSError, RuntimeError) as exc:  # too long, a symlink loop (3.11: RuntimeError)
        shown = rel if len(rel) <= 80 else rel[:60] + f"… ({len(rel)} characters)"
        reason = getattr(exc, "strerror", None) or str(exc)
        return [src.problem(path, f"workflow file {shown!r} cannot be used: {reason}",
                            hint="give the path of a workflow file relative to this one")]
    if target == here:
        return [src.problem(path, f"the workflow {rel!r} would run inside itself",
                            hint="a sub-workflow cannot be the workflow that contains it")]
    if not found:
        return [src.problem(path, f"workflow file {rel!r} not found",
                            hint=f"the path is relative to this workflow's folder ({target})")]
    return []


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` when it is a mapping, else an empty one (the schema reports the rest)."""
    return value if isinstance(value, dict) else {}
