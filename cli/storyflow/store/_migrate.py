"""Store migrations, and the transactions that make a migration (or a `gc`) all or nothing.

`upgrade` runs every migration a store needs, from its format to `STORE_FORMAT`, then
writes the new format; `Store` calls it inside one `atomic` transaction. An error or a
crash (kill -9, power loss) half way leaves the store exactly as it was: the release that
wrote it still reads it, and the next open migrates it again. A migration says nothing
to the user, however long it takes: the store package does not talk to the terminal,
and a migration is once per store (20,000 step records take about a second).

Each migration is frozen: it names the keys and fields of the formats it converts
between, never today's key functions, so a later change of the scheme cannot change
what an old migration does.

Why `atomic` and not diskcache's ``transact`` alone: diskcache keeps a value whose pickle
is 32 KB or more (``disk_min_file_size``) in a file of its own, and when a ``set`` or
``delete`` replaces such a value inside an enclosing transaction, it removes the old file
as soon as that one call is done — before the transaction commits. Rolled back, the row
names a file that is gone, and diskcache reads a missing file as "no value": the record
would vanish without a word. `TransactDisk` holds those removals back until the
outermost `atomic` block has committed, and removes instead the files written by a
block that rolled back (a crash can leave such a file behind: unreferenced, harmless).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache

from storyflow.errors import StoreError, StoryflowError
from storyflow.store._fence import FOREIGN_ERRORS, read_value, short_reason

# --- Transactions that roll back whole ---------------------------------------------


@dataclass(slots=True)
class _Pending:
    written: list[str] = field(default_factory=list)
    """Value files written inside the transaction: garbage if it rolls back."""
    removed: list[str] = field(default_factory=list)
    """Value files of replaced or deleted values: removed once it commits."""


class TransactDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's `Disk`, whose value-file removals wait for `atomic` to commit."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self._local = threading.local()  # diskcache transactions are per thread

    def pending(self) -> _Pending | None:
        """This thread's open `atomic` block, if any."""
        found: _Pending | None = getattr(self._local, "pending", None)
        return found

    def store(self, value: Any, read: bool, key: Any = diskcache.UNKNOWN) -> Any:
        stored = super().store(value, read, key=key)
        pending = self.pending()
        if pending is not None and stored[2] is not None:
            pending.written.append(stored[2])
        return stored

    def remove(self, file_path: str) -> None:
        pending = self.pending()
        if pending is not None:
            pending.removed.append(file_path)
        else:
            super().remove(file_path)


@contextmanager
def atomic(cache: diskcache.Cache) -> Iterator[None]:
    """One SQLite transaction (diskcache's ``transact``) that commits or rolls back
    whole, value files included (see the module docstring). Nested blocks join the
    outermost one."""
    disk = cache.disk
    if not isinstance(disk, TransactDisk) or disk.pending() is not None:
        with cache.transact():
            yield
        return
    pending = _Pending()
    disk._local.pending = pending
    body_done = False
    try:
        with cache.transact():
            yield
            body_done = True
    except BaseException:
        disk._local.pending = None
        if not body_done:  # rolled back: what it wrote is referenced by nothing
            for name in pending.written:
                diskcache.Disk.remove(disk, name)
        # (a COMMIT that failed leaves the files: a leak at worst, never a loss)
        raise
    disk._local.pending = None
    for name in pending.removed:
        diskcache.Disk.remove(disk, name)


def keys_with_prefix(cache: diskcache.Cache, prefix: str) -> list[str]:
    """Every string key starting with ``prefix``, in key order: one range query on
    diskcache's ``Cache(key, raw)`` index, not a walk over the whole store."""
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    rows = cache._sql(
        "SELECT key FROM Cache WHERE key >= ? AND key < ? AND raw = 1 ORDER BY key",
        (prefix, upper),
    ).fetchall()
    return [key for (key,) in rows if isinstance(key, str)]


def stored_bytes(cache: diskcache.Cache, prefix: str, *, exact: bool = False) -> int:
    """What the values under the keys starting with ``prefix`` (``exact``: under that
    one key) take, in the database and in value files."""
    upper = prefix if exact else prefix[:-1] + chr(ord(prefix[-1]) + 1)
    ((total,),) = cache._sql(
        "SELECT SUM(COALESCE(LENGTH(value), 0) + COALESCE(size, 0)) FROM Cache"
        f" WHERE key >= ? AND key {'<=' if exact else '<'} ? AND raw = 1",
        (prefix, upper),
    ).fetchall()
    return int(total or 0)


# --- Migrations ---------------------------------------------------------------------

FORMAT_KEY = "meta:format"
"""Where every release finds the store's format: it never moves."""


def upgrade(
    cache: diskcache.Cache,
    found: int,
    target: int,
    migrations: dict[int, Callable[[diskcache.Cache], None]],
    root: Path,
) -> None:
    """Migrate a store of format ``found`` to ``target`` and record it; to be called
    inside one `atomic` block, which an error here rolls back."""
    version = found
    while version < target:
        migrate = migrations.get(version)
        if migrate is None:
            raise StoreError(
                f"the store at {root} has format {version}, which this storyflow cannot migrate",
                hint="use another --state-dir",
            )
        try:
            migrate(cache)
        except StoryflowError:
            raise
        except FOREIGN_ERRORS:
            raise  # the caller's fence translates them
        except Exception as exc:
            raise StoreError(
                f"cannot migrate the store at {root} from format {version} to "
                f"{version + 1}: {short_reason(exc)}",
                hint=f"the store is unchanged (format {found}): the storyflow that wrote "
                f"it still reads it; run again with --debug for a traceback, and report it",
            ) from exc
        version += 1
    cache.set(FORMAT_KEY, target)


_RUN_FIELDS_2 = ("forked_from", "fork")
_STEP_FIELDS_2 = ("request", "forked_from")
_DERIVED_1 = ("valid:", "parsed:")


def migrate_1_to_2(cache: diskcache.Cache) -> None:
    """Format 1 → 2 (`storyflow fork`, `replay`): every run record gains ``forked_from``
    and ``fork``, every step record ``request`` and ``forked_from``, all null — a
    format-2 reader finds every field it knows in every record. The caches of workflow
    files (``valid:``, ``parsed:``) are dropped: they are verdicts of the release that
    wrote them, rebuilt by this one on the next load. A record that does not read back
    is left as it is: readers name it, never misread it."""
    for key in keys_with_prefix(cache, "run:"):
        _add_fields(cache, key, _RUN_FIELDS_2)
    for key in keys_with_prefix(cache, "step:"):
        _add_fields(cache, key, _STEP_FIELDS_2)
    for prefix in _DERIVED_1:
        for key in keys_with_prefix(cache, prefix):
            cache.delete(key)


def _add_fields(cache: diskcache.Cache, key: str, names: tuple[str, ...]) -> None:
    """Give the record under ``key`` the fields it lacks, null, before its ``meta`` (where
    the release that has them writes them)."""
    record = read_value(cache, key)
    if not isinstance(record, dict) or all(name in record for name in names):
        return
    added = {name: None for name in names if name not in record}
    out: dict[Any, Any] = {}
    for name, value in record.items():
        if name == "meta":
            out.update(added)
            added = {}
        out[name] = value
    out.update(added)
    cache.set(key, out)
