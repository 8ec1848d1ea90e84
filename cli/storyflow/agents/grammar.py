"""A Tracery-format grammar engine: pure, deterministic for a given `random.Random`.

A grammar maps symbol names to alternatives (a bare string is a one-item list).
Rules are text with:

- ``#symbol#`` — replaced by an expansion of one alternative of ``symbol``, recursively;
- ``#symbol.mod1.mod2#`` — modifiers applied left to right to the expansion:
  ``capitalize``, ``capitalizeAll``, ``s`` (plural), ``a`` (a/an), ``ed`` (past tense of
  the first word), ``uppercase``, ``lowercase``, ``possessive``;
- ``[name:#rule#]`` — an action: each comma-separated alternative is expanded now and
  the results are pushed as the alternatives of ``name``; ``[name:POP]`` pops them;
  ``[#rule#]`` expands ``rule`` for its actions only. An action written in a rule's
  text lasts for the rest of the expansion (until a POP); one written at the start of
  a tag (``#[hero:#name#]story#``) lasts only while that tag is expanded;
- ``\\`` escapes the next character (``\\#``, ``\\[``, ``\\,``).

Pushed alternatives are finished text and are never expanded again. Within one
expansion each symbol draws its alternatives from a shuffled deck, so no alternative
repeats before the others were used and never twice in a row. Errors (unknown symbol,
bad syntax, too deep a recursion) raise `GrammarError` with a message naming the symbol.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 50
"""Nested symbol expansions one expansion may reach before it is called runaway."""
MAX_STEPS = 200_000
"""Symbol expansions one `Expander` may do in all (a guard against exponential rules)."""


class GrammarError(ValueError):
    """The grammar is malformed or cannot expand; ``hint`` suggests a fix when one is likely."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# -- the parsed form of a rule ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Action:
    """``[target:alt1,alt2]``, ``[target:POP]`` (``rules`` is None) or ``[#rule#]`` (no target)."""

    target: str | None
    rules: tuple[Rule, ...] | None


@dataclass(frozen=True, slots=True)
class Tag:
    """``#[pre]symbol.mod#``; an empty ``symbol`` expands to nothing (actions only)."""

    preactions: tuple[Action, ...]
    symbol: str
    modifiers: tuple[str, ...]


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
    """Index of the ``#`` closing the tag opened at ``start`` (brackets nest inside tags)."""
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
    rest: list[str] = []
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\" and i + 1 < len(inner):
            rest.append(inner[i + 1])
            i += 2
        elif c == "[":
            end = _closing_bracket(inner, i)
            preactions.append(_parse_action(inner[i + 1 : end]))
            i = end + 1
        else:
            rest.append(c)
            i += 1
    symbol, *modifiers = "".join(rest).strip().split(".")
    symbol = symbol.strip()
    mods = tuple(m.strip() for m in modifiers)
    if not symbol and mods:
        raise GrammarError(f"tag #{inner}# has modifiers but no symbol")
    for mod in mods:
        if mod not in MODIFIERS:
            raise GrammarError(
                f"unknown modifier .{mod} in #{inner}#",
                hint=suggest(mod, MODIFIERS, "modifiers"),
            )
    return Tag(tuple(preactions), symbol, mods)


# -- modifiers ----------------------------------------------------------------------------------

_VOWELS = "aeiou"
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir", "herb")
_A_EXCEPTIONS = ("uni", "use", "usu", "uti", "ute", "uro", "eu", "ewe", "one", "once", "ubiq",
                 "uku", "ufo", "ura")


def capitalize(s: str) -> str:
    """First character upper case, the rest untouched."""
    return s[:1].upper() + s[1:]


def capitalize_all(s: str) -> str:
    """First letter of every word upper case (words split at spaces and hyphens)."""
    return re.sub(r"(^|[\s\-])([^\s\-])", lambda m: m.group(1) + m.group(2).upper(), s)


def plural(s: str) -> str:
    """English plural of the last word: -y → -ies after a consonant, -s/-x/-z/-ch/-sh → -es."""
    low = s.lower()
    if not low:
        return s
    if low.endswith("y") and len(low) > 1 and low[-2] not in _VOWELS:
        return s[:-1] + "ies"
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return s + "es"
    return s + "s"


def article(s: str) -> str:
    """``a`` or ``an`` (by the first sound, roughly) followed by ``s``."""
    word = s.lstrip().lower()
    if not word:
        return s
    if word.startswith(_AN_EXCEPTIONS):
        use_an = True
    elif word.startswith(_A_EXCEPTIONS):
        use_an = False
    elif word[0].isdigit():
        use_an = word.startswith(("8", "11", "18"))
    else:
        use_an = word[0] in _VOWELS
    return ("an " if use_an else "a ") + s


def past(s: str) -> str:
    """Past tense of the first word: -e → -d, -y → -ied after a consonant, else -ed."""
    match = re.match(r"(\s*)(\S+)(.*)", s, re.DOTALL)
    if match is None:
        return s
    lead, word, tail = match.groups()
    low = word.lower()
    if low.endswith("e"):
        word += "d"
    elif low.endswith("y") and len(low) > 1 and low[-2] not in _VOWELS:
        word = word[:-1] + "ied"
    else:
        word += "ed"
    return lead + word + tail


def possessive(s: str) -> str:
    """``s’`` after a final s, else ``’s``."""
    if s.lower().endswith("s"):
        return s + "’"
    return s + "’s"


MODIFIERS: dict[str, Callable[[str], str]] = {
    "capitalize": capitalize,
    "capitalizeAll": capitalize_all,
    "s": plural,
    "a": article,
    "ed": past,
    "uppercase": str.upper,
    "lowercase": str.lower,
    "possessive": possessive,
}
"""Modifier name → function; ``#symbol.name#`` applies it to the expansion."""


# -- grammars and expansion ----------------------------------------------------------------------


class Grammar:
    """Parsed symbols → alternatives; immutable and shareable between expansions."""

    __slots__ = ("_symbols",)

    def __init__(self, symbols: Mapping[str, tuple[Rule, ...]]) -> None:
        self._symbols = dict(symbols)

    @classmethod
    def from_data(cls, data: Any) -> Grammar:
        """A grammar from Tracery data: ``{symbol: text | [text, ...]}``; GrammarError if bad."""
        if not isinstance(data, Mapping):
            raise GrammarError(
                f"a grammar is a mapping of symbol names to alternatives, not a "
                f"{type(data).__name__}",
                hint='write it as {origin: "...", name: [Ann, Bo]}',
            )
        symbols: dict[str, tuple[Rule, ...]] = {}
        for name, value in data.items():
            key = _symbol_name(name)
            alternatives = _alternatives(key, value)
            parsed = []
            for text in alternatives:
                try:
                    parsed.append(parse(text))
                except GrammarError as exc:
                    raise GrammarError(f"symbol {key!r}: {exc.message}", hint=exc.hint) from exc
            symbols[key] = tuple(parsed)
        return cls(symbols)

    def with_literals(self, values: Mapping[str, Iterable[str]]) -> Grammar:
        """A copy where each of ``values`` is a symbol whose alternatives are plain text."""
        symbols = dict(self._symbols)
        for name, texts in values.items():
            key = _symbol_name(name)
            symbols[key] = tuple((t,) if t else () for t in texts) or ((),)
        return Grammar(symbols)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._symbols

    @property
    def symbols(self) -> list[str]:
        """The symbol names, in definition order."""
        return list(self._symbols)

    def alternatives(self, symbol: str) -> tuple[Rule, ...] | None:
        return self._symbols.get(symbol)

    def expander(self, rng: random.Random, *, max_depth: int = MAX_DEPTH) -> Expander:
        """A stateful expansion: actions and decks persist across its `expand` calls."""
        return Expander(self, rng, max_depth=max_depth)

    def flatten(self, rule: str, rng: random.Random, *, max_depth: int = MAX_DEPTH) -> str:
        """Expand the rule text ``rule`` (e.g. ``"#origin#"``)."""
        return self.expander(rng, max_depth=max_depth).flatten(rule)

    def expand(self, symbol: str, rng: random.Random, *, max_depth: int = MAX_DEPTH) -> str:
        """Expand one symbol."""
        return self.expander(rng, max_depth=max_depth).expand(symbol)


class _Layer:
    """One set of alternatives of a symbol (the grammar's, or pushed) and its deck."""

    __slots__ = ("alts", "deck", "last")

    def __init__(self, alts: tuple[Rule, ...]) -> None:
        self.alts = alts
        self.deck: list[int] = []
        self.last: int | None = None

    def draw(self, rng: random.Random) -> Rule:
        n = len(self.alts)
        if n == 1:
            return self.alts[0]
        if not self.deck:
            deck = list(range(n))
            rng.shuffle(deck)
            if deck[-1] == self.last:  # the deck is popped from the end
                deck[0], deck[-1] = deck[-1], deck[0]
            self.deck = deck
        self.last = self.deck.pop()
        return self.alts[self.last]


class Expander:
    """One expansion's state: pushed actions, per-symbol decks, the recursion depth."""

    def __init__(self, grammar: Grammar, rng: random.Random, *, max_depth: int = MAX_DEPTH
                 ) -> None:
        self.grammar = grammar
        self.rng = rng
        self.max_depth = max_depth
        self._stacks: dict[str, list[_Layer]] = {}
        self._chain: list[str] = []
        self._steps = 0

    def knows(self, symbol: str) -> bool:
        """Whether ``symbol`` can be expanded now (defined, or pushed and not popped)."""
        return bool(self._stack(symbol))

    def expand(self, symbol: str) -> str:
        """Expand one symbol; GrammarError if it is unknown."""
        return self._symbol(symbol)

    def flatten(self, rule: str) -> str:
        """Expand rule text."""
        try:
            parsed = parse(rule)
        except GrammarError as exc:
            raise GrammarError(f"rule {rule!r}: {exc.message}", hint=exc.hint) from exc
        return self._rule(parsed)

    def _stack(self, symbol: str) -> list[_Layer]:
        stack = self._stacks.get(symbol)
        if stack is None:
            alts = self.grammar.alternatives(symbol)
            stack = [_Layer(alts)] if alts is not None else []
            self._stacks[symbol] = stack
        return stack

    def _rule(self, rule: Rule) -> str:
        out: list[str] = []
        for section in rule:
            if isinstance(section, str):
                out.append(section)
            elif isinstance(section, Tag):
                out.append(self._tag(section))
            else:
                self._act(section)
        return "".join(out)

    def _tag(self, tag: Tag) -> str:
        pushed: list[str] = []
        for action in tag.preactions:
            if self._act(action):
                pushed.append(action.target or "")
        text = self._symbol(tag.symbol) if tag.symbol else ""
        for target in reversed(pushed):
            self._pop(target)
        for mod in tag.modifiers:
            text = MODIFIERS[mod](text)
        return text

    def _act(self, action: Action) -> bool:
        """Run an action; True when it pushed (so a tag's preaction can undo it)."""
        if action.target is None:
            assert action.rules is not None
            self._rule(action.rules[0])
            return False
        if action.rules is None:
            self._pop(action.target)
            return False
        texts = tuple((t,) if (t := self._rule(r)) else () for r in action.rules)
        self._stack(action.target).append(_Layer(tuple(texts)))
        return True

    def _pop(self, symbol: str) -> None:
        stack = self._stack(symbol)
        if len(stack) <= (1 if symbol in self.grammar else 0):
            raise GrammarError(f"[{symbol}:POP] has nothing to pop",
                               hint=f"push a value first with [{symbol}:#rule#]")
        stack.pop()

    def _symbol(self, symbol: str) -> str:
        stack = self._stack(symbol)
        if not stack:
            where = f" (while expanding #{self._chain[-1]}#)" if self._chain else ""
            known = [s for s, st in self._stacks.items() if st] + self.grammar.symbols
            hint = suggest(symbol, known, "symbols")
            nearest = f"; {hint}" if hint and hint.startswith("did you mean") else ""
            raise GrammarError(f"unknown symbol #{symbol}#{where}{nearest}", hint=hint)
        if len(self._chain) >= self.max_depth:
            loop = " → ".join([*self._chain[-6:], symbol])
            raise GrammarError(
                f"grammar recursion deeper than {self.max_depth} levels at #{symbol}# "
                f"(… {loop})",
                hint="make sure every recursive symbol has an alternative that ends the recursion",
            )
        self._steps += 1
        if self._steps > MAX_STEPS:
            raise GrammarError(f"the expansion grew past {MAX_STEPS:,} symbol expansions",
                               hint="a rule probably expands several recursive symbols at once")
        rule = stack[-1].draw(self.rng)
        self._chain.append(symbol)
        try:
            return self._rule(rule)
        finally:
            self._chain.pop()


def _symbol_name(name: Any) -> str:
    if isinstance(name, bool) or not isinstance(name, str | int | float):
        raise GrammarError(f"symbol name {name!r} is not text")
    key = str(name)
    if not key or any(ch in key for ch in "#[].:,"):
        raise GrammarError(f"bad symbol name {key!r}",
                           hint="symbol names cannot be empty or contain # [ ] . : ,")
    return key


def _alternatives(name: str, value: Any) -> list[str]:
    items = value if isinstance(value, list | tuple) else [value]
    if not items:
        raise GrammarError(f"symbol {name!r} has no alternatives",
                           hint="give it at least one string (it may be empty: \"\")")
    out: list[str] = []
    for item in items:
        if item is None:
            out.append("")
        elif isinstance(item, str):
            out.append(item)
        elif isinstance(item, int | float) and not isinstance(item, bool):
            out.append(str(item))
        else:
            raise GrammarError(
                f"symbol {name!r}: alternatives must be strings, not {type(item).__name__}",
                hint="quote the value, or write a list of strings",
            )
    return out


def suggest(word: str, choices: Iterable[str], what: str) -> str | None:
    options = sorted(set(choices))
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if match:
        return f"did you mean {match[0]!r}?"
    if options and len(options) <= 12:
        return f"known {what}: {', '.join(options)}"
    return None
