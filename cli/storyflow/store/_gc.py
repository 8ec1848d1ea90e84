"""`storyflow gc`: which old runs go, and their removal, crash-safe.

A run goes whole: its record, its step records (``step:<id>:*``, found by a key range),
its lease, its entry in the run index and its folder — with its sub-workflow runs
(``<id>.<step>``), which never go alone. Then the output-cache entries (``cache:*``, the
call cache's ``cache:call-*`` too) whose run no longer exists go.

Never removed: a run a live process holds (or a ``running`` run so new that its
process has not taken its lease yet), a run a kept run was forked or replayed from
(``forked_from``, transitively: a kept fork keeps its whole lineage), and the newest run
of each workflow. A run whose process is gone is not live. Damaged records, runs whose
record is lost and sub-workflow runs whose top-level run is gone are left alone. An
output-cache entry a kept run's step came from (``cached``, its fingerprint) stays too.

One `gc` at a time removes runs from a store: it holds the store's gc lease
(`GC_LEASE_KEY`, a lease like a run's); another one meanwhile is refused.

Each run is removed in three moves, so that a crash at any point leaves its records
whole or gone — never half of them, and never a folder in ``runs/`` without a record
(``runs`` would call it lost): its folders are renamed into ``<state dir>/trash/``; one
transaction (`atomic`) removes its records, after checking inside it that no process
took the run meanwhile (if one did, the folders go back); then the folders are deleted
from the trash. The next `gc` finishes what a crash left there: a folder whose run still
has a record goes back to ``runs/``, the others are deleted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storyflow.errors import RunHeldError, StoreError
from storyflow.store._damage import index_ok
from storyflow.store._fence import Fence, read_value
from storyflow.store._lease import LEASE_TTL_S, Lease, acquire, read_holder
from storyflow.store._migrate import atomic, keys_with_prefix, stored_bytes
from storyflow.store._records import RunRecord
from storyflow.store._store import RUN_INDEX_KEY, Store, lease_key, run_key

TRASH = "trash"
"""The folder of the state directory where run folders wait for their records to go."""
_CACHE_BATCH = 500
"""Cache entries removed per transaction."""
GC_LEASE_KEY = "meta:gc"
"""The lease a `gc` removing runs holds: ``{"pid", "host", "token", "heartbeat"}``."""
GC_LEASE_TTL_S = 600.0
"""A gc on another host that has not renewed its lease for this long is dead (on this
host, whether its process exists decides)."""
_OK = ("succeeded", "cached")


@dataclass(frozen=True, slots=True)
class GcRun:
    """A top-level run that goes (or would go), with its sub-workflow runs."""

    run_id: str
    """The run's id."""
    workflow: str
    """Its workflow's name."""
    status: str
    """Its `RunStatus` value."""
    created_at: float
    """Epoch seconds when it was created."""
    last_active: float
    """Epoch seconds when it (or one of its sub-workflow runs) last changed: its age."""
    children: tuple[str, ...]
    """Its sub-workflow runs, which go with it."""
    step_records: int
    """Step records of the run and its sub-workflow runs."""
    bytes: int
    """What its records and folders take."""


@dataclass(frozen=True, slots=True)
class Spared:
    """A run the rule (``--keep``, ``--older-than``) would remove, kept for a reason."""

    run_id: str
    """The run's id."""
    workflow: str
    """Its workflow's name."""
    reason: str
    """``live``, ``forked`` or ``newest``."""
    detail: str
    """For people: ``held by process 123 on host``, ``RUN was forked from it``..."""


@dataclass(slots=True)
class GcReport:
    """What `Store.gc` removed, or would remove with ``dry_run``."""

    dry_run: bool
    """True when nothing was removed."""
    runs: list[GcRun] = field(default_factory=list)
    """The top-level runs removed, newest first."""
    spared: list[Spared] = field(default_factory=list)
    """Runs the rule picked but that stay, newest first."""
    cache_entries: int = 0
    """Output-cache entries removed: their run no longer exists."""
    cache_bytes: int = 0
    """What those entries took."""
    recovered: list[str] = field(default_factory=list)
    """Run folders a crashed `gc` left in the trash, put back or deleted now."""
    damaged: list[str] = field(default_factory=list)
    """Run records that do not read back, left alone: what each one is (`Damage`)."""

    @property
    def step_records(self) -> int:
        return sum(r.step_records for r in self.runs)

    @property
    def child_runs(self) -> int:
        return sum(len(r.children) for r in self.runs)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.runs) + self.cache_bytes


def collect(
    store: Store, *, keep: int | None, older_than_s: float | None, dry_run: bool
) -> GcReport:
    """Remove (or with ``dry_run`` only list) the runs the rule picks — the newest
    ``keep`` top-level runs stay, or those changed within ``older_than_s`` seconds —
    except those that must stay, then the cache entries no run refers to. Removing
    holds the store's gc lease: `StoreError` while another gc holds it."""
    if dry_run:
        return _collect(store, keep=keep, older_than_s=older_than_s, lease=None)
    try:
        lease = acquire(store._cache, GC_LEASE_KEY, "gc", ttl_s=GC_LEASE_TTL_S,
                        clock=store.clock, root=store.root)
    except RunHeldError:
        holder = read_holder(store._cache, GC_LEASE_KEY, now=store.clock(),
                             ttl_s=GC_LEASE_TTL_S, root=store.root)
        who = "" if holder is None else f" (process {holder.pid} on {holder.host})"
        raise StoreError(
            f"another storyflow gc{who} is removing runs from the store at {store.root}",
            hint="wait for it to finish, then run gc again if there is more to remove",
        ) from None
    try:
        with lease:
            return _collect(store, keep=keep, older_than_s=older_than_s, lease=lease)
    except RunHeldError as exc:  # stalled past its lease, and another gc took over
        raise StoreError(f"gc stopped: {exc.message}",
                         hint="what it removed so far is whole; run gc again") from exc


def _collect(
    store: Store, *, keep: int | None, older_than_s: float | None, lease: Lease | None
) -> GcReport:
    """`collect`'s work; a dry run without ``lease``."""
    dry_run = lease is None
    report = GcReport(dry_run=dry_run)
    if not dry_run:
        report.recovered = _recover_trash(store)
    now = store.clock()
    listing = store.read_runs()
    records = listing.records  # newest first; damaged records are left alone
    report.damaged = [d.describe() for d in listing.damaged]
    by_id = {r.run_id: r for r in records}
    families: dict[str, list[RunRecord]] = {}
    for rec in records:
        top = _top(rec, by_id)
        if top is not None:
            families.setdefault(top.run_id, []).append(rec)
    tops = [r for r in records if r.parent_run is None]
    picked = _picked(tops, families, keep=keep, older_than_s=older_than_s, now=now)
    spared = _spared(store, tops, picked, families, by_id, now=now)
    for top in tops:  # newest first: a fork comes before the runs it was made from
        if top.run_id not in picked or top.run_id in spared:
            continue
        family = families[top.run_id]
        gone = _measure(store, top, family)
        if lease is not None:  # removing, not a dry run
            lease.heartbeat()
            # The top-level run first: `_remove` checks its lease (children have none).
            ids = [top.run_id, *(r.run_id for r in family if r.run_id != top.run_id)]
            if not _remove(store, ids):
                spared[top.run_id] = Spared(top.run_id, top.workflow, "live",
                                            "a process took it while gc ran")
                _keep_lineage([top.run_id], spared, picked, families, by_id)
                continue
        report.runs.append(gone)
    report.spared = list(spared.values())
    removed = {rid for r in report.runs for rid in (r.run_id, *r.children)}
    report.cache_entries, report.cache_bytes = _drop_unreferenced(store, removed, dry_run)
    if not dry_run:
        try:
            (store.root / TRASH).rmdir()  # only when empty: nothing is left to finish
        except OSError:
            pass
    return report


def _top(rec: RunRecord, by_id: dict[str, RunRecord]) -> RunRecord | None:
    """The top-level run ``rec`` belongs to; None when a parent's record is missing."""
    seen = {rec.run_id}
    while rec.parent_run is not None:
        parent = by_id.get(rec.parent_run)
        if parent is None or parent.run_id in seen:
            return None
        seen.add(parent.run_id)
        rec = parent
    return rec


def _last_active(family: list[RunRecord]) -> float:
    return max(max(r.created_at, r.updated_at, r.ended_at or 0.0) for r in family)


def _picked(
    tops: list[RunRecord],
    families: dict[str, list[RunRecord]],
    *,
    keep: int | None,
    older_than_s: float | None,
    now: float,
) -> set[str]:
    """The top-level runs the rule alone would remove."""
    if keep is not None:
        return {r.run_id for r in tops[keep:]}
    assert older_than_s is not None
    return {r.run_id for r in tops if now - _last_active(families[r.run_id]) > older_than_s}


def _spared(
    store: Store,
    tops: list[RunRecord],
    picked: set[str],
    families: dict[str, list[RunRecord]],
    by_id: dict[str, RunRecord],
    *,
    now: float,
) -> dict[str, Spared]:
    """The picked runs that stay, and why: live, newest of their workflow, or a kept
    run's lineage (computed last, over everything kept)."""
    spared: dict[str, Spared] = {}
    newest: set[str] = set()
    for top in tops:  # newest first
        if top.workflow in newest:
            continue
        newest.add(top.workflow)
        if top.run_id in picked:
            spared[top.run_id] = Spared(top.run_id, top.workflow, "newest",
                                        "the newest run of its workflow")
    for top in tops:
        if top.run_id in picked and top.run_id not in spared:
            live = _live(store, top, now)
            if live is not None:
                spared[top.run_id] = Spared(top.run_id, top.workflow, "live", live)
    kept = [t.run_id for t in tops if t.run_id not in picked or t.run_id in spared]
    _keep_lineage(kept, spared, picked, families, by_id)
    return {t.run_id: spared[t.run_id] for t in tops if t.run_id in spared}


def _keep_lineage(
    kept: list[str],
    spared: dict[str, Spared],
    picked: set[str],
    families: dict[str, list[RunRecord]],
    by_id: dict[str, RunRecord],
) -> None:
    """Spare the picked runs that the ``kept`` runs (or their sub-workflow runs) were
    forked or replayed from, and theirs in turn."""
    todo = list(kept)
    while todo:
        run_id = todo.pop()
        for rec in families.get(run_id, []):
            origin = by_id.get(rec.forked_from) if rec.forked_from else None
            parent = None if origin is None else _top(origin, by_id)
            if parent is not None and parent.run_id in picked and parent.run_id not in spared:
                spared[parent.run_id] = Spared(parent.run_id, parent.workflow, "forked",
                                               f"{rec.run_id} was forked from it")
                todo.append(parent.run_id)


def _live(store: Store, top: RunRecord, now: float) -> str | None:
    """Why the run counts as live, or None: a live process holds it, or it is a
    ``running`` run whose process has not taken its lease yet."""
    holder = store.holder(top.run_id)
    if holder is not None and holder.alive:
        return f"held by process {holder.pid} on {holder.host}"
    if holder is None and top.status == "running" and now - top.updated_at < LEASE_TTL_S:
        return "just started"
    return None


def _measure(store: Store, top: RunRecord, family: list[RunRecord]) -> GcRun:
    cache = store._cache
    steps = size = 0
    with Fence(store.root, "measure old runs"):
        for rec in family:
            prefix = f"step:{rec.run_id}:"  # format 2's step key, see _store.step_key
            steps += len(keys_with_prefix(cache, prefix))
            size += stored_bytes(cache, prefix) + stored_bytes(cache, run_key(rec.run_id),
                                                                exact=True)
            size += _folder_bytes(store.root / "runs" / rec.run_id)
    return GcRun(
        run_id=top.run_id, workflow=top.workflow, status=top.status,
        created_at=top.created_at, last_active=_last_active(family),
        children=tuple(sorted(r.run_id for r in family if r.run_id != top.run_id)),
        step_records=steps, bytes=size,
    )


def _folder_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


class _TakenMeanwhile(Exception):
    """A live process took the run between the check and the removal."""


def _remove(store: Store, run_ids: list[str]) -> bool:
    """Remove the runs (a top-level run and its sub-workflow runs) whole; False when a
    live process holds the top-level run (``run_ids[0]``) after all: nothing changes."""
    cache, runs, trash = store._cache, store.root / "runs", store.root / TRASH
    moved: list[str] = []
    with Fence(store.root, f"remove run {run_ids[0]}"):
        trash.mkdir(mode=0o700, exist_ok=True)
        try:
            for run_id in reversed(run_ids):  # sub-workflow runs first
                if (runs / run_id).is_dir():
                    shutil.rmtree(trash / run_id, ignore_errors=True)  # an older leftover
                    os.rename(runs / run_id, trash / run_id)
                    moved.append(run_id)
            with atomic(cache):
                holder = store.holder(run_ids[0])
                if holder is not None and holder.alive:
                    raise _TakenMeanwhile
                for run_id in run_ids:
                    for key in keys_with_prefix(cache, f"step:{run_id}:"):
                        cache.delete(key)
                    cache.delete(run_key(run_id))
                    cache.delete(lease_key(run_id))
                index = read_value(cache, RUN_INDEX_KEY)
                if index_ok(index):
                    gone = set(run_ids)
                    cache.set(RUN_INDEX_KEY, [e for e in index if e[1] not in gone])
        except BaseException as exc:
            for run_id in moved:  # the records stay: so do the folders (a resume that
                _put_back(trash / run_id, runs / run_id)  # took the run may have made one)
            if isinstance(exc, _TakenMeanwhile):
                return False
            raise
        for run_id in moved:
            shutil.rmtree(trash / run_id, ignore_errors=True)
    return True


def _recover_trash(store: Store) -> list[str]:
    """Finish what a crashed `gc` left in the trash: a folder whose run still has a
    record goes back to ``runs/``, the others are deleted. Their names."""
    trash = store.root / TRASH
    if not trash.is_dir():
        return []
    found: list[str] = []
    with Fence(store.root, "empty the trash"):
        for entry in sorted(trash.iterdir()):
            found.append(entry.name)
            if run_key(entry.name) in store._cache:
                _put_back(entry, store.root / "runs" / entry.name)
            else:
                shutil.rmtree(entry, ignore_errors=True)
    return found


def _put_back(entry: Path, home: Path) -> None:
    """Return a run's folder from the trash. A command may have made the run a new
    folder meanwhile (``logs`` does, ``resume`` writes to it): what it holds stays, and
    what the trash holds under the same name comes back as ``<name>.before-gc``."""
    if not home.exists():
        os.rename(entry, home)
        return
    for item in sorted(entry.iterdir()):
        target = home / item.name
        os.rename(item, target if not target.exists() else home / f"{item.name}.before-gc")
    shutil.rmtree(entry, ignore_errors=True)


def _drop_unreferenced(store: Store, removed: set[str], dry_run: bool) -> tuple[int, int]:
    """Remove the cache entries whose run has no record (with ``dry_run``, once
    ``removed`` is gone) and that no remaining run's step came from; how many went (or
    would), and what they took. Damaged entries are left: the cache replaces them when
    next used."""
    cache = store._cache
    with Fence(store.root, "read the output cache"):
        existing = {key[len("run:"):] for key in keys_with_prefix(cache, "run:")} - removed
        orphans: list[str] = []
        for key in keys_with_prefix(cache, "cache:"):
            entry: Any = read_value(cache, key)
            if isinstance(entry, dict) and isinstance(entry.get("run_id"), str) and (
                entry["run_id"] not in existing
            ):
                orphans.append(key)
        used = _used_outputs(cache, existing, {k[len("cache:"):] for k in orphans})
        doomed = [k for k in orphans if k[len("cache:"):] not in used]
        sizes = {key: stored_bytes(cache, key, exact=True) for key in doomed}
    if dry_run:
        return len(doomed), sum(sizes.values())
    count = size = 0
    with Fence(store.root, "remove unreferenced cache entries"):
        for start in range(0, len(doomed), _CACHE_BATCH):
            with atomic(cache):  # each entry looked at again: a run may have replaced it
                for key in doomed[start:start + _CACHE_BATCH]:
                    entry = read_value(cache, key)
                    owner = entry.get("run_id") if isinstance(entry, dict) else None
                    if isinstance(owner, str) and (
                        owner in removed or run_key(owner) not in cache
                    ):
                        cache.delete(key)
                        count, size = count + 1, size + sizes[key]
    return count, size


def _used_outputs(cache: Any, runs: set[str], fingerprints: set[str]) -> set[str]:
    """Those of ``fingerprints`` (output-cache keys) that a step of one of ``runs``
    succeeded with or was answered from (``cached``): the entry holds its output. Call
    cache keys (``call-*``) are named by no step record: their run alone refers to them."""
    wanted = {f for f in fingerprints if not f.startswith("call-")}
    found: set[str] = set()
    if not wanted:
        return found
    for key in keys_with_prefix(cache, "step:"):
        if key[len("step:"):].partition(":")[0] not in runs:
            continue
        rec = read_value(cache, key)
        fingerprint = rec.get("fingerprint") if isinstance(rec, dict) else None
        if isinstance(fingerprint, str) and fingerprint in wanted and rec.get("status") in _OK:
            found.add(fingerprint)
    return found
