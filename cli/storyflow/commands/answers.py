"""Answers for ``human`` steps: ``resume --answer`` values, the questions a waiting run
prints, and asking on the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from storyflow.commands.app import err
from storyflow.errors import UsageError
from storyflow.events import RunStatus


def parse_answers(record: Any, specs: list[str]) -> dict[str, Any]:
    """``--answer STEP=VALUE`` values, each checked against its question's schema.

    VALUE is JSON, else plain text; ``@file`` reads it from a file. Raises UsageError
    (exit 2) for a step that is not waiting, a file that cannot be read, or an answer
    that does not match — before anything about the run changes.
    """
    if not specs:
        return {}
    import json

    from jsonschema import Draft202012Validator

    from storyflow.spec.limits import MAX_DEPTH, too_deep
    from storyflow.spec.units import did_you_mean

    waiting = {q["step"]: q for q in record.meta.get("waiting") or []}
    if record.status != RunStatus.WAITING.value or not waiting:
        raise UsageError(
            f"run {record.run_id} is not waiting for an answer (it is {record.status})",
            hint="--answer continues a run that paused at a human step",
        )
    answers: dict[str, Any] = {}
    for spec in specs:
        step, sep, text = spec.partition("=")
        if not sep or not step:
            raise UsageError(
                f"--answer {spec!r} is not STEP=VALUE",
                hint="for example --answer approve=true or --answer notes=@notes.txt",
            )
        question = waiting.get(step)
        if question is None:
            raise UsageError(
                f"--answer: step {step!r} is not waiting for an answer",
                hint=did_you_mean(step, list(waiting), what="waiting steps")
                or f"waiting: {', '.join(waiting)}",
            )
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text(encoding="utf-8").rstrip("\n")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise UsageError(
                    f"--answer {step}: cannot read {text[1:]}: {why}",
                    hint="@FILE holds the answer as JSON or plain UTF-8 text",
                ) from exc
        deep: tuple[Any, ...] | None = None
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text  # plain text
        except RecursionError:
            value, deep = None, ()  # nested past what JSON's parser takes
        else:
            deep = too_deep(value)
        if deep is not None:
            raise UsageError(
                f"--answer {step}: the answer nests lists or mappings deeper than "
                f"{MAX_DEPTH} levels",
                hint="answers are checked against the question's schema; keep them shallow",
            )
        if question["schema"].get("type") == "string" and not isinstance(value, str):
            value = text  # `--answer title=42` for a string is the text "42"
        errors = list(Draft202012Validator(question["schema"]).iter_errors(value))
        if errors:
            raise UsageError(
                f"--answer {step}: {errors[0].message}",
                hint=f"the answer must match {json.dumps(question['schema'])}",
            )
        answers[step] = value
    return answers


def print_questions(run_id: str, questions: list[dict[str, Any]]) -> None:
    import json
    import shlex

    err(f"run {run_id} is waiting for {'an answer' if len(questions) == 1 else 'answers'}:")
    for q in questions:
        err(f"  {q['step']}: {q['question']}  (answer: {json.dumps(q['schema'])})")
    example = " ".join(
        f"--answer {shlex.quote(q['step'] + '=' + _placeholder(q['schema']))}" for q in questions
    )
    err(f"  continue with: storyflow resume {run_id} {example}")


def _placeholder(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if schema.get("enum"):
        import json

        return json.dumps(schema["enum"][0]) if kind != "string" else str(schema["enum"][0])
    return {"boolean": "true", "integer": "1", "number": "1", "object": "@answer.json",
            "array": "@answer.json"}.get(str(kind), "...")


def interactive() -> bool:
    """Whether a person is at the terminal: stdin and stdout are both terminals."""
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def terminal_ask(ui: Any) -> Any:
    """The run's ``ask``: one question at a time, the live display paused meanwhile.

    When no answer comes — the input is closed (end of file), or no answer fits the
    schema after the re-asks — it raises `AnswerNeeded`: the step waits, as it does
    off a terminal, and the run ends ``waiting`` (exit 3). Once the input is closed,
    later questions wait without being asked.
    """
    import asyncio

    from storyflow.errors import AnswerNeeded

    lock = asyncio.Lock()
    closed = [False]

    async def ask(step: str, question: str, schema: dict[str, Any]) -> Any:
        from storyflow.ui.ask import NoAnswer, prompt_answer

        async with lock:
            if closed[0]:
                raise AnswerNeeded([])
            suspend, resume = getattr(ui, "suspend", None), getattr(ui, "resume", None)
            if suspend is not None:
                suspend()
            try:
                return await asyncio.to_thread(prompt_answer, step, question, schema)
            except NoAnswer as exc:
                closed[0] = closed[0] or exc.closed
                raise AnswerNeeded([]) from exc
            finally:
                if resume is not None:
                    resume()

    return ask
