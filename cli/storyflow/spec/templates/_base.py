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
MAX_NESTING: Final = 100
"""Most levels one expression may nest: operators, filters, calls and brackets inside
one another, each ``.key`` or ``[index]`` of a reference one level (so a reference has
at most this many segments after its name). Jinja compiles a template to Python, whose
parser refuses about 200 nested brackets, and its code generator slows with the cube
of the depth (about 0.1 s at 100, 3 s at 300)."""
MAX_BLOCKS: Final = 40
"""Most blocks (``{% if %}``, ``{% for %}``, ``{% macro %}`` …) nested in one another:
each indents the compiled Python once or twice, and Python allows 100 indents."""
MAX_LOOPS: Final = 20
"""Most ``{% for %}`` loops nested in one another: Python's limit on nested loops."""
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


def nested_too_deep(what: str, limit: int, source: str, lineno: int) -> TemplateError:
    """A template past one of the nesting limits; ``what`` names the things nested."""
    return TemplateError(
        with_line(f"template nests {what} more than {limit} deep", source, lineno),
        lineno=lineno,
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
