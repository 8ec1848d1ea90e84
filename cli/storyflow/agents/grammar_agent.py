"""The ``builtin/grammar`` agent: offline text from a Tracery grammar, seeded.

``with:`` keys (all optional):

- ``grammar``: a YAML or JSON file, relative to the workflow's folder, or an inline
  mapping; without one a small built-in grammar writes generic prose;
- ``start``: the symbol to expand (default ``origin``);
- ``vars``: name → value from the workflow (``premise: "{{ inputs.premise }}"``); each
  becomes a symbol of plain text (``#premise#``), a list becomes its alternatives;
- ``prompt`` (the step's ``prompt:``) becomes the symbol ``prompt``.
Other keys are ignored, so an environment may switch an ``llm`` agent to this kind.

The random generator is seeded from the workflow's ``seed``, the step instance id and
the rendered inputs (SHA-256, never Python's salted ``hash``): the same run seed gives
the same text, another seed another text, and every step its own.

With an ``output_schema`` the output is built from the schema: an object gets each
property from the symbol of the same name (an array property gets ``minItems``, default
3, expansions of it, or objects built from symbols named after the item's properties),
numbers and integers a value between ``minimum`` and ``maximum`` (default 1..10),
booleans a coin toss, and a string with an ``enum`` and no symbol one of its values.
The start symbol, when defined, is expanded first for its actions, so ``origin:
"[hero:#name#]"`` can share one name among the properties.

Grammar files are parsed once per path and modification time.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storyflow.agents.base import Call
from storyflow.agents.grammar import Expander, Grammar, GrammarError, suggest
from storyflow.errors import PermanentError
from storyflow.spec.yaml_source import load_data_file

DEFAULT_START = "origin"
DEFAULT_ITEMS = 3
"""Items of an array property when its schema gives no ``minItems``."""
CACHE_SIZE = 128
"""Grammar files kept parsed (least recently loaded dropped first)."""

DEFAULT_GRAMMAR: dict[str, Any] = {
    "origin": "#opening# #middle# #closing#",
    "opening": [
        "#prompt.capitalize#.",
        "It began, as these things do, with a small thing: #prompt#.",
        "Nobody had asked for it, but there it was: #prompt#.",
    ],
    "middle": [
        "The #hour# light lay #softly# over everything, and the day seemed to hold its breath.",
        "For a long while nothing moved but the #weather#, and then everything did.",
        "There were questions, and fewer answers than anyone would have liked.",
    ],
    "closing": [
        "By #hour# it was settled, though not in the way anyone had planned.",
        "What remained was quieter, and truer, than what had gone before.",
        "And that, in the end, was enough.",
    ],
    "hour": ["morning", "evening", "late", "grey", "golden"],
    "softly": ["softly", "thinly", "unevenly", "patiently"],
    "weather": ["wind", "rain", "tide", "fog"],
    "prompt": "a story waiting to be told",
    "title": ["The #weather.capitalize#", "A #hour.capitalize# Hour", "What the #weather# Knew"],
    "text": "#origin#",
    "summary": "#middle#",
    "notes": "#closing#",
    "name": ["Ada", "Tomas", "Wren", "Ilse", "Jonah", "Mira"],
}
"""The grammar used when a step gives no ``with.grammar``."""

_cache: dict[Path, tuple[tuple[int, int], Grammar]] = {}
_default: Grammar | None = None


def clear_cache() -> None:
    """Forget every parsed grammar file."""
    _cache.clear()


def cache_info() -> dict[Path, tuple[int, int]]:
    """Cached grammar file → the (mtime_ns, size) it was parsed at (for tests)."""
    return {path: stamp for path, (stamp, _) in _cache.items()}


def load_grammar(path: Path) -> Grammar:
    """The parsed grammar in ``path``, from the cache while the file is unchanged."""
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except OSError as exc:
        raise PermanentError(
            f"cannot read grammar file {path}: {exc.strerror or exc}",
            hint="`with.grammar` is a path relative to the workflow's folder, "
            "or an inline mapping of symbols",
        ) from exc
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(resolved)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        data = load_data_file(resolved)
    except ValueError as exc:
        raise PermanentError(f"cannot load grammar file: {exc}",
                             hint="fix the YAML/JSON syntax of the grammar file") from exc
    try:
        grammar = Grammar.from_data(data)
    except GrammarError as exc:
        raise PermanentError(f"grammar {path}: {exc.message}", hint=exc.hint) from exc
    _cache.pop(resolved, None)
    while len(_cache) >= CACHE_SIZE:
        del _cache[next(iter(_cache))]
    _cache[resolved] = (stamp, grammar)
    return grammar


def seed_for(seed: int | None, step_id: str, inputs: Mapping[str, Any]) -> int:
    """A stable 64-bit seed from the run seed, the step instance and its rendered inputs."""
    blob = json.dumps([seed or 0, step_id, inputs], sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"), default=str)
    return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:8], "big")


class GrammarAgent:
    """Expands a Tracery grammar with a generator seeded from the run seed and the step."""

    kind: str = "builtin/grammar"
    required: tuple[str, ...] = ()

    async def run(self, call: Call) -> Any:
        """The expansion of ``with.start``, or an object shaped by ``output_schema``."""
        inputs = call.inputs
        grammar, where = self._grammar(call)
        literals = _literals(inputs)
        if literals:
            grammar = grammar.with_literals(literals)
        start = inputs.get("start", DEFAULT_START)
        if not isinstance(start, str) or not start:
            raise PermanentError(f"`with.start` must be a symbol name, not {start!r}",
                                 hint=f"for example start: {DEFAULT_START}")
        rng = random.Random(seed_for(call.seed, call.step_id, inputs))
        expander = grammar.expander(rng)
        try:
            schema = call.output_schema
            if isinstance(schema, Mapping) and _shaped(schema):
                if start in grammar:
                    expander.expand(start)  # for its actions: names shared by the properties
                return _build(expander, start, schema, rng, (), required=True)
            if start not in grammar:
                raise GrammarError(f"the start symbol #{start}# is not in the grammar",
                                   hint=_start_hint(grammar, start))
            return expander.expand(start).strip()
        except GrammarError as exc:
            raise PermanentError(f"grammar {where}: {exc.message}", hint=exc.hint) from exc

    def _grammar(self, call: Call) -> tuple[Grammar, str]:
        spec = call.inputs.get("grammar")
        if spec is None:
            call.log("no `with.grammar`: using the built-in default grammar")
            return _default_grammar(), "(built-in default)"
        if isinstance(spec, str):
            if not spec.strip():
                raise PermanentError("`with.grammar` is empty",
                                     hint="give a grammar file path or an inline mapping")
            path = Path(spec)
            if not path.is_absolute():
                path = call.workflow_dir / path
            return load_grammar(path), spec
        if isinstance(spec, Mapping):
            try:
                return Grammar.from_data(spec), "(inline)"
            except GrammarError as exc:
                raise PermanentError(f"inline grammar: {exc.message}", hint=exc.hint) from exc
        raise PermanentError(
            f"`with.grammar` must be a file path or a mapping, not a {type(spec).__name__}",
            hint="for example grammar: grammars/writer.yaml",
        )


def _default_grammar() -> Grammar:
    global _default
    if _default is None:
        _default = Grammar.from_data(DEFAULT_GRAMMAR)
    return _default


def _literals(inputs: Mapping[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    prompt = inputs.get("prompt")
    if prompt is not None:
        out["prompt"] = [_text("prompt", prompt)]
    values = inputs.get("vars")
    if values is None:
        return out
    if not isinstance(values, Mapping):
        raise PermanentError(f"`with.vars` must be a mapping, not a {type(values).__name__}",
                             hint='for example vars: {premise: "{{ inputs.premise }}"}')
    for name, value in values.items():
        key = str(name)
        if not key or any(ch in key for ch in "#[].:,"):
            raise PermanentError(f"`with.vars` name {key!r} cannot be a grammar symbol",
                                 hint="use letters, digits, _ and - in vars names")
        if isinstance(value, list | tuple):
            out[key] = [_text(f"{key}[{i}]", item) for i, item in enumerate(value)]
        else:
            out[key] = [_text(key, value)]
    return out


def _text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise PermanentError(
        f"`with.vars.{name}` is a {type(value).__name__}; vars hold text, numbers or lists of them",
        hint=f'pass the fields you need one by one, e.g. {name}_name: '
        f'"{{{{ steps.X.output.name }}}}"',
    )


def _shaped(schema: Mapping[str, Any]) -> bool:
    """Whether the schema asks for structure (an object with properties, or an array)."""
    kind = _type(schema)
    return (kind == "object" and isinstance(schema.get("properties"), Mapping)) or (
        kind == "array"
    )


def _type(schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None and isinstance(schema.get("properties"), Mapping):
        return "object"
    return kind if isinstance(kind, str) else None


def _build(ex: Expander, name: str, schema: Mapping[str, Any], rng: random.Random,
           path: tuple[str, ...], *, required: bool) -> Any:
    """A value for ``schema``, drawn from the symbol ``name`` where text is needed."""
    kind = _type(schema)
    where = ".".join(path) or "output"
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, Mapping):
            return {}
        needed = set(schema.get("required") or ())
        out: dict[str, Any] = {}
        for key, sub in props.items():
            sub = sub if isinstance(sub, Mapping) else {}
            value = _build(ex, str(key), sub, rng, (*path, str(key)), required=key in needed)
            if value is not _MISSING:
                out[str(key)] = value
        return out
    if kind == "array":
        items = schema.get("items")
        items = items if isinstance(items, Mapping) else {"type": "string"}
        count = _int(schema.get("minItems"), DEFAULT_ITEMS) or DEFAULT_ITEMS
        most = schema.get("maxItems")
        if isinstance(most, int) and not isinstance(most, bool):
            count = max(0, min(count, most))
        symbol = _array_symbol(ex, name, items)
        return [_build(ex, symbol, items, rng, (*path, str(i)), required=True)
                for i in range(count)]
    if kind in ("integer", "number"):
        low = _num(schema.get("minimum"), 1)
        high = _num(schema.get("maximum"), max(10, low))
        if isinstance(schema.get("exclusiveMinimum"), int | float):
            low = max(low, float(schema["exclusiveMinimum"]) + (1 if kind == "integer" else 1e-6))
        if isinstance(schema.get("exclusiveMaximum"), int | float):
            high = min(high, float(schema["exclusiveMaximum"]) - (1 if kind == "integer" else 1e-6))
        if kind == "integer":
            lo, hi = int(-(-low // 1)), int(high // 1)
            return rng.randint(lo, max(lo, hi))
        return round(rng.uniform(low, max(low, high)), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if ex.knows(name):
        return ex.expand(name).strip()
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    if "const" in schema:
        return schema["const"]
    if not required:
        return _MISSING
    raise GrammarError(
        f"output_schema needs {where} but the grammar has no symbol #{name}#",
        hint=f"add a {name!r} symbol to the grammar, or make {where} optional",
    )


def _array_symbol(ex: Expander, name: str, items: Mapping[str, Any]) -> str:
    """The symbol for an array's items: its own name, else its singular (``beats`` → ``beat``)."""
    if _type(items) == "object" or ex.knows(name) or not name.endswith("s"):
        return name
    for singular in (name[:-1], name[:-2] if name.endswith("es") else None,
                     name[:-3] + "y" if name.endswith("ies") else None):
        if singular and ex.knows(singular):
            return singular
    return name


class _Missing:
    pass


_MISSING: Any = _Missing()


def _int(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return default


def _num(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return float(default)


def _start_hint(grammar: Grammar, start: str) -> str:
    return suggest(start, grammar.symbols, "symbols") or "set `with.start` to a defined symbol"
