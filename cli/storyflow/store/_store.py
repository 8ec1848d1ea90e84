"""The state store: runs, step instances, the cross-run output cache and leases.

diskcache (SQLite in WAL mode) is fenced into this package; its errors become
`StoreError`. Records are stored as plain dicts, never as our classes.
"""

from __future__ import annotations

import bisect
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diskcache

from storyflow.errors import StoreError, UsageError
from storyflow.store import _parsed
from storyflow.store._closing import Closing
from storyflow.store._damage import (
    Damage,
    RunListing,
    damaged_error,
    decode_run,
    decode_step,
    index_ok,
    listing,
    lost_error,
    rebuilt_index,
)
from storyflow.store._fence import FOREIGN_ERRORS, Fence, Undecodable, read_value, translate
from storyflow.store._integrity import Finding, check_integrity
from storyflow.store._lease import LEASE_TTL_S, Holder, Lease, acquire, read_holder
from storyflow.store._migrate import FORMAT_KEY, TransactDisk, atomic, migrate_1_to_2, upgrade
from storyflow.store._records import RunRecord, StepRecord
from storyflow.store._upsert import put_many

if TYPE_CHECKING:
    from storyflow.store._gc import GcReport

# --- Keys: the whole scheme, in one place ------------------------------------------
#   meta:format                      int, the store format version (STORE_FORMAT)
#   meta:runs                        list of [created_at, run_id], sorted, oldest first
#   run:<run_id>                     RunRecord.to_dict()
#   step:<run_id>:<instance_id>      StepRecord.to_dict()
#   cache:<fingerprint>              {"output", "run_id", "at"} for `cache: true` steps
#   lease:<run_id>                   {"pid", "host", "token", "heartbeat", "since"}
#   valid:<source_hash>              1: this exact workflow source passed the schema
#   parsed:<path>                    {"hash", "sum", "blob"}: a valid file's parsed data
#                                    (both read and written by _parsed.py)
#   meta:gc                          the lease of the `storyflow gc` removing runs (_gc.py)
# Run ids never contain ":", so the step key splits unambiguously. Beside db/, the state
# directory holds runs/<run_id>/ (event log, artifacts) and, while `gc` removes a run,
# trash/<run_id>/ (_gc.py).
# A record that does not read back is reported (`Damage`), never misread; see _damage.py.

RUN_INDEX_KEY = "meta:runs"


def run_key(run_id: str) -> str:
    return f"run:{run_id}"


def step_key(run_id: str, instance_id: str) -> str:
    return f"step:{run_id}:{instance_id}"


def cache_key(fingerprint: str) -> str:
    return f"cache:{fingerprint}"


def lease_key(run_id: str) -> str:
    return f"lease:{run_id}"


# --- Format version ----------------------------------------------------------------

STORE_FORMAT = 2
"""Bump on any change to the key scheme or record shapes, with a migration below.
1: storyflow 0.1 · 2: runs and steps carry their fork lineage and requests."""

MIGRATIONS: dict[int, Callable[[diskcache.Cache], None]] = {1: migrate_1_to_2}
"""``{from_version: migrate}``: each upgrades a store from its version to the next
(``_migrate.py``); all a store needs run in one transaction with the format's write."""

_SETTINGS: dict[str, Any] = {
    "sqlite_journal_mode": "wal",
    "sqlite_synchronous": 1,  # NORMAL: a process crash loses nothing committed
    "statistics": 0,
    "eviction_policy": "none",
    # Move the WAL into the database every 10,000 pages, not SQLite's 1,000: each move
    # syncs the file, and at 1,000 it cost a busy run up to ~100 µs per transaction.
    "sqlite_wal_autocheckpoint": 10000,
    "cull_limit": 0,  # nothing expires: skip diskcache's expired-key query on every set
    "size_limit": 2**40,
}
_DIR_MODE = 0o700
_CANDIDATES_SHOWN = 5
_FRESH_STORE_HINT = (
    "`storyflow doctor` checks the store; to start a fresh one, move {root}/db aside "
    "(the run folders under {root}/runs keep each run's event log)"
)


def _make_private_dir(path: Path, *, force_mode: bool) -> None:
    """Create `path` with mode 0700; also chmod it when we created it or `force_mode`."""
    existed = path.is_dir()
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    if force_mode or not existed:
        path.chmod(_DIR_MODE)  # mkdir's mode is filtered by the umask


class Store(Closing):
    """The persistent state of every run, under one state directory."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        """The state directory."""
        self.clock = clock
        """Epoch seconds; injected by tests."""
        db = self.root / "db"
        try:
            ours = db.is_dir()
            _make_private_dir(self.root, force_mode=ours)
            _make_private_dir(self.root / "runs", force_mode=True)
            _make_private_dir(db, force_mode=True)
            self._cache = diskcache.Cache(str(db), disk=TransactDisk, **_SETTINGS)
        except FOREIGN_ERRORS as exc:
            raise translate(exc, self.root, "open the store") from exc
        try:
            self._check_format()
        except BaseException:
            self._cache.close()
            raise

    def _check_format(self) -> None:
        """Refuse a store this storyflow cannot read; migrate an older one, all of it or
        nothing (one transaction: a crash leaves it as the older release wrote it)."""
        with Fence(self.root, "read the store format"), atomic(self._cache):
            found = read_value(self._cache, FORMAT_KEY)
            if found is None:
                self._cache.set(FORMAT_KEY, STORE_FORMAT)
                return
            if type(found) is not int:
                shown = (found.reason if isinstance(found, Undecodable)
                         else f"{found!r} (a {type(found).__name__})")
                raise StoreError(
                    f"the store at {self.root} is damaged: its format version ({FORMAT_KEY}) "
                    f"is {shown}, not an integer; this storyflow reads format {STORE_FORMAT}",
                    hint=_FRESH_STORE_HINT.format(root=self.root),
                )
            if found > STORE_FORMAT:
                raise StoreError(
                    f"the store at {self.root} was written by a newer storyflow (format {found})",
                    hint=f"upgrade storyflow, or use another --state-dir "
                    f"(this version reads format {STORE_FORMAT})",
                )
            if found < STORE_FORMAT:
                upgrade(self._cache, found, STORE_FORMAT, MIGRATIONS, self.root)

    def close(self) -> None:
        """Close the database connection. The store is unusable afterwards."""
        self._cache.close()

    def run_path(self, run_id: str) -> Path:
        """Where the run's folder is, created or not: for commands that only read."""
        return self.root / "runs" / run_id

    def run_dir(self, run_id: str) -> Path:
        """The run's folder (event log, artifacts), created 0700 on first use."""
        path = self.root / "runs" / run_id
        if not path.is_dir():
            with Fence(self.root, f"create {path}"):
                _make_private_dir(path, force_mode=True)
        return path

    # --- runs ------------------------------------------------------------------------

    def new_run_id(self) -> str:
        """A fresh id, sortable by creation time: ``20250101-120000-a1b2c3``."""
        stamp = datetime.fromtimestamp(self.clock(), tz=UTC)
        while True:
            run_id = f"{stamp:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
            with Fence(self.root, "read a run"):
                if run_key(run_id) not in self._cache:
                    return run_id

    def put_run(self, rec: RunRecord) -> None:
        """Insert or replace a run; a new one joins the run index."""
        key = run_key(rec.run_id)
        with Fence(self.root, "save the run"), self._cache.transact():
            if key not in self._cache:
                index = self._index()
                bisect.insort(index, [rec.created_at, rec.run_id])
                self._cache.set(RUN_INDEX_KEY, index)
            self._cache.set(key, rec.to_dict())

    def read_run(self, run_id: str) -> RunRecord | Damage | None:
        """The run with exactly this id: its record, a `Damage` when the record does not
        read back, None when there is none."""
        with Fence(self.root, "read a run"):
            d = read_value(self._cache, run_key(run_id))
        return None if d is None else decode_run(run_id, d)

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with exactly this id, if any; `StoreError` if its record is damaged."""
        found = self.read_run(run_id)
        if isinstance(found, Damage):
            raise damaged_error(self.root, found)
        return found

    def _index(self) -> list[list[Any]]:
        """The run index ``[[created_at, run_id], ...]``, oldest first; rebuilt from the
        run records (not saved) when it is damaged."""
        with Fence(self.root, "read the run index"):
            index = read_value(self._cache, RUN_INDEX_KEY)
        if index is None:
            return []
        if index_ok(index):
            return index
        with Fence(self.root, "rebuild the run index"):
            return rebuilt_index(self._cache, self.read_run)

    def _run_ids(self) -> list[str]:
        """Every run id, oldest first."""
        return [run_id for _, run_id in self._index()]

    def find_run(self, ref: str) -> RunRecord:
        """The run with id `ref`, or the one run whose id starts with `ref`."""
        if ref:
            exact = self.get_run(ref)
            if exact is not None:
                return exact
            matches = [r for r in reversed(self._run_ids()) if r.startswith(ref)]
            # A run and its sub-workflow runs (``RUN.step``) share a prefix: the run wins.
            tops = [m for m in matches if all(o == m or o.startswith(m + ".") for o in matches)]
            if len(tops) == 1:
                matches = tops
            if len(matches) == 1:
                found = self.get_run(matches[0])
                if found is not None:
                    return found
            elif matches:
                shown = ", ".join(matches[:_CANDIDATES_SHOWN])
                more = len(matches) - _CANDIDATES_SHOWN
                raise UsageError(
                    f"'{ref}' matches {len(matches)} runs",
                    hint=f"give more of the id: {shown}" + (f" (+{more} more)" if more > 0 else ""),
                )
            else:  # a run whose record the store lost is not "no run"
                lost = lost_error(self.root, ref, set(self._run_ids()), self.read_run)
                if lost is not None:
                    raise lost
        raise UsageError(f"no run matches '{ref}'", hint="storyflow runs lists runs")

    def last_run(self) -> RunRecord | None:
        """The newest run by creation time that is not a sub-workflow's child run;
        `StoreError` if a newer run's record is damaged (it might be the one meant)."""
        for run_id in reversed(self._run_ids()):
            found = self.read_run(run_id)
            if isinstance(found, Damage):
                raise damaged_error(self.root, found, "name the run you mean (storyflow "
                                    "runs lists them); `storyflow doctor` checks the store")
            if found is not None and found.parent_run is None:
                return found
        return None

    def read_runs(self) -> RunListing:
        """Every run, newest first: the records that read back, those that do not, and
        the run folders left with no record (a database emptied, deleted or replaced)."""
        return listing(self.root, self._index(), self.read_run)

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first, optionally filtered by status and workflow name."""
        out: list[RunRecord] = []
        for run_id in reversed(self._run_ids()):
            if limit is not None and len(out) >= limit:
                break
            rec = self.read_run(run_id)
            if not isinstance(rec, RunRecord):  # damaged records: `read_runs` names them
                continue
            if status is not None and rec.status != status:
                continue
            if workflow is not None and rec.workflow != workflow:
                continue
            out.append(rec)
        return out

    # --- step instances: the hot path ------------------------------------------------

    def put_step(self, run_id: str, rec: StepRecord) -> None:
        """Checkpoint a step instance: one write, no reads."""
        try:
            self._cache.set(step_key(run_id, rec.id), rec.to_dict())
        except FOREIGN_ERRORS as exc:
            raise translate(exc, self.root, "save a step") from exc

    def put_steps(self, run_id: str, recs: Iterable[StepRecord]) -> None:
        """Checkpoint several step instances in one transaction (one commit, one upsert
        statement for them all: `storyflow.store._upsert`)."""
        try:
            put_many(self._cache, [(step_key(run_id, rec.id), rec.to_dict()) for rec in recs])
        except FOREIGN_ERRORS as exc:
            raise translate(exc, self.root, "save steps") from exc

    def get_step(self, run_id: str, instance_id: str) -> StepRecord | None:
        """The step instance's last checkpoint, if any (a damaged one counts as none)."""
        return self.get_steps(run_id, [instance_id]).get(instance_id)

    def get_steps(self, run_id: str, instance_ids: Iterable[str]) -> dict[str, StepRecord]:
        """The checkpoints of those instances that have one, by instance id. A record
        that does not read back counts as absent (the step runs again); `read_steps`
        names it."""
        return self.read_steps(run_id, instance_ids)[0]

    def read_steps(
        self, run_id: str, instance_ids: Iterable[str]
    ) -> tuple[dict[str, StepRecord], dict[str, Damage]]:
        """The checkpoints of those instances that have one, and those whose record
        does not read back, by instance id."""
        out: dict[str, StepRecord] = {}
        damaged: dict[str, Damage] = {}
        with Fence(self.root, "read steps"):
            for instance_id in instance_ids:
                d = read_value(self._cache, step_key(run_id, instance_id))
                if d is not None:
                    found = decode_step(run_id, instance_id, d)
                    if isinstance(found, Damage):
                        damaged[instance_id] = found
                    else:
                        out[instance_id] = found
        return out, damaged

    # --- cross-run output cache ------------------------------------------------------

    def cache_get(self, fingerprint: str) -> tuple[bool, Any]:
        """``(True, output)`` if a step with this fingerprint already succeeded."""
        with Fence(self.root, "read the output cache"):
            entry = read_value(self._cache, cache_key(fingerprint))
        if isinstance(entry, dict) and "output" in entry:
            return True, entry["output"]
        return False, None  # none, or damaged: the step runs and its entry is replaced

    def cache_put(self, fingerprint: str, output: Any, run_id: str) -> None:
        """Remember a successful output under its fingerprint."""
        entry = {"output": output, "run_id": run_id, "at": self.clock()}
        with Fence(self.root, "write the output cache"):
            self._cache.set(cache_key(fingerprint), entry)

    # --- workflows already validated --------------------------------------------------

    def known_valid(self, source_hash: str) -> bool:
        """Whether this exact source (bytes, parameters, storyflow version) passed the schema."""
        return _parsed.known_valid(self._cache, self.root, source_hash)

    def remember_valid(self, source_hash: str) -> None:
        _parsed.remember_valid(self._cache, self.root, source_hash)

    @property
    def parsed_files(self) -> Any:
        """This store as a `storyflow.spec.ParsedCache` (``get``/``put``)."""
        return _ParsedFiles(self)

    def parsed(self, path: str, text_hash: str) -> Any:
        """The parsed data of the workflow file at ``path`` if its text hashes to
        ``text_hash`` (it was loaded before, unchanged); else None. A damaged entry is
        dropped: the file is parsed again."""
        return _parsed.parsed(self._cache, self.root, path, text_hash)

    def remember_parsed(self, path: str, text_hash: str, data: Any) -> None:
        """Keep the parsed data of a valid workflow file (one entry per path)."""
        _parsed.remember_parsed(self._cache, self.root, path, text_hash, data)

    # --- housekeeping ----------------------------------------------------------------

    def gc(
        self, *, keep: int | None = None, older_than_s: float | None = None,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove old runs whole — all but the newest ``keep`` top-level runs, or those
        unchanged for ``older_than_s`` seconds (exactly one of the two) — never a live
        run, a kept run's fork parent or the newest run of a workflow; then the cache
        entries no run refers to. ``dry_run`` removes nothing. See ``_gc.py``."""
        from storyflow.store._gc import collect

        if (keep is None) == (older_than_s is None):
            raise ValueError("give keep or older_than_s, not both or neither")
        return collect(self, keep=keep, older_than_s=older_than_s, dry_run=dry_run)

    # --- integrity -------------------------------------------------------------------

    def check_integrity(self, *, budget_s: float = 20.0) -> list[Finding]:
        """What `storyflow doctor` says of the store: the database file's own check,
        every record read back (for up to ``budget_s`` seconds), and what is lost.
        Reads only."""
        with Fence(self.root, "read the run index"):
            raw = read_value(self._cache, RUN_INDEX_KEY)
        index = [] if raw is None else raw if index_ok(raw) else None
        return check_integrity(self._cache, self.root, index, budget_s=budget_s)

    # --- leases ----------------------------------------------------------------------

    def acquire_lease(self, run_id: str, *, ttl_s: float = LEASE_TTL_S) -> Lease:
        """Hold the run; `RunHeldError` if another live process holds it."""
        return acquire(
            self._cache,
            lease_key(run_id),
            run_id,
            ttl_s=ttl_s,
            clock=self.clock,
            root=self.root,
        )

    def holder(self, run_id: str, *, ttl_s: float = LEASE_TTL_S) -> Holder | None:
        """Who holds the run, alive or dead (killed, hung); None when nobody does.
        Reads only: a dead holder's lease stays until `acquire_lease` takes it over."""
        return read_holder(
            self._cache, lease_key(run_id), now=self.clock(), ttl_s=ttl_s, root=self.root
        )


class _ParsedFiles:
    """`Store.parsed` and `Store.remember_parsed` as a `storyflow.spec.ParsedCache`."""

    __slots__ = ("store",)

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, path: str, text_hash: str) -> Any:
        return self.store.parsed(str(Path(path).resolve()), text_hash)

    def put(self, path: str, text_hash: str, data: Any) -> None:
        self.store.remember_parsed(str(Path(path).resolve()), text_hash, data)
