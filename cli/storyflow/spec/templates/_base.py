"""What every template module shares, without Jinja: the error, the limits, line numbers.

Importing this module (and everything the plain path uses) never imports jinja2.
"""

from __future__ import annotations

from typing import Final

from storyflow.errors import PermanentError

MAX_SEQUENCE: Final = 10_000_000
"""Largest string or list a template may build with ``*``."""
MAX_EXPONENT: Final = 4096
"""Largest integer exponent a template may use with ``**``."""
TEMPLATE_FILE: Final = "<template>"
"""The file name compiled templates report in tracebacks (to find the template line)."""


class TemplateError(PermanentError):
    """A template failed to compile or render.

    ``lineno`` is the 1-based line inside the template source, or None.
    """

    def __init__(self, message: str, *, lineno: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.lineno = lineno


def too_nested() -> TemplateError:
    """A template nested past what Jinja's parser and compiler (both recursive) can read."""
    return TemplateError(
        "template nested too deeply to read (brackets, operators or blocks inside one another)",
        hint="split it: compute parts in earlier steps, or write simpler expressions",
    )


def with_line(message: str, source: str, lineno: int | None) -> str:
    """``message`` naming the template line, when the template has several."""
    if lineno is not None and "\n" in source.rstrip("\n"):
        return f"{message} (template line {lineno})"
    return message


def template_lineno(exc: BaseException) -> int | None:
    """The template line an exception raised while rendering came from, if any."""
    lineno = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == TEMPLATE_FILE:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return lineno
