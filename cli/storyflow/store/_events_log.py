"""The run's event log: one JSON object per line, appended as things happen.

Writes are flushed after each line but never fsynced: the log is for people and
tools to read, the store is the source of truth. A crash may tear the last line;
readers skip any line that is not a whole JSON object.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from storyflow.store._closing import Closing

_FILE_MODE = 0o600


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, _FILE_MODE)


def _encode(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)


def _decode(line: bytes) -> dict[str, Any] | None:
    """The event on one line, or None for a torn or corrupt line."""
    try:
        event = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        return None
    return event if isinstance(event, dict) else None


class EventLog(Closing):
    """Appends events to a run's log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        """The log file; created 0600 if missing."""
        self._file: IO[str] = open(path, "a", encoding="utf-8", opener=_private_opener)
        if self._file.tell() > 0 and not _ends_with_newline(path):
            self._file.write("\n")  # end a line torn by a crash, so ours start clean

    def write(self, event: dict[str, Any]) -> None:
        """Append one event as one line."""
        self._file.write(_encode(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Every event in the log, in order; torn or corrupt lines are skipped."""
    with path.open("rb") as f:
        for line in f:
            event = _decode(line)
            if event is not None:
                yield event


def follow_events(
    path: Path,
    *,
    poll_s: float = 0.2,
    stop: Callable[[], bool],
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Like ``tail -f``: yield events as lines are appended, from the start of the file.

    Ends once `stop()` is true and everything written before that has been read.
    The file may not exist yet; it is waited for.
    """
    pending = b""  # a line still being written
    f: IO[bytes] | None = None
    try:
        while True:
            stopping = stop()  # read before draining, so nothing written earlier is missed
            if f is None and path.exists():
                f = path.open("rb")
            if f is not None:
                for chunk in iter(f.readline, b""):
                    pending += chunk
                    if pending.endswith(b"\n"):
                        event = _decode(pending)
                        pending = b""
                        if event is not None:
                            yield event
            if stopping:
                event = _decode(pending) if pending else None
                if event is not None:
                    yield event
                return
            sleep(poll_s)
    finally:
        if f is not None:
            f.close()
