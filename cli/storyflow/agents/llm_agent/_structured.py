"""Structured output: the JSON in a reply, checked against ``output_schema``; repair prompts.

jsonschema is imported on first use, so a run without an ``output_schema`` never pays for it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from storyflow.errors import PermanentError

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)\n?\s*```", re.DOTALL)


def validator_of(schema: dict[str, Any]) -> Any:
    """A Draft 2020-12 validator of ``schema``; a schema that is not valid is permanent."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise PermanentError(f"output_schema is not a valid JSON Schema: {exc.message}",
                             hint="fix the step's output_schema") from None
    return Draft202012Validator(schema)


def checked(content: str, validator: Any) -> tuple[Any, str | None]:
    """(output, None) when usable; (None, what is wrong) when a repair should be asked."""
    if validator is None:
        return content, None
    try:
        value = _parse_json(content)
    except json.JSONDecodeError as exc:
        return None, f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return value, None
    return None, f"{error.message} at {error.json_path}"


def repair_prompt(problem: str) -> str:
    """The user message that answers a reply which is not valid."""
    return (f"That reply is not valid: {problem}. Reply again with only the corrected JSON "
            "object, matching the schema.")


def _parse_json(content: str) -> Any:
    """The JSON in a reply, tolerating code fences and words around one object."""
    text = content.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        fenced = _FENCE.search(text)
        candidates = [fenced.group(1)] if fenced else []
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
        for candidate in candidates:
            try:
                return json.loads(candidate)
            except json.JSONDecodeError:
                pass
        raise first from None
