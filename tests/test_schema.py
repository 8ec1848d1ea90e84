"""The workflow JSON Schema (schemas/workflow.schema.json): well-formed, documented, and
accepting/rejecting the documents a user would expect."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "workflow.schema.json"

# Keywords whose values are (maps of / lists of) subschemas that describe a *property* or
# item of a document, and so must carry a description for editors.
_MAP_KEYWORDS = ("properties", "patternProperties", "$defs")
_SCHEMA_KEYWORDS = ("additionalProperties", "items", "propertyNames")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    with SCHEMA_PATH.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


def _walk(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (pointer, subschema) for the root and every subschema reached through
    properties, patternProperties, $defs, additionalProperties, items, propertyNames."""
    if not isinstance(node, dict):
        return
    yield path, node
    for kw in _MAP_KEYWORDS:
        for key, sub in node.get(kw, {}).items():
            yield from _walk(sub, f"{path}/{kw}/{key}")
    for kw in _SCHEMA_KEYWORDS:
        sub = node.get(kw)
        if isinstance(sub, dict):
            yield from _walk(sub, f"{path}/{kw}")


def full_workflow() -> dict[str, Any]:
    """A complete, valid workflow modelled on SPEC §3, using every documented key."""
    return {
        "apiVersion": "storyflow/v1",
        "name": "short-story",
        "version": 3,
        "description": "Plan, draft and edit a short story.",
        "inputs": {
            "premise": {"type": "string", "default": "A lighthouse keeper finds a map"},
            "sections": {"type": "integer", "default": 4, "minimum": 1, "maximum": 12},
        },
        "config": {"model": "gpt-4o-mini", "temperature": 0.8},
        "env": ["STORY_LANG"],
        "environments": {
            "offline": {
                "description": "No API key needed.",
                "agents": {
                    "writer": {"uses": "builtin/grammar"},
                    "editor": {"uses": "builtin/grammar"},
                },
                "config": {"model": "none"},
                "pools": {"llm": {"concurrency": 8}},
                "defaults": {"timeout": "30s"},
            },
            "local-ollama": {
                "agents": {"writer": {"with": {"base_url": "http://localhost:11434/v1"}}}
            },
        },
        "defaults": {
            "timeout": "5m",
            "retry": {
                "attempts": 3,
                "delay": "2s",
                "backoff": "exponential",
                "max_delay": "1m",
                "jitter": True,
                "on": ["transient", "timeout", "invalid_output"],
            },
            "cache": False,
            "pool": "llm",
            "allow_failure": False,
        },
        "pools": {
            "llm": {"concurrency": 4, "rate": "60/min", "description": "OpenAI account limits"},
            "cpu": {"concurrency": 2},
            "slow": {"rate": "0.5 / s"},
        },
        "agents": {
            "writer": {
                "uses": "llm",
                "with": {"model": "{{ config.model }}", "system": "You are a novelist."},
                "pool": "llm",
                "secrets": ["OPENAI_API_KEY"],
                "breaker": {"failures": 5, "cooldown": "30s"},
                "fallback": "offline-writer",
                "retry": {"attempts": 2},
                "timeout": 120,
                "description": "Writes prose.",
            },
            "editor": {
                "uses": "llm",
                "with": {"model": "{{ config.model }}", "system": "You are a harsh editor."},
                "pool": "llm",
                "secrets": ["OPENAI_API_KEY"],
                "fallback": "offline-writer",
            },
            "offline-writer": {
                "uses": "builtin/grammar",
                "with": {"grammar": "grammars/writer.yaml"},
            },
            "outliner": {"uses": "python", "with": {"callable": "agents:outline"}},
        },
        "steps": {
            "premise": {"agent": "writer", "prompt": "Expand: {{ inputs.premise }}"},
            "characters": {
                "agent": "writer",
                "prompt": "Characters for {{ steps.premise.output }}",
            },
            "setting": {"agent": "writer", "prompt": "Setting for {{ steps.premise.output }}"},
            "plot": {
                "agent": "outliner",
                "with": {"premise": "{{ steps.premise.output }}"},
                "needs": ["characters", "setting"],
                "output_schema": {"type": "object", "required": ["sections"]},
                "cache": True,
            },
            "draft": {
                "for_each": "steps.plot.output.sections",
                "as": "section",
                "max_parallel": 3,
                "agent": "writer",
                "prompt": "Write {{ section.title }} after {{ previous }}",
                "timeout": "10m",
                "retry": {"attempts": 4, "on": ["transient", "circuit_open"]},
                "budget": {"tokens": 50000, "cost": 0.5},
            },
            "blurbs": {
                "for_each": ["back cover", "catalogue"],
                "uses": "template",
                "with": {"template": "{{ item }}: {{ steps.premise.output }}"},
                "when": "inputs.sections > 2",
            },
            "polish": {
                "description": "Critique and revise until the editor is happy.",
                "needs": "draft",
                "loop": {
                    "max_iterations": 3,
                    "until": "steps.critique.output.score >= 8",
                    "best_by": "steps.critique.output.score",
                    "on_exhausted": "succeed",
                    "steps": {
                        "critique": {
                            "agent": "editor",
                            "prompt": "Score and notes for {{ steps.draft.output }}",
                            "output_schema": {"type": "object", "required": ["score", "notes"]},
                        },
                        "revise": {
                            "agent": "writer",
                            "prompt": "Revise: {{ steps.critique.output.notes }}",
                            "fallback": "offline-writer",
                        },
                    },
                },
            },
            "approve": {
                "uses": "human",
                "with": {"question": "Publish?"},
                "when": True,
                "allow_failure": True,
                "pool": "cpu",
            },
            "assemble": {
                "uses": "template",
                "with": {"template": "{{ steps.polish.output.revise }}"},
                "needs": ["approve", "blurbs"],
                "join": "all_done",
            },
        },
        "outputs": {"story": "{{ steps.assemble.output }}", "sections": 4},
        "artifacts": {
            "story.md": "{{ steps.assemble.output }}",
            "meta/plot.json": "{{ steps.plot.output }}",
        },
        "timeout": "2h",
        "budget": {"tokens": 500000, "cost": 5},
        "seed": 42,
    }


def _errors(
    validator: jsonschema.Draft202012Validator, doc: Any
) -> list[jsonschema.ValidationError]:
    return sorted(validator.iter_errors(doc), key=lambda e: e.json_path)


# --- the schema itself -------------------------------------------------------------


def test_schema_is_valid_json_and_draft_2020_12(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://storyflow.dev/schemas/workflow.schema.json"
    assert schema.get("title")
    assert schema.get("description")
    jsonschema.Draft202012Validator.check_schema(schema)


def test_every_property_has_a_description(schema: dict[str, Any]) -> None:
    missing = [
        pointer
        for pointer, node in _walk(schema)
        if not (isinstance(node.get("description"), str) and node["description"].strip())
    ]
    assert not missing, f"subschemas without a description: {missing}"


def test_walk_reaches_the_whole_schema(schema: dict[str, Any]) -> None:
    pointers = {p for p, _ in _walk(schema)}
    # A few landmarks, so the walk above cannot silently check nothing.
    for expected in (
        "#/properties/apiVersion",
        "#/$defs/step/properties/loop",
        "#/$defs/retry/properties/on/items",
        "#/$defs/environment/properties/agents/additionalProperties",
        "#/properties/inputs/additionalProperties",
    ):
        assert expected in pointers
    assert len(pointers) > 100


def test_objects_with_defined_keys_are_closed(schema: dict[str, Any]) -> None:
    open_objects = [
        pointer
        for pointer, node in _walk(schema)
        if "properties" in node and node.get("additionalProperties") is not False
    ]
    assert not open_objects, f"objects accepting unknown keys: {open_objects}"


def test_no_oneof_or_anyof(schema: dict[str, Any]) -> None:
    text = SCHEMA_PATH.read_text(encoding="utf-8")
    assert '"oneOf"' not in text
    assert '"anyOf"' not in text


def test_defaults_and_examples_satisfy_their_own_schema(schema: dict[str, Any]) -> None:
    checked = 0
    for pointer, node in _walk(schema):
        values = []
        if "default" in node:
            values.append(node["default"])
        values.extend(node.get("examples", []))
        if not values:
            continue
        # Local "#/$defs/..." references resolve against the copied $defs.
        sub = {"$defs": schema["$defs"], **{k: v for k, v in node.items() if k != "$defs"}}
        sub_validator = jsonschema.Draft202012Validator(sub)
        for value in values:
            errs = [e.message for e in sub_validator.iter_errors(value)]
            assert not errs, f"{pointer}: {value!r} fails its own schema: {errs}"
            checked += 1
    assert checked > 10


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            elif key == "patternProperties" and isinstance(value, dict):
                yield from value
                yield from _patterns(value)
            else:
                yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


def test_patterns_compile_as_python_and_ecmascript(schema: dict[str, Any]) -> None:
    patterns = list(_patterns(schema))
    assert patterns
    for pattern in patterns:
        re.compile(pattern)
    regress = pytest.importorskip("regress")  # what check-jsonschema uses by default
    for pattern in patterns:
        regress.Regex(pattern)


# --- documents -----------------------------------------------------------------------


def test_full_workflow_is_valid(validator: jsonschema.Draft202012Validator) -> None:
    errs = _errors(validator, full_workflow())
    assert not errs, [f"{e.json_path}: {e.message}" for e in errs]


def test_minimal_workflow_is_valid(validator: jsonschema.Draft202012Validator) -> None:
    doc = {
        "apiVersion": "storyflow/v1",
        "name": "tiny",
        "steps": {"hello": {"uses": "template", "with": {"template": "hi"}}},
    }
    assert not _errors(validator, doc)


@pytest.mark.parametrize(
    "value", [0, 30, 1.5, "500ms", "30s", "5m", "1h", "2d", "45", " 10 s ", "0.25s"]
)
def test_good_durations(validator: jsonschema.Draft202012Validator, value: Any) -> None:
    doc = full_workflow()
    doc["timeout"] = value
    assert not _errors(validator, doc)


@pytest.mark.parametrize("value", ["5 minutes", "-1s", "1w", "", "fast", -3, True, None])
def test_bad_durations(validator: jsonschema.Draft202012Validator, value: Any) -> None:
    doc = full_workflow()
    doc["timeout"] = value
    errs = _errors(validator, doc)
    assert errs
    assert {e.json_path for e in errs} == {"$.timeout"}


@pytest.mark.parametrize("value", ["60/min", "2/s", "1000/h", "0.5 / second", "10/minute"])
def test_good_rates(validator: jsonschema.Draft202012Validator, value: str) -> None:
    doc = full_workflow()
    doc["pools"]["llm"]["rate"] = value
    assert not _errors(validator, doc)


def _mutate(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = full_workflow()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _drop(path: tuple[Any, ...]) -> dict[str, Any]:
    doc = full_workflow()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


INVALID_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, document, expected JSON path, expected failing keyword)
    ("unknown top-level key", _mutate(("stpes",), {}), "$", "additionalProperties"),
    (
        "unknown step key",
        _mutate(("steps", "premise", "agnet"), "writer"),
        "$.steps.premise",
        "additionalProperties",
    ),
    (
        "unknown key in a loop's nested step",
        _mutate(("steps", "polish", "loop", "steps", "revise", "promt"), "x"),
        "$.steps.polish.loop.steps.revise",
        "additionalProperties",
    ),
    (
        "bad duration",
        _mutate(("defaults", "timeout"), "5 minutes"),
        "$.defaults.timeout",
        "pattern",
    ),
    (
        "bad step duration",
        _mutate(("steps", "draft", "timeout"), "5 minutes"),
        "$.steps.draft.timeout",
        "pattern",
    ),
    ("bad name", _mutate(("name",), "Short Story"), "$.name", "pattern"),
    ("bad join", _mutate(("steps", "assemble", "join"), "any"), "$.steps.assemble.join", "enum"),
    ("bad rate", _mutate(("pools", "llm", "rate"), "fast"), "$.pools.llm.rate", "pattern"),
    (
        "unknown retry class",
        _mutate(("defaults", "retry", "on"), ["transient", "flaky"]),
        "$.defaults.retry.on[1]",
        "enum",
    ),
    ("bad apiVersion", _mutate(("apiVersion",), "storyflow/v2"), "$.apiVersion", "enum"),
    ("missing steps", _drop(("steps",)), "$", "required"),
    ("empty steps", _mutate(("steps",), {}), "$.steps", "minProperties"),
    (
        "agent without uses",
        _drop(("agents", "offline-writer", "uses")),
        "$.agents['offline-writer']",
        "required",
    ),
    ("bad step id", _mutate(("steps", "1st"), {"uses": "template"}), "$.steps", "pattern"),
    (
        "bad secret name",
        _mutate(("agents", "writer", "secrets"), ["OPENAI-KEY"]),
        "$.agents.writer.secrets[0]",
        "pattern",
    ),
    (
        "duplicate secret",
        _mutate(("agents", "writer", "secrets"), ["A", "A"]),
        "$.agents.writer.secrets",
        "uniqueItems",
    ),
    (
        "breaker failures 0",
        _mutate(("agents", "writer", "breaker", "failures"), 0),
        "$.agents.writer.breaker.failures",
        "minimum",
    ),
    (
        "retry attempts 0",
        _mutate(("defaults", "retry", "attempts"), 0),
        "$.defaults.retry.attempts",
        "minimum",
    ),
    (
        "bad backoff",
        _mutate(("defaults", "retry", "backoff"), "random"),
        "$.defaults.retry.backoff",
        "enum",
    ),
    (
        "too many iterations",
        _mutate(("steps", "polish", "loop", "max_iterations"), 1001),
        "$.steps.polish.loop.max_iterations",
        "maximum",
    ),
    (
        "loop without steps",
        _drop(("steps", "polish", "loop", "steps")),
        "$.steps.polish.loop",
        "required",
    ),
    (
        "bad on_exhausted",
        _mutate(("steps", "polish", "loop", "on_exhausted"), "retry"),
        "$.steps.polish.loop.on_exhausted",
        "enum",
    ),
    ("bad as", _mutate(("steps", "draft", "as"), "the section"), "$.steps.draft.as", "pattern"),
    (
        "max_parallel 0",
        _mutate(("steps", "draft", "max_parallel"), 0),
        "$.steps.draft.max_parallel",
        "minimum",
    ),
    ("negative budget", _mutate(("budget", "cost"), -1), "$.budget.cost", "minimum"),
    (
        "unknown pool key",
        _mutate(("pools", "llm", "burst"), 3),
        "$.pools.llm",
        "additionalProperties",
    ),
    (
        "unknown environment key",
        _mutate(("environments", "offline", "steps"), {}),
        "$.environments.offline",
        "additionalProperties",
    ),
    ("bad env name", _mutate(("env",), ["STORY LANG"]), "$.env[0]", "pattern"),
    ("bad input name", _mutate(("inputs", "my-input"), {"type": "string"}), "$.inputs", "pattern"),
    ("input not a schema", _mutate(("inputs", "premise"), "text"), "$.inputs.premise", "type"),
    (
        "artifact escapes run folder",
        _mutate(("artifacts", "../story.md"), "x"),
        "$.artifacts",
        "pattern",
    ),
    (
        "absolute artifact path",
        _mutate(("artifacts", "/tmp/story.md"), "x"),
        "$.artifacts",
        "pattern",
    ),
    ("seed not an integer", _mutate(("seed",), "42"), "$.seed", "type"),
    (
        "when not a condition",
        _mutate(("steps", "blurbs", "when"), 1),
        "$.steps.blurbs.when",
        "type",
    ),
]


@pytest.mark.parametrize(
    ("doc", "json_path", "keyword"),
    [pytest.param(doc, path, kw, id=case_id) for case_id, doc, path, kw in INVALID_CASES],
)
def test_invalid_documents_are_rejected_at_the_right_place(
    validator: jsonschema.Draft202012Validator, doc: dict[str, Any], json_path: str, keyword: str
) -> None:
    errs = _errors(validator, doc)
    assert errs, "document unexpectedly valid"
    found = [(e.json_path, e.validator) for e in errs]
    assert (json_path, keyword) in found, found
    # The error is reported there and nowhere else: one mistake, one message.
    assert {p for p, _ in found} == {json_path}, found


def test_unknown_key_message_names_the_key(validator: jsonschema.Draft202012Validator) -> None:
    errs = _errors(validator, _mutate(("steps", "premise", "agnet"), "writer"))
    assert len(errs) == 1
    assert "agnet" in errs[0].message


def _mutants(doc: Any, rng: Any) -> Any:
    """``doc`` with one value somewhere replaced by something of another type."""
    import copy

    out = copy.deepcopy(doc)
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for key, value in items:
            paths.append((node, key))
            walk(value)

    walk(out)
    node, key = rng.choice(paths)
    node[key] = rng.choice([1, "x", None, [], {}, {"bogus": 1}, ["a"], True, -5, "1x"])
    return out


def test_the_inlined_schema_validates_exactly_as_the_schema() -> None:
    """The validator inlines local $refs for speed: on the examples and 1,500 mutants
    of them, it reports the same errors (instance path, message, keyword) as the schema
    as written."""
    import random

    from jsonschema import Draft202012Validator
    from ruamel.yaml import YAML

    from storyflow.spec.schema import inlined, load_schema

    plain = Draft202012Validator(load_schema())
    fast = Draft202012Validator(inlined(load_schema()))
    rng = random.Random(7)
    docs = [YAML(typ="safe").load(p.read_text(encoding="utf-8"))
            for p in sorted((SCHEMA_PATH.parents[1] / "workflows").glob("*.yaml"))]

    def errors(v: Any, doc: Any) -> list[tuple[str, str, str]]:
        return sorted((str(list(e.absolute_path)), e.message, str(e.validator))
                      for e in v.iter_errors(doc))

    for doc in docs:
        assert errors(fast, doc) == errors(plain, doc) == []
        for _ in range(300):
            mutant = _mutants(doc, rng)
            assert errors(fast, mutant) == errors(plain, mutant)
