"""The workflow JSON Schema: located once, compiled once, its errors made readable.

The only module that imports jsonschema for workflow validation. Each schema error
becomes a `Problem` at the offending node, with the nearest valid key or value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from storyflow.errors import Problem
from storyflow.spec.units import did_you_mean
from storyflow.spec.yaml_source import PathKey, Source

WORKFLOW_SCHEMA = "workflow.schema.json"
ARTIFACT_HINT = "use a relative path without '..', like story.md or out/story.md"
_REPO_SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"


def schema_path(name: str) -> Path:
    """Where a shipped JSON Schema lives: inside the wheel, else the source tree."""
    shipped = resources.files("storyflow").joinpath("schemas", name)
    if shipped.is_file():
        return Path(str(shipped))
    return _REPO_SCHEMAS / name


def schema_text(name: str = WORKFLOW_SCHEMA) -> str:
    return schema_path(name).read_text(encoding="utf-8")


@cache
def load_schema(name: str = WORKFLOW_SCHEMA) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(schema_text(name))
    return data


@cache
def _validator(name: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(inlined(load_schema(name)))


_ANNOTATIONS = frozenset({"description", "default", "title", "examples"})


def inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with each local ``{"$ref": "#/$defs/NAME"}`` replaced by the definition
    itself, except where that would recurse (a loop's steps are steps): the same
    validation, without a reference lookup per step and keyword (~30 µs a step of a
    1,000-step file). ``$defs`` stay, for the references left."""
    defs = schema.get("$defs") or {}

    def walk(node: Any, open_: frozenset[str]) -> Any:
        if isinstance(node, list):
            return [walk(v, open_) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        name = ref[len("#/$defs/"):] if isinstance(ref, str) and ref.startswith(
            "#/$defs/") else None
        if name is not None and name in defs and name not in open_ \
                and set(node) - {"$ref"} <= _ANNOTATIONS:
            target = walk(defs[name], open_ | {name})
            if isinstance(target, dict):
                extra = {k: v for k, v in node.items() if k != "$ref"}
                return {**target, **extra}
        return {k: (v if k == "$defs" else walk(v, open_)) for k, v in node.items()}

    out: dict[str, Any] = walk(schema, frozenset())
    return out


def validate_json(instance: Any, name: str) -> list[tuple[str, str]]:
    """Validate any JSON value against a shipped schema; (json path, message) per error."""
    out = []
    for err in _validator(name).iter_errors(instance):
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        out.append((path, err.message))
    return out


def check(source: Source, data: Any) -> list[Problem]:
    """Every schema problem of ``data`` (the file's data, or after --env/--set)."""
    problems: list[Problem] = []
    for err in _validator(WORKFLOW_SCHEMA).iter_errors(data):
        problems.extend(_translate(source, err))
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if isinstance(inputs, dict):
        for name, sub in inputs.items():
            if isinstance(name, str) and isinstance(sub, dict):
                problems.extend(_check_input(source, name, sub))
    if isinstance(data, dict):
        problems.extend(_check_step_schemas(source, data))
    return problems


def check_sections(source: Source, data: Any, keys: Iterable[str]) -> list[Problem]:
    """The schema problems of the top-level ``keys`` of ``data`` only.

    What an environment overlay changes (agents, pools, defaults …) is checked again
    after the merge without paying for the steps, which no overlay touches.
    """
    if not isinstance(data, dict):
        return []
    validator = _validator(WORKFLOW_SCHEMA)
    properties = load_schema()["properties"]
    problems: list[Problem] = []
    for key in keys:
        if key not in data or key not in properties:
            continue
        for err in validator.evolve(schema=properties[key]).iter_errors(data[key]):
            err.path.appendleft(key)
            problems.extend(_translate(source, err))
    if "agents" in keys:
        problems.extend(_check_step_schemas(source, data, steps=False))
    return problems


def _check_step_schemas(source: Source, data: dict[str, Any], *, steps: bool = True
                        ) -> list[Problem]:
    """Each ``output_schema``, and each ``human`` step's answer ``schema``, must be a
    JSON Schema (checked here, once, rather than failing when the step runs)."""
    agents = data.get("agents") if isinstance(data.get("agents"), dict) else {}
    assert isinstance(agents, dict)
    found: list[tuple[PathKey, Any, str]] = []
    for name, agent in agents.items():
        if isinstance(agent, dict) and agent.get("uses") == "human":
            w = agent.get("with")
            if isinstance(w, dict) and "schema" in w:
                found.append((("agents", name, "with", "schema"), w["schema"], "answer schema"))

    def walk(steps: Any, at: PathKey) -> None:
        if not isinstance(steps, dict):
            return
        for sid, raw in steps.items():
            if not isinstance(raw, dict):
                continue
            here: PathKey = (*at, sid)
            if "output_schema" in raw:
                found.append(((*here, "output_schema"), raw["output_schema"], "output_schema"))
            agent = agents.get(raw.get("agent")) if isinstance(raw.get("agent"), str) else None
            kind = raw.get("uses") or (agent.get("uses") if isinstance(agent, dict) else None)
            w = raw.get("with")
            if kind == "human" and isinstance(w, dict) and "schema" in w:
                found.append(((*here, "with", "schema"), w["schema"], "answer schema"))
            loop = raw.get("loop")
            if isinstance(loop, dict):
                walk(loop.get("steps"), (*here, "loop", "steps"))

    if steps:
        walk(data.get("steps"), ("steps",))
    problems = []
    for at, sub, what in found:
        problems.extend(_check_schema(source, at, sub, f"this {what}"))
    return problems


def _check_schema(source: Source, at: PathKey, sub: Any, what: str) -> list[Problem]:
    """``sub`` (at ``at``) must be a JSON Schema; ``what`` names it in the message."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(sub, (dict, bool)):
        return []  # the workflow schema already says it must be a mapping
    try:
        Draft202012Validator.check_schema(sub)
    except SchemaError as exc:
        return [source.problem((*at, *exc.path), f"{what} is not a valid JSON Schema: "
                               f"{exc.message}",
                               hint="see https://json-schema.org/understanding-json-schema")]
    return []


def _check_input(source: Source, name: str, sub: dict[str, Any]) -> list[Problem]:
    """An input's schema must be a JSON Schema, and its default must satisfy it."""
    from jsonschema import Draft202012Validator

    at: PathKey = ("inputs", name)
    invalid = _check_schema(source, at, sub, f"input {name!r}")
    if invalid:
        return invalid
    if "default" not in sub:
        return []
    probe = {k: v for k, v in sub.items() if k != "default"}
    err = next(iter(Draft202012Validator(probe).iter_errors(sub["default"])), None)
    if err is None:
        return []
    return [source.problem((*at, "default"), f"the default of input {name!r} does not match "
                           f"its schema: {err.message}")]


FOREIGN_KEYS: dict[str, tuple[str, str, str]] = {
    "if": ("when", "GitHub Actions' `if:`",
           "a bare expression, e.g. when: steps.review.output.approved"),
    "continue-on-error": ("allow_failure", "GitHub Actions' `continue-on-error:`",
                          "allow_failure: true lets the run succeed when this step fails"),
    "timeout-minutes": ("timeout", "GitHub Actions' `timeout-minutes:`",
                        "a duration with its unit: 30s, 10m, 1h"),
    "strategy": ("for_each", "GitHub Actions' `strategy: {matrix: …}`",
                 "for_each: a list or an expression, one instance per item, `as:` names it"),
    "matrix": ("for_each", "GitHub Actions' `matrix:`",
               "for_each: a list or an expression, one instance per item, `as:` names it"),
    "depends": ("needs", "Dagu's `depends:`",
                "needs: [step, …]; reading steps.X.output in a template already needs X"),
    "retryPolicy": ("retry", "Dagu's `retryPolicy:`",
                    "retry: {attempts: 3, delay: 2s, backoff: exponential}"),
    "continueOn": ("allow_failure", "Dagu's `continueOn:`",
                   "allow_failure: true lets the run succeed when this step fails"),
    "preconditions": ("when", "Dagu's `preconditions:`",
                      "a bare expression, e.g. when: steps.review.output.approved"),
}
"""Keys of GitHub Actions and Dagu → (storyflow's key, where the key comes from, a hint)."""

_TYPE_NAMES = {
    "object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
    "number": "a number", "boolean": "true or false", "null": "null",
}


def _describe(path: PathKey) -> str:
    if not path:
        return "the workflow"
    if len(path) >= 2 and path[-2] == "steps":
        return f"step {path[-1]!r}"
    if len(path) >= 2 and path[-2] == "agents":
        return f"agent {path[-1]!r}"
    if len(path) >= 2 and path[-2] == "pools":
        return f"pool {path[-1]!r}"
    if isinstance(path[-1], int) and len(path) >= 2:
        return f"item {path[-1]} of {path[-2]}"  # `secrets[1]`, not a bare `1`
    return str(path[-1])


def _pattern_hint(pattern: str) -> str | None:
    if "ms|s|m|h" in pattern:
        return 'write a duration as 30, "500ms", "30s", "5m" or "1h"'
    if "sec|second" in pattern:
        return 'write a rate as "10/s", "60/min" or "1000/h"'
    if pattern.startswith("^[a-z0-9]"):
        return "use lowercase letters, digits, '-' and '_', starting with a letter or digit"
    if pattern.startswith("^[A-Za-z_]") and "_-]" in pattern:
        return "use letters, digits, '_' and '-', starting with a letter or '_'"
    if pattern.startswith("^[A-Za-z_]"):
        return "use letters, digits and '_', not starting with a digit"
    if pattern.startswith("^[A-Za-z0-9_-]"):
        return "use letters, digits, '-' and '_'"
    return None


def _foreign_key(
    source: Source, at: PathKey, value: Any, where: str, allowed: set[str]
) -> Problem | None:
    """A key of GitHub Actions or Dagu, named with storyflow's word for it."""
    key = at[-1]
    foreign = FOREIGN_KEYS.get(key) if isinstance(key, str) else None
    if foreign is None or foreign[0] not in allowed:
        return None
    target, origin, hint = foreign
    if target == "timeout" and type(value) is int:
        hint = f"timeout: {value}m ({hint})"
    return source.problem(
        at, f"unknown key {key!r} in {where}; storyflow writes it `{target}:` ({origin})",
        hint=hint, at_key=True)


def _translate(source: Source, err: Any) -> list[Problem]:
    path: PathKey = tuple(err.absolute_path)
    kind = err.validator
    where = _describe(path)
    if kind == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set(err.schema.get("properties", {}))
        patterns = [re.compile(p) for p in err.schema.get("patternProperties", {})]
        out = []
        for key in err.instance:
            if key in allowed or any(p.search(str(key)) for p in patterns):
                continue
            foreign = _foreign_key(source, (*path, key), err.instance[key], where, allowed)
            if foreign is not None:
                out.append(foreign)
                continue
            out.append(
                source.problem(
                    (*path, key),
                    f"unknown key {key!r} in {where}",
                    hint=did_you_mean(str(key), allowed, what="keys"),
                    at_key=True,
                )
            )
        return out
    if "propertyNames" in err.schema_path:
        # A bad key: jsonschema reports it at the mapping, we point at the key itself.
        name = err.instance
        at = (*path, name) if isinstance(name, str) else path
        if path == ("artifacts",) and kind == "pattern":
            # Same words as the semantic check, so the two merge into one problem.
            return [source.problem(at, f"artifact path {name!r} leaves the run folder",
                                   hint=ARTIFACT_HINT, at_key=True)]
        hint = _pattern_hint(err.validator_value) if kind == "pattern" else None
        return [source.problem(at, f"invalid name {name!r} in {where}", hint=hint,
                               at_key=True)]
    if kind == "propertyNames":
        return [source.problem(path, f"invalid name in {where}: {err.message}", at_key=True)]
    if kind == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return [source.problem(path, f"{where} is missing the required key {missing!r}")]
    if kind == "enum" or kind == "const":
        options = [str(o) for o in err.validator_value] if kind == "enum" else [err.validator_value]
        if path == ("apiVersion",):
            return [source.problem(path, f"unknown apiVersion {err.instance!r}",
                                   hint=f"this storyflow reads apiVersion: {options[0]}")]
        hint = did_you_mean(str(err.instance), options, what="values")
        return [source.problem(path, f"{err.instance!r} is not a valid value for {where}",
                               hint=hint)]
    if kind == "type":
        expected = err.validator_value
        names = [expected] if isinstance(expected, str) else list(expected)
        want = " or ".join(_TYPE_NAMES.get(n, n) for n in names)
        got = type(err.instance).__name__
        got = {"dict": "a mapping", "list": "a list", "str": "a string", "NoneType": "nothing",
               "int": "an integer", "float": "a number", "bool": "true/false"}.get(got, got)
        return [source.problem(path, f"{where} must be {want}, not {got}")]
    if kind == "pattern":
        return [source.problem(path, f"{err.instance!r} is not valid for {where}",
                               hint=_pattern_hint(err.validator_value))]
    if kind == "minProperties" and not err.instance:
        return [source.problem(path, f"{where} is empty", hint="add at least one entry")]
    return [source.problem(path, f"{where}: {err.message}")]
