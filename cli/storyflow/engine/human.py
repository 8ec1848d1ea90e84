"""The ``human`` agent: asks a person.

``with: {question: "...", schema: {...}}`` (``prompt`` works as the question too; the
schema defaults to a string). An answer given with ``resume --answer`` is used as is
(the command checked it against the schema). On a terminal the run's ``ask`` prompts
for one; elsewhere the step pauses: the run ends ``waiting`` (exit 3) and prints the
``storyflow resume RUN --answer STEP=...`` that continues it. It pauses the same way
on a terminal that gives no answer: ``ask`` raises `AnswerNeeded` when the input is
closed or no answer fits the schema after the re-asks.
"""

from __future__ import annotations

from typing import Any

from storyflow.agents.base import Call
from storyflow.engine.runner import CURRENT
from storyflow.errors import AnswerNeeded, PermanentError

DEFAULT_SCHEMA: dict[str, Any] = {"type": "string"}


def question_of(call: Call) -> tuple[str, dict[str, Any]]:
    """The question and the answer's schema of a ``human`` step."""
    inputs = call.inputs
    question = inputs.get("question", inputs.get("prompt"))
    if not isinstance(question, str) or not question.strip():
        raise PermanentError(
            "a human step needs a question", hint="add with: {question: ...} or a prompt"
        )
    schema = inputs.get("schema", call.output_schema or DEFAULT_SCHEMA)
    if not isinstance(schema, dict):
        raise PermanentError("with.schema of a human step must be a JSON Schema object")
    return question, schema


class HumanAgent:
    """Asks a person; see the module docstring."""

    kind = "human"
    required: tuple[str, ...] = ()

    async def run(self, call: Call) -> Any:
        runner = CURRENT.get()
        question, schema = question_of(call)
        answers = runner.opt.answers
        if call.step_id in answers:
            return answers[call.step_id]
        if runner.opt.ask is not None:
            try:
                return await runner.opt.ask(call.step_id, question, schema)
            except AnswerNeeded:
                pass  # no answer came at the terminal: wait, as off a terminal
        raise AnswerNeeded(
            [{"run_id": call.run_id, "step": call.step_id, "question": question, "schema": schema}]
        )
