"""Environment overlays, checked merged onto the file and located where they are written.

``environments.NAME`` is deep-merged onto ``config``, ``agents``, ``pools``,
``defaults`` and ``executor`` by ``--env NAME``. `validate` checks each merged
result like the file itself; a problem whose value comes from the overlay points at
the overlay (``environments.llm.agents.writer.with.tempalte``), not at the base agent,
and names the environment. A problem the file has without any overlay is not
reported again.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from storyflow.errors import Problem
from storyflow.spec.yaml_source import PathKey, Pos, Source

if TYPE_CHECKING:
    from storyflow.spec.templates import Templates

MERGED: Final = ("config", "agents", "pools", "defaults", "executor")
"""The top-level keys an overlay sets (its ``description`` is its own)."""


def deep_merge(base: Any, overlay: Any) -> Any:
    """``overlay`` merged onto ``base``: mappings key by key, anything else replaced.

    Parts of ``base`` the overlay does not touch are shared, not copied.
    """
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for k, v in overlay.items():
            out[k] = deep_merge(base.get(k), v)
        return out
    return copy.deepcopy(overlay)


def merge(data: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with one environment's overlay merged onto it (``data`` is not changed)."""
    out = dict(data)
    for key, value in overlay.items():
        if key != "description":
            out[key] = deep_merge(data.get(key), value)
    return out


class OverlaySource(Source):
    """The file as seen through ``environments.NAME``: positions of overlaid values
    are the overlay's own."""

    def __init__(self, base: Source, name: str, data: Mapping[str, Any]) -> None:
        super().__init__(base.path, base.text, base.data)
        self._base = base
        self.name = name
        envs = data.get("environments")
        overlay = envs.get(name) if isinstance(envs, dict) else None
        self._overlay = overlay if isinstance(overlay, dict) else {}
        self._data = data

    def key_pos(self, path: PathKey) -> Pos:
        return self._base.key_pos(path)  # one index of the text, shared

    def value_pos(self, path: PathKey) -> Pos:
        return self._base.value_pos(path)

    def origin(self, path: PathKey) -> PathKey:
        """Where the value at ``path`` of the merged data is written."""
        if not path or path[0] == "description" or path[0] not in self._overlay:
            return path
        here: PathKey = ("environments", self.name)
        node: Any = self._overlay
        base: Any = self._data
        for part in path:
            if not isinstance(node, dict):
                return (*here, *path)  # inside a value the overlay replaces whole
            if part not in node:
                return path  # from the file itself
            node = node[part]
            base = base.get(part) if isinstance(base, dict) else None
        if isinstance(node, dict) and isinstance(base, dict):
            return path  # a mapping both define: the file's is the one merged onto
        return (*here, *path)

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
        return super().problem(self.origin(path), message, hint=hint, at_key=at_key,
                               line_offset=line_offset, severity=severity)


def names(data: Mapping[str, Any]) -> list[str]:
    """The environments the file defines (names that are not strings are skipped)."""
    envs = data.get("environments")
    return [n for n in envs if isinstance(n, str)] if isinstance(envs, dict) else []


def check(
    src: Source,
    data: dict[str, Any],
    which: Iterable[str],
    templates: Templates,
    kinds: Mapping[str, tuple[str, ...]] | None,
    known: Sequence[Problem] = (),
) -> list[Problem]:
    """Every problem of ``data`` with each environment in ``which`` merged onto it.

    Each message names its environment; problems in ``known`` (the file's own) and
    problems identical to them are left out.
    """
    from storyflow.spec import schema, semantic

    seen = {(p.line, p.col, p.message) for p in known}
    out: list[Problem] = []
    envs = data.get("environments")
    for name in which:
        overlay = envs.get(name) if isinstance(envs, dict) else None
        if not isinstance(overlay, dict):
            continue  # the schema reports an overlay that is not a mapping
        merged = merge(data, overlay)
        osrc = OverlaySource(src, name, data)
        found = schema.check_sections(osrc, merged, [k for k in MERGED if k in overlay])
        found += semantic.check(osrc, merged, templates, kinds).problems
        for p in found:
            if (p.line, p.col, p.message) not in seen:
                out.append(replace(p, message=f"in environment {name}: {p.message}"))
    return out
