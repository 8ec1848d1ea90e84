"""The fence around diskcache and sqlite3: their errors become `StoreError` here."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType

import diskcache

from storyflow.errors import StoreError

FOREIGN_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, diskcache.Timeout, OSError)
"""What the storage engine raises; caught at the fence and translated."""


def translate(exc: BaseException, root: Path, action: str) -> StoreError:
    """Map a storage-engine exception to the `StoreError` a user sees."""
    if isinstance(exc, diskcache.Timeout) or "locked" in str(exc):
        return StoreError(
            f"the store at {root} is busy ({action})",
            hint="another storyflow process is writing to it; try again",
        )
    if isinstance(exc, PermissionError):
        return StoreError(
            f"cannot {action}: permission denied at {root}",
            hint="check the owner and mode of the state directory (--state-dir)",
        )
    return StoreError(
        f"cannot {action} at {root}: {exc}",
        hint="check the state directory (--state-dir); `storyflow doctor` can help",
    )


class Fence:
    """Context manager translating storage errors raised inside it into `StoreError`."""

    __slots__ = ("action", "root")

    def __init__(self, root: Path, action: str) -> None:
        self.root = root
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, FOREIGN_ERRORS):
            raise translate(exc, self.root, self.action) from exc
