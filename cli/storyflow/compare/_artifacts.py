"""The files of two run folders, compared file by file.

A run folder holds the run's event log (``events.jsonl``, left out: its ids and times
always differ; so is ``events.jsonl.before-gc``, the earlier log `gc` put back beside a
newer one) and its artifacts. Hidden files (a name starting with ``.``, at any
depth) and anything that is not a regular file (symlinks included) are left out.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from storyflow.compare._model import ArtifactDiff, Pair
from storyflow.compare._words import text_diff

EVENT_LOG = "events.jsonl"
_LOGS = frozenset({EVENT_LOG, EVENT_LOG + ".before-gc"})
MAX_TEXT_BYTES = 1_000_000
"""A file larger than this is compared by content, but not shown or diffed."""


def artifact_files(folder: Path) -> dict[str, Path]:
    """The artifacts under ``folder``: their names (``/``-separated paths) → paths."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(root)
        for name in files:
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if name.startswith(".") or rel in _LOGS:
                continue
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    continue
            except OSError:
                continue
            found[rel] = path
    return found


def compare_folders(folder_a: Path, folder_b: Path) -> tuple[ArtifactDiff, ...]:
    """Every artifact of either folder, by name: same, changed, only in A or only in B."""
    files_a, files_b = artifact_files(folder_a), artifact_files(folder_b)
    out = []
    for name in sorted(files_a.keys() | files_b.keys()):
        a, b = _File.read(files_a.get(name)), _File.read(files_b.get(name))
        if a is None or b is None:
            change = "only_b" if a is None else "only_a"
        else:
            change = "same" if a.digest == b.digest and a.digest is not None else "changed"
        diff = None
        if change == "changed" and a is not None and b is not None and (
                a.text is not None and b.text is not None):
            diff = text_diff(a.text, b.text)
        out.append(ArtifactDiff(
            name=name, change=change,
            size=Pair(a.size if a else None, b.size if b else None),
            text=Pair(a.text if a else None, b.text if b else None), diff=diff))
    return tuple(out)


class _File:
    """What is read of one artifact: size, content hash, and its text when small."""

    __slots__ = ("digest", "size", "text")

    def __init__(self, size: int | None, digest: str | None, text: str | None) -> None:
        self.size = size
        self.digest = digest
        self.text = text

    @classmethod
    def read(cls, path: Path | None) -> _File | None:
        if path is None:
            return None
        try:
            with path.open("rb") as f:
                head = f.read(MAX_TEXT_BYTES + 1)
                h = hashlib.sha256(head)
                size = len(head)
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                    size += len(chunk)
        except OSError:  # unreadable: listed, never equal
            return cls(None, None, None)
        text = None
        if size <= MAX_TEXT_BYTES and b"\0" not in head:
            try:
                text = head.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        return cls(size, h.hexdigest(), text)
