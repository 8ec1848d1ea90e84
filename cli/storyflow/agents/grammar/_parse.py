"""Rule text → its parsed form: plain text, tags (``#symbol.mods#``) and actions (``[x:y]``).

Parsing happens once, when a grammar is loaded, so a malformed rule or an unknown
modifier is a `GrammarError` before anything is expanded. ``\\`` escapes the next
character everywhere: in text, in actions, in push lists (``\\,``) and in modifier
parameters (``\\,``, ``\\)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from storyflow.agents.grammar._errors import GrammarError, suggest
from storyflow.agents.grammar._modifiers import (
    MODIFIERS,
    MODIFIERS_WITH_PARAMETERS,
    modifier_names,
)


@dataclass(frozen=True, slots=True)
class Action:
    """``[target:alt1,alt2]``, ``[target:POP]`` (``rules`` is None) or ``[#rule#]`` (no target)."""

    target: str | None
    rules: tuple[Rule, ...] | None


@dataclass(frozen=True, slots=True)
class Modifier:
    """``.name`` or ``.name(arg1,arg2)`` in a tag."""

    name: str
    args: tuple[str, ...] = ()
    """The parameters, escapes resolved, spaces kept; ``.name()`` has one empty one."""


@dataclass(frozen=True, slots=True)
class Tag:
    """``#[pre]symbol.mod#``; an empty ``symbol`` expands to nothing (actions only)."""

    preactions: tuple[Action, ...]
    symbol: str
    modifiers: tuple[Modifier, ...]


Section = str | Tag | Action
Rule = tuple[Section, ...]


def parse(text: str) -> Rule:
    """Parse one rule's text into plain text, tags and actions; raises GrammarError."""
    sections: list[Section] = []
    buf: list[str] = []
    i, n = 0, len(text)

    def flush() -> None:
        if buf:
            sections.append("".join(buf))
            buf.clear()

    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            buf.append(text[i + 1])
            i += 2
        elif c == "[":
            end = _closing_bracket(text, i)
            flush()
            sections.append(_parse_action(text[i + 1 : end]))
            i = end + 1
        elif c == "#":
            end = _closing_hash(text, i)
            flush()
            sections.append(_parse_tag(text[i + 1 : end]))
            i = end + 1
        elif c == "]":
            raise GrammarError(f"unmatched ']' at character {i + 1} of {text!r}",
                               hint="escape a literal bracket as \\]")
        else:
            buf.append(c)
            i += 1
    flush()
    return tuple(sections)


def _closing_bracket(text: str, start: int) -> int:
    """Index of the ``]`` closing the ``[`` at ``start``."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise GrammarError(f"unclosed '[' at character {start + 1} of {text!r}",
                       hint="close the action with ']' or escape a literal bracket as \\[")


def _closing_hash(text: str, start: int) -> int:
    """Index of the ``#`` closing the tag opened at ``start`` (brackets nest inside tags).

    Parentheses mean nothing here: a ``#`` in a modifier's parameters is escaped, ``\\#``.
    """
    depth = 0
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "#" and depth == 0:
            return i
        i += 1
    raise GrammarError(f"unclosed '#' at character {start + 1} of {text!r}",
                       hint="tags are written #symbol#; escape a literal hash as \\#")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and tags, keeping escapes for the next parse."""
    parts: list[str] = []
    buf: list[str] = []
    depth = 0
    in_tag = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            if text[i + 1] == sep and depth == 0 and not in_tag:
                buf.append(sep)  # an escaped separator is plain text
            else:
                buf.append(text[i : i + 2])
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "#" and depth == 0:
            in_tag = not in_tag
        if c == sep and depth == 0 and not in_tag:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    parts.append("".join(buf))
    return parts


def _parse_action(inner: str) -> Action:
    target, colon, rest = inner.partition(":")
    if not colon:
        return Action(None, (parse(inner),))  # [#rule#]: expanded for its actions
    target = target.strip()
    if not target or any(ch in target for ch in "#[]."):
        raise GrammarError(f"bad action [{inner}]: {target!r} is not a symbol name",
                           hint="write actions as [name:#rule#] or [name:POP]")
    if rest.strip() == "POP":
        return Action(target, None)
    return Action(target, tuple(parse(part) for part in _split_top(rest, ",")))


def _parse_tag(inner: str) -> Tag:
    preactions: list[Action] = []
    rest: list[str] = []  # escapes kept: the modifiers' parameters need them
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\" and i + 1 < len(inner):
            rest.append(inner[i : i + 2])
            i += 2
        elif c == "[":
            end = _closing_bracket(inner, i)
            preactions.append(_parse_action(inner[i + 1 : end]))
            i = end + 1
        else:
            rest.append(c)
            i += 1
    symbol, mods = _symbol_and_modifiers("".join(rest), inner)
    if not symbol and mods:
        raise GrammarError(f"tag #{inner}# has modifiers but no symbol")
    for mod in mods:
        _check_modifier(mod, inner)
    return Tag(tuple(preactions), symbol, mods)


def _symbol_and_modifiers(body: str, inner: str) -> tuple[str, tuple[Modifier, ...]]:
    """``symbol.mod.mod(a,b)`` → the symbol and the modifiers, names stripped of spaces."""
    symbol, i = _read_until(body, 0, ".")
    mods: list[Modifier] = []
    while i < len(body):  # at a '.'
        name, i = _read_until(body, i + 1, ".(")
        name = name.strip()
        args: tuple[str, ...] = ()
        if i < len(body) and body[i] == "(":
            args, i = _read_args(body, i, name, inner)
            after = body[i:].lstrip()
            if after and after[0] != ".":
                raise GrammarError(
                    f"unexpected {after!r} after .{name}(...) in #{inner}#",
                    hint="chain modifiers with '.', as in #animal.replace(a,e).capitalize#; "
                    "escape a ')' inside a parameter as \\)",
                )
            i = len(body) - len(after)
        mods.append(Modifier(name, args))
    return symbol.strip(), tuple(mods)


def _read_until(text: str, i: int, stops: str) -> tuple[str, int]:
    """The text from ``i`` to the first unescaped character of ``stops`` (escapes resolved)."""
    buf: list[str] = []
    while i < len(text) and text[i] not in stops:
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        buf.append(text[i])
        i += 1
    return "".join(buf), i


def _read_args(text: str, start: int, name: str, inner: str) -> tuple[tuple[str, ...], int]:
    """The comma-separated parameters in the ``(...)`` at ``start``, and the index after it."""
    args: list[str] = []
    buf: list[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            buf.append(text[i + 1])
            i += 2
            continue
        if c == ")":
            args.append("".join(buf))
            return tuple(args), i + 1
        if c == ",":
            args.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    raise GrammarError(
        f"unclosed '(' after .{name} in #{inner}#",
        hint="close the parameters with ')', as in #animal.replace(a,e)#; escape a "
        "literal ')', ',' or '#' inside a parameter as \\), \\, or \\#",
    )


def _check_modifier(mod: Modifier, inner: str) -> None:
    if mod.name in MODIFIERS:
        if mod.args:
            raise GrammarError(f"modifier .{mod.name} takes no parameters, in #{inner}#",
                               hint=f"write .{mod.name} without parentheses")
        return
    spec = MODIFIERS_WITH_PARAMETERS.get(mod.name)
    if spec is None:
        raise GrammarError(
            f"unknown modifier .{mod.name} in #{inner}#",
            hint=suggest(mod.name, modifier_names(), "modifiers"),
        )
    usage = spec.usage(mod.name)
    hint = (f"write {usage}, separating the parameters with a comma; escape a literal "
            "',' or ')' inside a parameter as \\, or \\)")
    wanted = len(spec.parameters)
    if len(mod.args) != wanted:
        got = f"{len(mod.args)}" if mod.args else "none"
        raise GrammarError(
            f"modifier {usage} takes {wanted} parameters, got {got}, in #{inner}#",
            hint=hint,
        )
    if not mod.args[0]:
        raise GrammarError(
            f"modifier {usage} has an empty {spec.parameters[0]!r} parameter, in #{inner}#",
            hint=hint,
        )
