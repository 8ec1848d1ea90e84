"""The store's health, for `storyflow doctor`: the database file, every record, and
the runs whose records are lost.

Three findings, each ``ok``, ``warn`` or ``fail`` with a fix:

- ``store database``: SQLite's ``PRAGMA integrity_check`` and diskcache's check of the
  files that hold large values (through `diskcache.Cache.check`, which fixes nothing);
- ``store records``: every run and step record read back and checked for its shape,
  the caches' entries decoded — for up to ``budget_s`` seconds, then a note says how
  far it got;
- ``store run folders``: each run folder (``runs/<id>/``) has a record, and the run
  index lists every run.

It reads only; what it finds is repaired elsewhere or not at all (a damaged cache entry
is dropped when next used, a damaged step runs again on `resume`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache

from storyflow.errors import StoreError
from storyflow.store._damage import Damage, decode_run, decode_step, run_folders
from storyflow.store._fence import FOREIGN_ERRORS, Fence, Undecodable, read_value, short_reason

_SHOWN = 5
"""Damaged records named in a finding's detail; the rest are counted."""
_CACHE_PREFIXES = ("cache:", "parsed:", "valid:", "lease:")
_HARMLESS = (diskcache.core.UnknownFileWarning, diskcache.core.EmptyDirWarning)
_RECOVER = (
    "the database is damaged: copy the state directory first, then try "
    "`sqlite3 db/cache.db .recover`, or move db/ aside to start a fresh store "
    "(the run folders keep their event logs)"
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of what the store's check found."""

    check: str
    """What was checked: ``store database``, ``store records``, ``store run folders``."""
    status: str
    """``ok``, ``warn`` or ``fail``."""
    detail: str
    """What was found."""
    fix: str = ""
    """What to do about it; empty when nothing is needed."""


@dataclass(slots=True)
class _Scan:
    runs: set[str] = field(default_factory=set)
    steps: int = 0
    entries: int = 0
    read: int = 0
    damaged: list[Damage] = field(default_factory=list)
    bad_entries: list[str] = field(default_factory=list)
    complete: bool = True
    error: str | None = None
    """Why reading stopped before the end (a damaged page of the key index), if it did."""


def check_integrity(
    cache: diskcache.Cache,
    root: Path,
    index: list[list[Any]] | None,
    *,
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[Finding]:
    """The store's findings; ``index`` is the stored run index, None when damaged."""
    started = clock()
    try:
        with Fence(root, "check the store's database"):
            database = _database(cache)
    except StoreError as exc:  # the damage is there before any check can run
        database = Finding("store database", "fail", exc.message, _RECOVER)
    scan = _scan(cache, started + budget_s, clock)
    if scan.error is not None:
        return [database, _records(scan, clock() - started, budget_s)]
    with Fence(root, "read the store's records"):
        indexed = set(scan.runs if index is None else (run_id for _, run_id in index))
        gone = sorted(r for r in indexed if r not in scan.runs and f"run:{r}" not in cache)
        unindexed = sorted(scan.runs.difference(indexed)) if scan.complete else []
        lost = [n for n in run_folders(root)
                if n not in scan.runs and n not in indexed and f"run:{n}" not in cache]
    scan.damaged += [Damage(r, None, "the run index lists it, but its record is gone")
                     for r in gone]
    return [database, _records(scan, clock() - started, budget_s),
            _folders(root, lost, unindexed, index_damaged=index is None)]


def _database(cache: diskcache.Cache) -> Finding:
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # each problem once, and never raised as an error
        found = cache.check(fix=False)
    problems = [" ".join(str(w.message).split()) for w in found
                if not issubclass(w.category, _HARMLESS)
                and not str(w.message).startswith("Settings.")]  # counters, not data
    if not problems:
        return Finding("store database", "ok", "SQLite integrity_check: ok; value files: ok")
    more = f" (+{len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return Finding("store database", "fail", "; ".join(problems[:_SHOWN]) + more, _RECOVER)


def _scan(cache: diskcache.Cache, deadline: float, clock: Callable[[], float]) -> _Scan:
    """Read back every record, in key order, until ``deadline``."""
    scan = _Scan()
    try:
        _read_all(cache, deadline, clock, scan)
    except FOREIGN_ERRORS as exc:
        scan.complete = False
        scan.error = short_reason(exc)
    return scan


def _read_all(
    cache: diskcache.Cache, deadline: float, clock: Callable[[], float], scan: _Scan
) -> None:
    for key in cache.iterkeys():
        if scan.read % 256 == 0 and scan.read and clock() > deadline:
            scan.complete = False
            break
        if not isinstance(key, str):
            continue
        scan.read += 1
        if key.startswith("run:"):
            run_id = key[len("run:"):]
            scan.runs.add(run_id)
            found: Any = decode_run(run_id, read_value(cache, key))
        elif key.startswith("step:"):
            run_id, _, instance_id = key[len("step:"):].partition(":")
            scan.steps += 1
            found = decode_step(run_id, instance_id, read_value(cache, key))
        elif key.startswith(_CACHE_PREFIXES):
            scan.entries += 1
            if isinstance(read_value(cache, key), Undecodable):
                scan.bad_entries.append(key)
            continue
        else:
            continue
        if isinstance(found, Damage):
            scan.damaged.append(found)


def _records(scan: _Scan, took_s: float, budget_s: float) -> Finding:
    what = (f"{len(scan.runs):,} run records, {scan.steps:,} step records and "
            f"{scan.entries:,} cache entries")
    if scan.error is not None:
        found = "; ".join(d.describe() for d in scan.damaged[:_SHOWN])
        return Finding(
            "store records", "fail",
            f"reading stopped after {scan.read:,} records: {scan.error}"
            + (f"; damaged before that: {found}" if found else ""),
            _RECOVER,
        )
    if scan.damaged:
        named = "; ".join(d.describe() for d in scan.damaged[:_SHOWN])
        more = f" (+{len(scan.damaged) - _SHOWN} more)" if len(scan.damaged) > _SHOWN else ""
        return Finding(
            "store records", "fail", f"{len(scan.damaged)} damaged: {named}{more}",
            "`storyflow show RUN` marks a damaged step and `storyflow resume RUN` runs it "
            "again; a run whose own record is damaged cannot be shown or resumed, but its "
            "event log survives (runs/<id>/events.jsonl)",
        )
    if scan.bad_entries:
        return Finding(
            "store records", "warn",
            f"{len(scan.bad_entries)} cache entries do not decode "
            f"({', '.join(k.partition(':')[0] for k in scan.bad_entries[:_SHOWN])}); "
            f"{what} read back",
            "nothing to do: a damaged cache entry is dropped when next used",
        )
    if not scan.complete:
        return Finding(
            "store records", "warn",
            f"read back {what} in {budget_s:.0f} s, then stopped: the rest is not checked",
            "nothing damaged so far; `storyflow runs` and `show` still name any damaged "
            "record they meet",
        )
    return Finding("store records", "ok", f"{what}: all read back ({took_s:.1f} s)")


def _folders(root: Path, lost: list[str], unindexed: list[str], *,
             index_damaged: bool) -> Finding:
    if lost:
        named = ", ".join(lost[:_SHOWN]) + (
            f" (+{len(lost) - _SHOWN} more)" if len(lost) > _SHOWN else "")
        return Finding(
            "store run folders", "fail",
            f"the store lost the records of {len(lost)} run{'s' if len(lost) != 1 else ''}"
            f" whose folders survive: {named}",
            f"the database ({root / 'db'}) was emptied, deleted or replaced: those runs "
            "cannot be shown or resumed; their event logs (runs/<id>/events.jsonl) can be "
            "read; restore db/ from a backup if there is one",
        )
    if index_damaged:
        return Finding(
            "store run folders", "warn", "the run index (meta:runs) is damaged",
            "nothing to do: runs are listed from their records, and the next new run "
            "saves a new index",
        )
    if unindexed:
        return Finding(
            "store run folders", "warn",
            f"the run index misses {len(unindexed)} run(s): {', '.join(unindexed[:_SHOWN])}",
            "`storyflow runs` still lists those whose folder survives, and `storyflow show "
            "ID` reads any of them by its full id",
        )
    return Finding("store run folders", "ok", "every run folder has its record")
