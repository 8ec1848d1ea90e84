"""Run inputs: ``-i key=value`` and ``--inputs FILE`` over defaults, checked by each schema."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from storyflow.errors import InputError
from storyflow.spec.limits import MAX_DEPTH, depth_hint, too_deep
from storyflow.spec.model import Workflow
from storyflow.spec.units import did_you_mean
from storyflow.spec.yaml_source import load_data_file, parse_scalar

_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}


def resolve_inputs(
    workflow: Workflow,
    pairs: Sequence[str] = (),
    inputs_file: Path | None = None,
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's inputs: defaults, then ``inputs_file``, then ``given``, then ``-i`` pairs."""
    schemas = workflow.inputs
    values: dict[str, Any] = {}
    if inputs_file is not None:
        try:
            data = load_data_file(inputs_file)
        except ValueError as exc:
            raise InputError(str(exc), hint="--inputs takes a JSON or YAML mapping") from exc
        if not isinstance(data, dict):
            raise InputError(f"{inputs_file}: expected a mapping of input names to values",
                             hint='for example {"premise": "A lighthouse keeper finds a map"}')
        for key, value in data.items():
            _known(str(key), schemas, f"{inputs_file}")
            values[str(key)] = value
    for key, value in (given or {}).items():
        _known(key, schemas, "inputs")
        values[key] = value
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"-i {pair!r} is not key=value",
                             hint='for example -i premise="A storm at sea"')
        _known(key, schemas, "-i")
        values[key] = coerce(raw, schemas[key], key)
    out: dict[str, Any] = {}
    for name, schema in schemas.items():
        if name in values:
            out[name] = values[name]
        elif isinstance(schema, dict) and "default" in schema:
            out[name] = schema["default"]
        else:
            raise InputError(f"input {name!r} is required",
                             hint=f"pass it with -i {name}=VALUE")
        _check(name, out[name], schema)
    return out


def _known(key: str, schemas: Mapping[str, Any], origin: str) -> None:
    if key not in schemas:
        raise InputError(
            f"{origin}: unknown input {key!r}",
            hint=did_you_mean(key, schemas, what="inputs") or "this workflow declares no inputs",
        )


def coerce(raw: str, schema: Any, name: str) -> Any:
    """Turn a command-line string into the type the input's schema asks for."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    kinds = [kind] if isinstance(kind, str) else list(kind or [])
    text = raw.strip()
    try:
        if kinds == ["string"]:
            return raw
        if kinds == ["integer"]:
            return int(text)
        if kinds == ["number"]:
            value = float(text)
            return int(value) if value.is_integer() and "." not in text else value
        if kinds == ["boolean"]:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if kinds in (["array"], ["object"]):
            value = json.loads(text)
            if too_deep(value) is not None:
                raise _nested_too_deep(name)
            return value
    except ValueError as exc:
        raise InputError(
            f"input {name!r}: {raw!r} is not {_article(kinds[0])}",
            hint=_example(kinds[0], name),
        ) from exc
    except RecursionError as exc:  # json's decoder recurses: far past the limit
        raise _nested_too_deep(name) from exc
    return parse_scalar(raw, f"input {name!r}")


def _nested_too_deep(name: str) -> InputError:
    return InputError(f"input {name!r}: lists and mappings nested deeper than {MAX_DEPTH} "
                      "levels", hint=depth_hint("a value"))


def _article(kind: str) -> str:
    return {"integer": "an integer", "array": "a JSON list", "object": "a JSON object",
            "boolean": "true or false"}.get(kind, f"a {kind}")


def _example(kind: str, name: str) -> str:
    sample = {"integer": "4", "number": "0.5", "boolean": "true", "array": "'[\"a\", \"b\"]'",
              "object": "'{\"k\": 1}'"}.get(kind, "text")
    return f"for example -i {name}={sample}"


def _check(name: str, value: Any, schema: Any) -> None:
    if not isinstance(schema, dict):
        return
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError, UnknownType

    probe = {k: v for k, v in schema.items() if k not in ("default", "description")}
    try:
        Draft202012Validator.check_schema(probe)
        errors = list(Draft202012Validator(probe).iter_errors(value))
    except SchemaError as exc:
        raise InputError(f"input {name!r} has an invalid schema: {exc.message}") from exc
    except UnknownType as exc:
        raise InputError(f"input {name!r} has an invalid schema: unknown type {exc.type!r}") \
            from exc
    if errors:
        first = errors[0]
        where = name + "".join(f"[{p!r}]" for p in first.absolute_path)
        raise InputError(f"input {where!r}: {first.message}",
                         hint=schema.get("description") or f"check the value of {name}")
