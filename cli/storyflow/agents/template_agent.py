"""The ``template`` agent: its output is its rendered ``with.template``.

The engine renders every ``with`` string in the step's scope before the call, and a
single-expression template (``"{{ steps.plot.output }}"``) yields the native value, so
there is nothing left to do here but hand the value back.
"""

from __future__ import annotations

from typing import Any

from storyflow.agents.base import Call
from storyflow.errors import PermanentError


class TemplateAgent:
    """Returns ``with.template`` as rendered by the engine."""

    kind: str = "template"
    required: tuple[str, ...] = ("template",)

    async def run(self, call: Call) -> Any:
        """The rendered template: text, or the native value of a single expression."""
        try:
            return call.inputs["template"]
        except KeyError:
            raise PermanentError(
                "the template agent needs `with.template`",
                hint="add `with: {template: ...}` to the step or its agent",
            ) from None
