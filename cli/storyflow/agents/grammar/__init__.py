"""A Tracery-format grammar engine: pure, deterministic for a given `random.Random`.

A grammar maps symbol names to alternatives (a bare string is a one-item list).
Rules are text with:

- ``#symbol#`` — replaced by an expansion of one alternative of ``symbol``, recursively;
- ``#symbol.mod1.mod2#`` — modifiers applied left to right to the expansion:
  ``capitalize``, ``capitalizeAll``, ``s`` (plural), ``firstS`` (plural of the first
  word), ``a`` (a/an), ``ed`` (past tense of the first word), ``uppercase``,
  ``lowercase``, ``possessive``, and ``replace(old,new)`` (every ``old`` becomes ``new``;
  ``\\,`` and ``\\)`` are a literal comma and parenthesis in a parameter, ``\\#``,
  ``\\[`` and ``\\]`` a literal hash and bracket);
- ``[name:#rule#]`` — an action: each comma-separated alternative is expanded now and
  the results are pushed as the alternatives of ``name``; ``[name:POP]`` pops them;
  ``[#rule#]`` expands ``rule`` for its actions only. An action written in a rule's
  text lasts for the rest of the expansion (until a POP); one written at the start of
  a tag (``#[hero:#name#]story#``) lasts only while that tag is expanded;
- ``\\`` escapes the next character (``\\#``, ``\\[``, ``\\,``).

Errors (unknown symbol or modifier, bad syntax, too deep a recursion) raise
`GrammarError` with a message naming the symbol, and a hint when a fix is likely.

Where this engine departs from Tracery (Kate Compton's JavaScript library, version 2
with its ``baseEngModifiers``), on purpose:

- choosing an alternative — Tracery: uniformly at random on every use, so one can repeat,
  even twice in a row, from ``Math.random`` unless ``setRng`` is called. Here: within one
  `Expander` each symbol (and each pushed list) deals from a shuffled deck: every
  alternative once before any repeats, never the same twice in a row; the generator is
  always the `random.Random` passed in. Why: short texts read as broken when a line
  repeats, and the same seed must give the same text.
- an unknown symbol — Tracery: ``((name))`` in the text and a note in its error list.
  Here: `GrammarError` ("unknown symbol #name# (while expanding #caller#); did you mean
  ...?"). Why: ``((name))`` must not reach a story; the step fails and says what to fix.
- an unknown modifier — Tracery: ``((.name))`` appended to the text, when expanded.
  Here: `GrammarError` when the grammar is loaded, with "did you mean". Why: as above,
  and a typo shows before anything runs.
- a malformed rule (unclosed ``#`` or ``[``, a stray ``]``) — Tracery: notes the error
  and expands what it can. Here: `GrammarError` at load, naming the symbol and the
  character. Why: the same.
- ``.s`` — Tracery: by the last letter only: s, h or x → +es; y after a consonant → -ies;
  else +s, case-sensitively ("month" → "monthes", "buzz" → "buzzs", "" → "s"). Here:
  -s, -x, -z, -ch, -sh → +es, y after a consonant → -ies, else +s, ignoring case; ""
  stays "". Why: English ("months", "buzzes", "churches").
- ``.firstS`` — Tracery: splits at single spaces, applies its ``.s`` to the first piece
  and joins with a space, so one word gains a trailing space ("dog" → "dogs "). Here:
  this ``.s`` on the first word (up to any whitespace), the rest untouched ("dog of war"
  → "dogs of war", "dog" → "dogs"). Why: no stray space; the same plural rules as ``.s``.
- ``.a`` — Tracery: "an" before a vowel letter, except "u" with "i" as third letter
  ("unicorn"), else "a" ("a hour", "an user", "an one", "a 8"; "" → "a "). Here: by the
  first sound, roughly: "an" before a vowel letter, a silent h (hour, honest, honor,
  honour, heir, herb) and 8, 11, 18; "a" before a "you" or "w" sound (uni-, use, usu-,
  uti-, ute-, uro-, eu-, ewe, one, once, ...); leading spaces ignored; "" stays "".
  Why: "an hour", "a user", "a one-eyed cat".
- ``.ed`` — Tracery: the whole text, by its last letter: e → +d, y after a consonant
  → -ied, y after a vowel → +d ("playd"), else +ed ("walk home" → "walk homed").
  Here: the first word only: e → +d, y after a consonant → -ied, else +ed ("walk home"
  → "walked home", "play" → "played"). Why: the verb leads a verb phrase.
- ``.capitalizeAll`` — Tracery: upper-cases every character that follows a character
  other than an ASCII letter or digit ("don't" → "Don'T", "éclair" → "éClair"). Here:
  the first character of each word, words split at whitespace and hyphens ("don't" →
  "Don't", "customs-house" → "Customs-House"). Why: titles with apostrophes and accents.
- ``.replace(old,new)`` — Tracery: the parameters are the text of the first ``(...)``
  split at every comma, so a comma, a ``)``, a ``.`` or a ``#`` cannot be in one;
  ``new`` is a JavaScript replacement pattern (``$&``); a missing ``new`` inserts
  "undefined", extra parameters are ignored. Here: parameters are literal text, spaces
  kept, split at unescaped commas (``\\,`` and ``\\)`` are literal, a ``.`` needs no
  escape, ``#``, ``[`` and ``]`` are escaped); exactly two, the first not empty, or a
  `GrammarError` at load. Why: any text can be replaced, and a mistake is caught early.
- ``.uppercase``, ``.lowercase``, ``.possessive`` (``’s``, or ``’`` after a final s) —
  not in Tracery. Why: small conveniences (the example grammars use ``.possessive``).
- pushed alternatives (``[name:...]``) — Tracery: the expanded texts are pushed as rules,
  parsed again whenever ``#name#`` is used. Here: they are final text, never expanded
  again (so are the agent's ``vars``). Why: a value from a workflow, say "issue #42",
  stays as written.
- a push list — Tracery: split at every comma, even one inside a nested tag, with no
  escape. Here: split at commas outside ``[...]`` and ``#...#``; ``\\,`` is a comma.
- an action — Tracery: ``[a:b:c]`` pushes "b" (split at every colon); any target name.
  Here: split at the first colon (pushes "b:c"); a target that is empty or has ``#``,
  ``[``, ``]`` or ``.`` is a `GrammarError`; spaces around ``POP`` are allowed.
- ``[name:POP]`` — Tracery: pops any layer, the grammar's own rules too (``#name#`` then
  gives ``((name))``). Here: only what was pushed; popping more is a `GrammarError`.
  Why: a POP without its push is a mistake in the grammar.
- state — Tracery: pushes live on the grammar object until ``clearState()``, across
  ``flatten`` calls. Here: a `Grammar` is immutable; state lives in one `Expander`
  (``Grammar.flatten`` and ``Grammar.expand`` start afresh). Why: one parsed grammar is
  shared by every step and run.
- recursion — Tracery: no limit (a runaway rule overflows the stack). Here: `MAX_DEPTH`
  nested symbols and `MAX_STEPS` expansions per `Expander`, then a `GrammarError`
  naming the loop.
- an empty tag, ``##`` or ``#[x:y]#`` — Tracery: looks up an undefined symbol,
  ``((undefined))``. Here: expands to nothing (its actions run; a push in the tag ends
  with it); modifiers without a symbol are a `GrammarError`.
- escapes — Tracery: backslashes stay in the text until ``flatten`` removes them. Here:
  ``\\x`` is resolved when the rule is parsed, in text, actions, tags and parameters.
- spaces around a symbol or modifier name inside a tag (``# hero . s #``) — Tracery:
  part of the name. Here: ignored.
- grammar data — Tracery expects strings or lists of strings. Here: numbers become
  text, null an empty alternative; an empty list, other values, and symbol names that
  are empty or contain ``# [ ] . : ,`` are a `GrammarError` at load.
"""

from __future__ import annotations

from storyflow.agents.grammar._errors import GrammarError, suggest
from storyflow.agents.grammar._expand import MAX_DEPTH, MAX_STEPS, Expander, Grammar
from storyflow.agents.grammar._modifiers import (
    MODIFIERS,
    MODIFIERS_WITH_PARAMETERS,
    ParameterModifier,
    apply_modifier,
    article,
    capitalize,
    capitalize_all,
    first_plural,
    past,
    plural,
    possessive,
    replace,
)
from storyflow.agents.grammar._parse import Action, Modifier, Rule, Section, Tag, parse

__all__ = [
    "MAX_DEPTH",
    "MAX_STEPS",
    "MODIFIERS",
    "MODIFIERS_WITH_PARAMETERS",
    "Action",
    "Expander",
    "Grammar",
    "GrammarError",
    "Modifier",
    "ParameterModifier",
    "Rule",
    "Section",
    "Tag",
    "apply_modifier",
    "article",
    "capitalize",
    "capitalize_all",
    "first_plural",
    "parse",
    "past",
    "plural",
    "possessive",
    "replace",
    "suggest",
]
