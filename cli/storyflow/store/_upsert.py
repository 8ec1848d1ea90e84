"""Writing many records in one transaction with few statements: the checkpoint path.

diskcache's ``Cache.set`` runs a ``SELECT`` and then an ``UPDATE`` or ``INSERT`` per key
(it must find a replaced value's file to remove it). A flush of the journal writes a
few step records at once, so `put_many` asks for the old files of the whole batch in
one ``SELECT`` and writes every row with one ``executemany`` of an upsert — the same
rows, columns and triggers as ``Cache.set`` (no expiry, no tag), in the same
transaction. A value large enough for a file of its own is stored by diskcache's own
`Disk`, and a replaced file is removed after the commit, as ``Cache.set`` does.

This module reaches into diskcache's ``_sql`` and ``_disk``; it is part of the store
package, which owns diskcache, and tests/test_store.py holds that records written here
read back through diskcache's public API.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import diskcache

_UPSERT = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
    " size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, NULL, ?, ?, ?, ?)"
    " ON CONFLICT(key, raw) DO UPDATE SET store_time = excluded.store_time,"
    " expire_time = NULL, access_time = excluded.access_time, access_count = 0,"
    " tag = NULL, size = excluded.size, mode = excluded.mode,"
    " filename = excluded.filename, value = excluded.value"
)


def put_many(cache: diskcache.Cache, items: Iterable[tuple[str, Any]]) -> None:
    """Set each ``(key, value)`` (text keys) in one transaction."""
    disk = cache._disk
    now = time.time()
    rows = []
    keys = []
    for key, value in items:
        size, mode, filename, db_value = disk.store(value, False, key=key)
        rows.append((key, now, now, size, mode, filename, db_value))
        keys.append(key)
    if not rows:
        return
    old: list[str] = []
    with cache.transact():
        sql = cache._sql
        marks = ",".join("?" * len(keys))
        old = [name for (name,) in sql(
            f"SELECT filename FROM Cache WHERE raw = 1 AND filename IS NOT NULL"
            f" AND key IN ({marks})", keys).fetchall()]
        cache._con.executemany(_UPSERT, rows)
    for name in old:  # replaced values' files, once the rows no longer name them
        disk.remove(name)
