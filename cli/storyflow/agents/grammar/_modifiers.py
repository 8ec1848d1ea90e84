"""Modifiers: what ``#symbol.name#`` and ``#symbol.name(a,b)#`` do to an expansion.

Pure functions of text. The English ones are rougher than a dictionary and kinder
than Tracery's (which look only at the last letter); the package docstring lists
every difference.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_VOWELS = "aeiou"
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir", "herb")
_A_EXCEPTIONS = ("uni", "use", "usu", "uti", "ute", "uro", "eu", "ewe", "one", "once", "ubiq",
                 "uku", "ufo", "ura")
_FIRST_WORD = re.compile(r"(\s*)(\S+)(.*)", re.DOTALL)
"""Leading whitespace, the first word (up to whitespace), the rest."""


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


def first_plural(s: str) -> str:
    """`plural` of the first word only: ``dog of war`` → ``dogs of war``."""
    match = _FIRST_WORD.match(s)
    if match is None:
        return s
    lead, word, tail = match.groups()
    return lead + plural(word) + tail


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
    match = _FIRST_WORD.match(s)
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


def replace(s: str, old: str, new: str) -> str:
    """Every ``old`` in ``s`` replaced by ``new``, both literal text (no patterns)."""
    return s.replace(old, new)


MODIFIERS: dict[str, Callable[[str], str]] = {
    "capitalize": capitalize,
    "capitalizeAll": capitalize_all,
    "s": plural,
    "firstS": first_plural,
    "a": article,
    "ed": past,
    "uppercase": str.upper,
    "lowercase": str.lower,
    "possessive": possessive,
}
"""Modifier name → function; ``#symbol.name#`` applies it to the expansion."""


@dataclass(frozen=True, slots=True)
class ParameterModifier:
    """A modifier written with parameters, ``.name(a,b)``."""

    function: Callable[..., str]
    """Called as ``function(expansion, *parameters)``."""
    parameters: tuple[str, ...]
    """The name of each parameter, in order, for messages: ``.replace(old,new)``."""

    def usage(self, name: str) -> str:
        """How the modifier is written: ``.replace(old,new)``."""
        return f".{name}({','.join(self.parameters)})"


MODIFIERS_WITH_PARAMETERS: dict[str, ParameterModifier] = {
    "replace": ParameterModifier(replace, ("old", "new")),
}
"""Modifier name → its function and parameters; ``#symbol.name(a,b)#`` applies it."""


def modifier_names() -> list[str]:
    """Every modifier's name, for "did you mean" hints."""
    return [*MODIFIERS, *MODIFIERS_WITH_PARAMETERS]


def apply_modifier(name: str, args: tuple[str, ...], text: str) -> str:
    """``text`` with the modifier ``name`` applied (the parser has checked name and args)."""
    plain = MODIFIERS.get(name)
    if plain is not None:
        return plain(text)
    return MODIFIERS_WITH_PARAMETERS[name].function(text, *args)
