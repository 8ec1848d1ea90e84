"""YAML text → plain data, with line:col recovered on demand. The only ruamel importer
(this package: `_parse` reads the text and refuses what would crash or explode).

Loading is the hot path of `validate` and `run`, so a valid file is read once with
the C-accelerated safe loader. Positions cost a second pass over the node tree
(`compose`), paid only when there is a problem to point at.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storyflow.errors import InputError, Problem
from storyflow.spec.limits import MAX_DEPTH, TooDeep, depth_hint
from storyflow.spec.yaml_source._parse import (
    PathKey,
    alias_trouble,
    json_path,
    safe_load,
    safe_yaml,
)

__all__ = ["PathKey", "Pos", "Source", "json_path", "load", "load_data_file", "parse_scalar",
           "text_hash"]


@dataclass(frozen=True, slots=True)
class Pos:
    """A 1-based position in the file."""

    line: int
    col: int
    block: bool = False
    """The value is a block scalar (`|` or `>`): its text starts on the next line."""


@dataclass
class Source:
    """One workflow file: its text, its data, and positions when asked for."""

    path: str
    text: str
    data: Any = None
    problems: list[Problem] = field(default_factory=list)
    cached: bool = False
    """The data came from the cache of parsed files, not from parsing the text."""
    _keys: dict[PathKey, Pos] | None = None
    _values: dict[PathKey, Pos] | None = None

    def _index(self) -> tuple[dict[PathKey, Pos], dict[PathKey, Pos]]:
        if self._keys is None or self._values is None:
            self._keys, self._values, _ = _index_positions(self.text)
        return self._keys, self._values

    def key_pos(self, path: PathKey) -> Pos:
        """Position of the mapping key at ``path`` (or its nearest located ancestor)."""
        keys, values = self._index()
        return _nearest(path, keys, values)

    def value_pos(self, path: PathKey) -> Pos:
        """Position of the value at ``path`` (or its nearest located ancestor)."""
        keys, values = self._index()
        return _nearest(path, values, keys)

    def problem(
        self,
        path: PathKey,
        message: str,
        *,
        hint: str | None = None,
        at_key: bool = False,
        line_offset: int = 0,
        severity: str = "error",
    ) -> Problem:
        pos = self.key_pos(path) if at_key else self.value_pos(path)
        line = pos.line + line_offset + (1 if pos.block and line_offset else 0)
        return Problem(
            message=message,
            file=self.path,
            line=line,
            col=pos.col if not line_offset else 1,
            path=json_path(path),
            hint=hint,
            severity=severity,
        )


def _nearest(path: PathKey, first: dict[PathKey, Pos], second: dict[PathKey, Pos]) -> Pos:
    p = tuple(path)
    if p not in first and p not in second and any(not isinstance(k, str | int) for k in p):
        # The index holds keys as written (text); the data has null/float/bool keys.
        p = tuple(k if isinstance(k, str | int) else str(k) for k in p)
    while True:
        if p in first:
            return first[p]
        if p in second:
            return second[p]
        if not p:
            return Pos(1, 1)
        p = p[:-1]


def text_hash(text: str) -> str:
    """Identifies a file's text, for the cache of parsed files."""
    import hashlib

    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def load(
    path: str | Path, text: str | None = None, cache: Any = None
) -> Source:
    """Read and parse ``path``. Problems (syntax, duplicates, encoding) land in ``.problems``.

    ``cache`` (a `storyflow.spec.ParsedCache`) may hold the parsed data of an earlier
    load of the same text; YAML is then not parsed at all. Positions for messages are
    recovered from the text only when a problem needs one.
    """
    name = str(path)
    if text is None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            src = Source(name, "")
            src.problems.append(
                Problem(f"cannot read the file: {exc.strerror or exc}", file=name,
                        hint="check the path")
            )
            return src
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            src = Source(name, "")
            src.problems.append(
                Problem("the file is not valid UTF-8", file=name, line=line,
                        hint="save the file as UTF-8")
            )
            return src
    src = Source(name, text)
    if cache is not None:
        hit = cache.get(name, text_hash(text))
        if hit is not None:
            src.data = hit
            src.cached = True
            return src
    src.data, error = safe_load(text, allow_duplicates=False)
    if error is None:
        _reject_recursion(src)
        return src
    from ruamel.yaml.constructor import DuplicateKeyError

    if isinstance(error, DuplicateKeyError):
        # Report every duplicate, not just the first, then carry on with last-wins data.
        _, _, duplicates = _index_positions(text)
        for dup_path, pos, first in duplicates:
            src.problems.append(
                Problem(
                    f"duplicate key {dup_path[-1]!r} (first defined at line {first.line})",
                    file=name, line=pos.line, col=pos.col, path=json_path(dup_path),
                    hint="remove one of them; YAML keeps only the last",
                )
            )
        src.data, _ = safe_load(text, allow_duplicates=True)
        _reject_recursion(src)
        return src
    if isinstance(error, TooDeep):
        src.problems.append(error.problem(name))
    else:
        src.problems.append(_syntax_problem(name, error, text))
    src.data = None
    return src


def _reject_recursion(src: Source) -> None:
    """Reject data no check can walk: an alias inside its own anchor (``a: &x [*x]``),
    aliases nested so deep that the data expands past `MAX_EXPANDED_NODES`, or nesting
    past `MAX_DEPTH` once aliases stand for what they name."""
    if "&" not in src.text:
        return  # no anchor, so no alias: nothing can repeat (the common, fast case)
    found = alias_trouble(src.data, "this file")
    if found is not None:
        where, message, hint = found
        src.data = None
        src.problems.append(src.problem(where, message, hint=hint))


def _syntax_problem(name: str, exc: Exception, text: str | None = None) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = (mark.line + 1) if mark is not None else 1
    col = (mark.column + 1) if mark is not None else 1
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    message = f"YAML syntax error: {what}" + (f" ({context})" if context else "")
    hint = "check indentation and quoting near this line"
    if "\t" in str(what) or "tab" in str(what) or _tab_at(text, mark):
        hint = "YAML indentation uses spaces, not tabs"
    elif "mapping values are not allowed" in str(what):
        hint = "quote strings that contain ': ' (for example prompt: \"Title: ...\")"
    return Problem(message, file=name, line=line, col=col, hint=hint)


def _tab_at(text: str | None, mark: Any) -> bool:
    """Whether the syntax error sits on a tab in the line's indentation."""
    if text is None or mark is None:
        return False
    lines = text.splitlines()
    if not 0 <= mark.line < len(lines):
        return False
    line = lines[mark.line]
    indent = line[: len(line) - len(line.lstrip(" \t"))]
    return "\t" in indent and mark.column <= len(indent)


def _index_positions(
    text: str,
) -> tuple[dict[PathKey, Pos], dict[PathKey, Pos], list[tuple[PathKey, Pos, Pos]]]:
    """Walk the node tree: key positions, value positions and duplicate keys."""
    from ruamel.yaml.error import YAMLError

    keys: dict[PathKey, Pos] = {}
    values: dict[PathKey, Pos] = {}
    duplicates: list[tuple[PathKey, Pos, Pos]] = []
    try:
        root = safe_yaml().compose(text)
    except (YAMLError, ValueError, TypeError, RecursionError):
        return keys, values, duplicates
    if root is None:
        return keys, values, duplicates
    duplicated: set[PathKey] = set()
    for path, key_node, node, alias in _walk(root, ()):
        if not alias:  # an alias's node starts at its anchor: point at the key instead
            mark = node.start_mark
            block = getattr(node, "style", None) in ("|", ">")
            values[path] = Pos(mark.line + 1, mark.column + 1, block)
        if key_node is not None:
            km = key_node.start_mark
            kpos = Pos(km.line + 1, km.column + 1)
            if path in keys:
                # Under a duplicated key every path repeats: report the key, not its contents.
                if not any(path[:i] in duplicated for i in range(len(path))):
                    duplicates.append((path, kpos, keys[path]))
                duplicated.add(path)
            else:
                keys[path] = kpos
    return keys, values, duplicates


def _walk(node: Any, path: PathKey) -> Iterator[tuple[PathKey, Any, Any, bool]]:
    """(path, key node, node, is an alias) for every node, each anchored node walked once."""
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    stack: list[tuple[Any, PathKey, Any]] = [(node, path, None)]
    seen: set[int] = set()
    while stack:
        current, cur_path, key_node = stack.pop()
        alias = id(current) in seen
        yield cur_path, key_node, current, alias
        if alias:
            continue  # its anchor was walked already (and it may contain itself)
        seen.add(id(current))
        if isinstance(current, MappingNode):
            for k, v in reversed(current.value):
                key = k.value if isinstance(k.value, str) else str(k.value)
                stack.append((v, (*cur_path, key), k))
        elif isinstance(current, SequenceNode):
            for i in reversed(range(len(current.value))):
                stack.append((current.value[i], (*cur_path, i), None))


def parse_scalar(text: str, what: str = "a command-line value") -> Any:
    """Parse a command-line value as a YAML scalar or flow collection ("3" → 3, "[a, b]");
    text that does not parse is the text itself. Raises `InputError` for nesting past
    `MAX_DEPTH` (``what`` names the value)."""
    data, error = safe_load(text, allow_duplicates=False)
    if isinstance(error, TooDeep):
        raise InputError(f"{what}: lists and mappings nested deeper than {MAX_DEPTH} levels "
                         f"(column {error.col})", hint=depth_hint("a value"))
    if error is not None:
        return text
    if "&" in text and alias_trouble(data, what) is not None:
        return text  # read literally, as text that does not parse is
    return data


def load_data_file(path: Path) -> Any:
    """Read a JSON or YAML data file (``--inputs``); raises ValueError with line:col."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8") from exc
    data, error = safe_load(text, allow_duplicates=False)
    if error is not None:
        p = (error.problem(str(path), "a data file") if isinstance(error, TooDeep)
             else _syntax_problem(str(path), error, text))
        raise ValueError(f"{p.file}:{p.line}:{p.col}: {p.message}") from error
    trouble = alias_trouble(data, str(path)) if "&" in text else None
    if trouble is not None:
        raise ValueError(f"{path}: {trouble[1]} (at {json_path(trouble[0])})")
    return data
