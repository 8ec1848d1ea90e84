"""Asking a person on the terminal for a ``human`` step's answer (rich prompts)."""

from __future__ import annotations

import json
from typing import Any


def prompt_answer(step: str, question: str, schema: dict[str, Any]) -> Any:
    """Ask until the answer matches ``schema``; yes/no for a boolean, a choice for an enum.

    Text is taken as JSON when it parses and the schema is not a string, else as text.
    """
    from jsonschema import Draft202012Validator
    from rich.console import Console
    from rich.prompt import Confirm, Prompt

    console = Console(highlight=False)
    validator = Draft202012Validator(schema)
    console.print(f"[bold]{step}[/bold] asks: {question}")
    kind = schema.get("type")
    choices = schema.get("enum")
    while True:
        value: Any
        if kind == "boolean":
            value = Confirm.ask("answer", console=console)
        else:
            text_choices = [str(c) for c in choices] if isinstance(choices, list) else None
            text = Prompt.ask("answer", console=console, choices=text_choices)
            value = text
            if kind != "string":
                try:
                    value = json.loads(text)
                except ValueError:
                    value = text
        errors = list(validator.iter_errors(value))
        if not errors:
            return value
        console.print(f"[red]not a valid answer:[/red] {errors[0].message}")
