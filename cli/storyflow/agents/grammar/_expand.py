"""Expansion: a parsed `Grammar`, and the `Expander` that turns its symbols into text.

A `Grammar` is immutable and shared; an `Expander` holds one expansion's state: the
alternatives pushed by actions, each symbol's shuffled deck (no alternative repeats
before the others were used, none twice in a row), the recursion depth and a budget
of symbol expansions.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from storyflow.agents.grammar._errors import GrammarError, suggest
from storyflow.agents.grammar._modifiers import apply_modifier
from storyflow.agents.grammar._parse import Action, Rule, Tag, parse

MAX_DEPTH = 50
"""Nested symbol expansions one expansion may reach before it is called runaway."""
MAX_STEPS = 200_000
"""Symbol expansions one `Expander` may do in all (a guard against exponential rules)."""


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
            text = apply_modifier(mod.name, mod.args, text)
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
