"""Asking a person on the terminal for a ``human`` step's answer (rich prompts).

A person has `TRIES` answers to fit the step's schema. When the input is closed (end of
file: Ctrl-D, a closed pipe) or no answer fits, `prompt_answer` raises `NoAnswer`: the
step then waits, as it does off a terminal, for ``storyflow resume RUN --answer ...``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.prompt import Confirm, InvalidResponse, Prompt

TRIES = 3
"""Answers a person may give (re-asks included) before the step waits instead."""


class NoAnswer(Exception):
    """No answer that fits came from the terminal."""

    def __init__(self, reason: str, *, closed: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        """Why, for people."""
        self.closed = closed
        """The input is closed: asking again is pointless."""


class _Confirm(Confirm):
    """rich's yes/no prompt, whose own re-asks ("Please enter Y or N") count as misses."""

    def __init__(self, prompt: str, *, console: Console, miss: Callable[[], None]) -> None:
        super().__init__(prompt, console=console)
        self._miss = miss

    def on_validate_error(self, value: str, error: InvalidResponse) -> None:
        super().on_validate_error(value, error)
        self._miss()


class _Prompt(Prompt):
    """rich's text prompt, whose own re-asks (not one of the choices) count as misses."""

    def __init__(self, prompt: str, *, console: Console, choices: list[str] | None,
                 miss: Callable[[], None]) -> None:
        super().__init__(prompt, console=console, choices=choices)
        self._miss = miss

    def on_validate_error(self, value: str, error: InvalidResponse) -> None:
        super().on_validate_error(value, error)
        self._miss()


def prompt_answer(step: str, question: str, schema: dict[str, Any], *, tries: int = TRIES,
                  console: Console | None = None) -> Any:
    """Ask until the answer matches ``schema``, at most ``tries`` times; yes/no for a
    boolean, a choice for an enum. Raises `NoAnswer` when the input closes or no
    answer fits.

    Text is taken as JSON when it parses and the schema is not a string, else as text.
    """
    from jsonschema import Draft202012Validator

    console = console or Console(highlight=False)
    validator = Draft202012Validator(schema)
    console.print(f"[bold]{step}[/bold] asks: {question}")
    kind = schema.get("type")
    choices = schema.get("enum")
    misses = 0

    def miss() -> None:
        nonlocal misses
        misses += 1
        if misses >= tries:
            raise NoAnswer(f"no valid answer after {tries} tries", closed=False)

    try:
        while True:
            value: Any
            if kind == "boolean":
                value = _Confirm("answer", console=console, miss=miss)()
            else:
                text_choices = [str(c) for c in choices] if isinstance(choices, list) else None
                text = _Prompt("answer", console=console, choices=text_choices, miss=miss)()
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
            miss()
    except EOFError:
        console.print()  # end the prompt's line
        failure = NoAnswer("the input is closed", closed=True)
    except NoAnswer as exc:
        failure = exc
    console.print(f"[yellow]{step}: {failure.reason}[/yellow]: the step waits for an answer")
    raise failure
