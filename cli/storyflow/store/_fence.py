"""The fence around diskcache and sqlite3: their errors become `StoreError` here.

A value that is stored but does not decode (a damaged pickle, a value file cut short)
is not an error of the store as a whole: `read_value` returns it as `Undecodable`, so
each reader can name the damaged record and go on with the rest.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Any

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
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        # SQLITE_CORRUPT, SQLITE_NOTADB: the database file itself is damaged.
        return StoreError(
            f"the store at {root} is damaged: cannot {action}: {exc}",
            hint=f"`storyflow doctor` checks it; the run folders under {root / 'runs'} keep "
            f"each run's event log; move {root / 'db'} aside to start a fresh store",
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


class Undecodable:
    """A value the store holds under a key but cannot decode."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason
        """Why, in a few words: ``it does not decode: UnpicklingError: ...``."""

    def __repr__(self) -> str:
        return f"Undecodable({self.reason!r})"


def read_value(cache: diskcache.Cache, key: str) -> Any:
    """The value under ``key``: None when there is none, `Undecodable` when it does not
    decode or the database page that holds it is damaged. The storage engine's other
    errors (busy, permissions, I/O) propagate, for a `Fence` to translate."""
    try:
        return cache.get(key)
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):
            raise
        return Undecodable(f"the database page holding it is damaged: {exc}")
    except FOREIGN_ERRORS:
        raise
    except Exception as exc:  # unpickling damaged bytes can raise almost anything
        return Undecodable(f"it does not decode: {short_reason(exc)}")


def short_reason(exc: BaseException, width: int = 80) -> str:
    """``Type: message``, cut to ``width`` characters."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= width else text[: width - 3] + "..."
