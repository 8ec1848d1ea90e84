"""Checks the schema cannot express: names that must exist, cycles, templates.

Runs on the raw data even when the schema found problems, so every check here is
defensive about types: a malformed part is skipped (the schema reported it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from storyflow.errors import Problem
from storyflow.spec import kinds as kind_checks
from storyflow.spec.kinds import BUILTIN_KINDS as BUILTIN_KINDS  # agents.registry reads it here
from storyflow.spec.schema import ARTIFACT_HINT
from storyflow.spec.templates import JINJA_GLOBALS, Reference, TemplateError, Templates
from storyflow.spec.units import did_you_mean, nearest, rate_per_s
from storyflow.spec.yaml_source import PathKey, Source

STEP_ATTRS = ("output", "status", "attempts", "error", "agent", "degraded", "usage")
_NOT_SCOPE = JINJA_GLOBALS | {"true", "false", "none", "True", "False", "None"}
"""Names a template reads that are not the scope's: Jinja's globals and constants."""


@dataclass
class _StepInfo:
    id: str
    path: PathKey
    raw: dict[str, Any]
    scope: str | None
    """The enclosing loop's id, or None at the top level."""
    deps: dict[str, PathKey] = field(default_factory=dict)
    """Step id → where the dependency is written."""


@dataclass
class Analysis:
    """What the checker learnt besides problems."""

    problems: list[Problem]
    deps: dict[str, tuple[str, ...]]
    """Step id → the steps of its own scope it waits for (explicit and inferred)."""
    sequential: frozenset[str]
    """Map steps whose templates read ``previous`` (their items run in order)."""


def check(
    source: Source,
    data: Any,
    templates: Templates,
    kinds: Mapping[str, tuple[str, ...]] | None = None,
) -> Analysis:
    """Every semantic problem in ``data``; ``kinds`` maps agent kind → required ``with`` keys."""
    if not isinstance(data, dict):
        return Analysis([], {}, frozenset())
    checker = _Checker(source, data, templates, kinds if kinds is not None else BUILTIN_KINDS)
    problems = checker.run()
    deps = {sid: tuple(info.deps) for sid, info in checker.steps.items()}
    return Analysis(problems, deps, frozenset(checker.uses_previous))


class _Checker:
    def __init__(
        self,
        source: Source,
        data: dict[str, Any],
        templates: Templates,
        kinds: Mapping[str, tuple[str, ...]],
    ) -> None:
        self.src = source
        self.data = data
        self.t = templates
        self.kinds = kinds
        self.problems: list[Problem] = []
        self.agents = _dict(data.get("agents"))
        self.pools = _dict(data.get("pools"))
        self.inputs = _dict(data.get("inputs"))
        env = data.get("env")
        self.env_names = {e for e in env if isinstance(e, str)} if isinstance(env, list) else set()
        self.steps: dict[str, _StepInfo] = {}
        self.uses_previous: set[str] = set()

    def error(self, path: PathKey, message: str, hint: str | None = None, **kw: Any) -> None:
        self.problems.append(self.src.problem(path, message, hint=hint, **kw))

    # -- entry -------------------------------------------------------------------------
    def run(self) -> list[Problem]:
        self._collect_steps(_dict(self.data.get("steps")), ("steps",), None)
        self._check_agents()
        defaults = _dict(self.data.get("defaults"))
        self._check_pool(defaults.get("pool"), ("defaults", "pool"))
        self._check_pool_rates()
        for info in self.steps.values():
            self._check_step(info)
        for name, value in _dict(self.data.get("outputs")).items():
            self._check_template(value, ("outputs", name), None, owner=None)
        for name, value in _dict(self.data.get("artifacts")).items():
            self._check_artifact_path(name)
            self._check_template(value, ("artifacts", name), None, owner=None)
        self._check_cycles()
        return self.problems

    # -- steps -------------------------------------------------------------------------
    def _collect_steps(self, steps: dict[str, Any], path: PathKey, scope: str | None) -> None:
        for sid, raw in steps.items():
            spath = (*path, sid)
            if sid in self.steps:
                first = self.steps[sid].path
                also = ".".join(map(str, first))
                self.error(spath, f"step id {sid!r} is used twice (also at {also})",
                           "step ids must be unique across the workflow, loops included",
                           at_key=True)
                continue
            if not isinstance(raw, dict):
                continue
            self.steps[sid] = _StepInfo(sid, spath, raw, scope)
            loop = raw.get("loop")
            if isinstance(loop, dict):
                self._collect_steps(_dict(loop.get("steps")), (*spath, "loop", "steps"), sid)

    def _check_step(self, info: _StepInfo) -> None:
        raw, path = info.raw, info.path
        given = [k for k in ("agent", "uses", "loop") if k in raw]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            self.error(path, f"step {info.id!r} must have exactly one of agent, uses or loop "
                       f"(it has {what})",
                       "name an agent (agent: writer), an inline kind (uses: template) "
                       "or a loop", at_key=True)
        agent_name = raw.get("agent")
        agent: dict[str, Any] = {}
        if isinstance(agent_name, str):
            if agent_name in self.agents:
                agent = _dict(self.agents[agent_name])
            else:
                self.error((*path, "agent"), f"unknown agent {agent_name!r}",
                           did_you_mean(agent_name, self.agents, what="agents"))
        uses = raw.get("uses")
        if isinstance(uses, str):
            self._check_kind(uses, (*path, "uses"))
        kind = uses if isinstance(uses, str) else agent.get("uses")
        if isinstance(kind, str) and kind in self.kinds:
            self.problems += kind_checks.check_step_with(
                self.src, info.id, path, raw, kind, self.kinds[kind], self.agents, self.t)
        self._check_pool(raw.get("pool"), (*path, "pool"))
        fb = raw.get("fallback")
        if isinstance(fb, str) and fb not in self.agents:
            self.error((*path, "fallback"), f"unknown fallback agent {fb!r}",
                       did_you_mean(fb, self.agents, what="agents"))
        needs = raw.get("needs")
        need_list = [needs] if isinstance(needs, str) else needs if isinstance(needs, list) else []
        for i, need in enumerate(need_list):
            if not isinstance(need, str):
                continue
            npath = (*path, "needs") if isinstance(needs, str) else (*path, "needs", i)
            self._add_dep(info, need, npath, explicit=True)
        locals_ = set()
        if "for_each" in raw:
            as_name = raw.get("as", "item")
            locals_ = {as_name if isinstance(as_name, str) else "item", "index", "previous"}
            fe = raw["for_each"]
            if isinstance(fe, str):
                self._check_template(fe, (*path, "for_each"), info, owner=agent_name,
                                     expression=True)
            else:
                self._check_template(fe, (*path, "for_each"), info, owner=agent_name)
        if isinstance(raw.get("when"), str):
            self._check_template(raw["when"], (*path, "when"), info, owner=agent_name,
                                 expression=True, extra=locals_)
        for key in ("with", "prompt"):
            if key in raw:
                self._check_template(raw[key], (*path, key), info, owner=agent_name,
                                     extra=locals_)
        if agent and "with" in agent and isinstance(agent_name, str):
            # The agent's `with` renders in this step's scope, so its references count here.
            # Identical problems from several steps sharing the agent are deduplicated later.
            self._check_template(agent["with"], ("agents", agent_name, "with"), info,
                                 owner=agent_name, extra=locals_)
        loop = raw.get("loop")
        if isinstance(loop, dict):
            for key in ("until", "best_by"):
                if isinstance(loop.get(key), str):
                    self._check_template(loop[key], (*path, "loop", key), info, owner=None,
                                         expression=True, inner_scope=info.id)

    def _check_kind(self, kind: str, path: PathKey) -> None:
        if kind not in self.kinds:
            self.error(path, f"unknown agent kind {kind!r}",
                       did_you_mean(kind, self.kinds, what="kinds"))

    def _check_pool(self, pool: Any, path: PathKey) -> None:
        if isinstance(pool, str) and pool not in self.pools:
            self.error(path, f"unknown pool {pool!r}", did_you_mean(pool, self.pools, what="pools"))

    def _check_pool_rates(self) -> None:
        for name, raw in self.pools.items():
            rate = _dict(raw).get("rate")
            if not isinstance(rate, str):
                continue
            try:
                per_s = rate_per_s(rate)
            except ValueError:
                continue  # the schema reports a malformed rate
            if per_s <= 0:
                self.error(("pools", name, "rate"), f"pool {name!r} has a rate of zero: "
                           "no step in it could ever start",
                           "give a positive rate such as 1/min, or leave rate out")

    def _check_agents(self) -> None:
        for name, raw in self.agents.items():
            if not isinstance(raw, dict):
                continue
            path = ("agents", name)
            if isinstance(raw.get("uses"), str):
                self._check_kind(raw["uses"], (*path, "uses"))
                self.problems += kind_checks.check_agent_with(self.src, name, raw, self.t)
            self._check_pool(raw.get("pool"), (*path, "pool"))
            fb = raw.get("fallback")
            if isinstance(fb, str) and fb not in self.agents:
                self.error((*path, "fallback"), f"unknown fallback agent {fb!r}",
                           did_you_mean(fb, self.agents, what="agents"))
            # Template syntax of agent.with is checked once here; references per step.
            if "with" in raw:
                self._check_template(raw["with"], (*path, "with"), None, owner=name,
                                     refs=False)
        # Fallback chains must end.
        for start in self.agents:
            seen = [start]
            cur = _dict(self.agents.get(start)).get("fallback")
            while isinstance(cur, str) and cur in self.agents:
                if cur in seen:
                    chain = " → ".join([*seen[seen.index(cur):], cur])
                    if cur == start:
                        self.error(("agents", start, "fallback"),
                                   f"fallback chain loops: {chain}",
                                   "a fallback chain must end at an agent without fallback")
                    break
                seen.append(cur)
                cur = _dict(self.agents.get(cur)).get("fallback")

    def _check_artifact_path(self, name: Any) -> None:
        if not isinstance(name, str):
            return  # the schema reports a name that is not a string
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "~")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            self.error(("artifacts", name), f"artifact path {name!r} leaves the run folder",
                       ARTIFACT_HINT, at_key=True)
        elif parts[0].startswith("events.jsonl"):
            self.error(("artifacts", name), f"artifact {name!r} would overwrite the run's "
                       "event log", "name the artifact otherwise, like story.md",
                       at_key=True)
        elif max(len(part.encode()) for part in parts) > 255 or len(name.encode()) > 1024:
            self.error(("artifacts", name), "artifact path too long for a file system: a name "
                       "may have 255 bytes, the whole path 1,024", ARTIFACT_HINT, at_key=True)

    # -- templates ---------------------------------------------------------------------
    def _check_template(
        self,
        value: Any,
        path: PathKey,
        info: _StepInfo | None,
        *,
        owner: Any,
        expression: bool = False,
        extra: set[str] | frozenset[str] = frozenset(),
        inner_scope: str | None = None,
        report: bool = True,
        refs: bool = True,
    ) -> None:
        for spath, text in _strings(value, path):
            if not expression and not self.t.is_template(text):
                continue
            for err in self.t.problems(text, expression=expression) if report else ():
                offset = (err.lineno - 1) if err.lineno and err.lineno > 1 else 0
                self.error(spath, _syntax_message(err.message),
                           err.hint or "check the {{ }} and {% %} pairs in this string",
                           line_offset=offset)
            if not refs:
                continue
            try:
                found = self.t.references(text, expression=expression)
            except TemplateError:
                continue  # a syntax error, reported above
            for ref in sorted(found, key=lambda r: (r.root, r.key or "", r.attr or "")):
                self._check_reference(ref, spath, info, owner, extra, inner_scope, report)

    def _check_reference(
        self,
        ref: Reference,
        path: PathKey,
        info: _StepInfo | None,
        owner: Any,
        extra: set[str] | frozenset[str],
        inner_scope: str | None,
        report: bool,
    ) -> None:
        def err(message: str, hint: str | None = None) -> None:
            if report:
                self.error(path, message, hint)

        root, key = ref.root, ref.key
        scope = info.scope if info is not None else None
        if root == "previous" and "previous" in extra and info is not None:
            self.uses_previous.add(info.id)
        if root == "steps":
            if key is None:
                return
            self._step_reference(ref, path, info, inner_scope or scope, err)
            return
        if root == "inputs":
            if key is not None and key not in self.inputs:
                err(f"unknown input {key!r}", did_you_mean(key, self.inputs, what="inputs"))
            return
        if root == "env":
            if key is not None and key not in self.env_names:
                err(f"env.{key} is not declared",
                    f"add {key} to the workflow's `env:` list")
            return
        if root == "secrets":
            declared = set()
            if isinstance(owner, str):
                sec = _dict(self.agents.get(owner)).get("secrets")
                if isinstance(sec, list):
                    declared = {s for s in sec if isinstance(s, str)}
            if key is not None and key not in declared:
                where = f"agent {owner!r}" if isinstance(owner, str) else "an agent"
                err(f"secrets.{key} is not declared by {where}",
                    f"add {key} to the `secrets:` list of {where}")
            return
        if root == "loop":
            if scope is None and inner_scope is None:
                err("loop.* is only defined inside a loop's steps")
            return
        if root in ("config", "run") or root in extra or root in _NOT_SCOPE:
            return
        names = ["steps", "inputs", "config", "run", "env", "secrets", *extra]
        guess = nearest(root, names)
        hint = f"did you mean {guess!r}?" if guess else None
        if root in self.inputs:
            hint = f"did you mean inputs.{root}?"
        err(f"unknown name {root!r}", hint)

    def _step_reference(
        self, ref: Reference, path: PathKey, info: _StepInfo | None, scope: str | None,
        err: Any,
    ) -> None:
        key = ref.key or ""
        target = self.steps.get(key)
        if target is None:
            visible = [s for s, i in self.steps.items() if i.scope is None or i.scope == scope]
            err(f"unknown step {key!r}", did_you_mean(key, visible, what="steps"))
            return
        if target.scope is not None and target.scope != scope:
            err(f"step {key!r} is inside loop {target.scope!r}",
                f"use steps.{target.scope}.output.{key} outside the loop")
            return
        if ref.attr is not None and ref.attr not in STEP_ATTRS:
            err(f"steps.{key} has no attribute {ref.attr!r}",
                did_you_mean(ref.attr, STEP_ATTRS, what="attributes"))
        if info is not None:
            self._add_dep(info, key, path, explicit=False)

    def _add_dep(self, info: _StepInfo, dep: str, path: PathKey, *, explicit: bool) -> None:
        target = self.steps.get(dep)
        if target is None:
            if explicit:
                visible = [s for s, i in self.steps.items() if i.scope == info.scope]
                self.error(path, f"unknown step {dep!r} in needs",
                           did_you_mean(dep, visible, what="steps"))
            return
        # A dependency on a step of an outer scope is a dependency of the enclosing loop.
        owner: _StepInfo | None = info
        while owner is not None and target.scope != owner.scope:
            owner = self.steps.get(owner.scope) if owner.scope else None
        if owner is None:
            if explicit:
                self.error(path, f"step {dep!r} is inside loop {target.scope!r} "
                           "and cannot be needed here")
            return
        if dep == owner.id:
            if owner is info:
                self.error(path, f"step {dep!r} depends on itself",
                           "a step cannot read its own output")
            else:
                self.error(path, f"step {info.id!r} reads the output of its own loop {dep!r}",
                           "the loop's output exists only when it ends; use "
                           "loop.previous.<step> for the previous iteration")
            return
        owner.deps.setdefault(dep, path)

    # -- cycles ------------------------------------------------------------------------
    def _check_cycles(self) -> None:
        scopes: dict[str | None, list[str]] = {}
        for sid, info in self.steps.items():
            scopes.setdefault(info.scope, []).append(sid)
        for members in scopes.values():
            cycle = _find_cycle(members, {s: list(self.steps[s].deps) for s in members})
            if cycle:
                first = self.steps[cycle[0]]
                self.error(first.deps.get(cycle[1], first.path),
                           "dependency cycle: " + " → ".join(cycle),
                           "break the cycle: one of these steps must not read the next")


def _find_cycle(nodes: list[str], deps: dict[str, list[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    for start in nodes:
        if color.get(start):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(deps.get(start, ())))]
        trail = [start]
        color[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                trail.pop()
                continue
            if nxt not in deps:
                continue
            if color.get(nxt) == 1:
                return [*trail[trail.index(nxt):], nxt]
            if not color.get(nxt):
                color[nxt] = 1
                trail.append(nxt)
                stack.append((nxt, iter(deps.get(nxt, ()))))
    return None


def _strings(value: Any, path: PathKey) -> Iterator[tuple[PathKey, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, (*path, i))


def _syntax_message(message: str) -> str:
    """Name the template in the message (syntax errors and compile checks already do)."""
    return message if message.startswith("template ") else f"template syntax error: {message}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
