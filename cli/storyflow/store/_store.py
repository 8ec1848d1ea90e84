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
from typing import Any

import diskcache

from storyflow.errors import StoreError, UsageError
from storyflow.store._closing import Closing
from storyflow.store._fence import FOREIGN_ERRORS, Fence, translate
from storyflow.store._lease import LEASE_TTL_S, Holder, Lease, acquire, read_holder
from storyflow.store._records import RunRecord, StepRecord

# --- Keys: the whole scheme, in one place ------------------------------------------
#   meta:format                      int, the store format version (STORE_FORMAT)
#   meta:runs                        list of [created_at, run_id], sorted, oldest first
#   run:<run_id>                     RunRecord.to_dict()
#   step:<run_id>:<instance_id>      StepRecord.to_dict()
#   cache:<fingerprint>              {"output", "run_id", "at"} for `cache: true` steps
#   lease:<run_id>                   {"pid", "host", "token", "heartbeat", "since"}
#   valid:<source_hash>              1: this exact workflow source passed the schema
# Run ids never contain ":", so the step key splits unambiguously.

FORMAT_KEY = "meta:format"
RUN_INDEX_KEY = "meta:runs"


def run_key(run_id: str) -> str:
    return f"run:{run_id}"


def step_key(run_id: str, instance_id: str) -> str:
    return f"step:{run_id}:{instance_id}"


def cache_key(fingerprint: str) -> str:
    return f"cache:{fingerprint}"


def lease_key(run_id: str) -> str:
    return f"lease:{run_id}"


def valid_key(source_hash: str) -> str:
    return f"valid:{source_hash}"


def parsed_key(path: str) -> str:
    return f"parsed:{path}"


# --- Format version ----------------------------------------------------------------

STORE_FORMAT = 1
"""Bump on any change to the key scheme or record shapes, with a migration below."""

MIGRATIONS: dict[int, Callable[[diskcache.Cache], None]] = {}
"""``{from_version: migrate}``: each upgrades a store from its version to the next."""

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
            self._cache = diskcache.Cache(str(db), **_SETTINGS)
        except FOREIGN_ERRORS as exc:
            raise translate(exc, self.root, "open the store") from exc
        try:
            self._check_format()
        except BaseException:
            self._cache.close()
            raise

    def _check_format(self) -> None:
        with Fence(self.root, "read the store format"), self._cache.transact():
            found: int | None = self._cache.get(FORMAT_KEY)
            if found is None:
                self._cache.set(FORMAT_KEY, STORE_FORMAT)
                return
            if found > STORE_FORMAT:
                raise StoreError(
                    f"the store at {self.root} was written by a newer storyflow (format {found})",
                    hint=f"upgrade storyflow, or use another --state-dir "
                    f"(this version reads format {STORE_FORMAT})",
                )
            while found < STORE_FORMAT:
                migrate = MIGRATIONS.get(found)
                if migrate is None:
                    raise StoreError(
                        f"the store at {self.root} has format {found}, "
                        f"which this storyflow cannot migrate",
                        hint="use another --state-dir",
                    )
                migrate(self._cache)
                found += 1
                self._cache.set(FORMAT_KEY, found)

    def close(self) -> None:
        """Close the database connection. The store is unusable afterwards."""
        self._cache.close()

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
                index: list[list[Any]] = self._cache.get(RUN_INDEX_KEY, [])
                bisect.insort(index, [rec.created_at, rec.run_id])
                self._cache.set(RUN_INDEX_KEY, index)
            self._cache.set(key, rec.to_dict())

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with exactly this id, if any."""
        with Fence(self.root, "read a run"):
            d: dict[str, Any] | None = self._cache.get(run_key(run_id))
        return None if d is None else RunRecord.from_dict(d)

    def _run_ids(self) -> list[str]:
        """Every run id, oldest first."""
        with Fence(self.root, "read the run index"):
            index: list[list[Any]] = self._cache.get(RUN_INDEX_KEY, [])
        return [run_id for _, run_id in index]

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
        raise UsageError(f"no run matches '{ref}'", hint="storyflow runs lists runs")

    def last_run(self) -> RunRecord | None:
        """The newest run by creation time that is not a sub-workflow's child run."""
        for run_id in reversed(self._run_ids()):
            rec = self.get_run(run_id)
            if rec is not None and rec.parent_run is None:
                return rec
        return None

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
            rec = self.get_run(run_id)
            if rec is None:
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
        """Checkpoint several step instances in one transaction (one commit)."""
        try:
            with self._cache.transact():
                for rec in recs:
                    self._cache.set(step_key(run_id, rec.id), rec.to_dict())
        except FOREIGN_ERRORS as exc:
            raise translate(exc, self.root, "save steps") from exc

    def get_step(self, run_id: str, instance_id: str) -> StepRecord | None:
        """The step instance's last checkpoint, if any."""
        with Fence(self.root, "read a step"):
            d: dict[str, Any] | None = self._cache.get(step_key(run_id, instance_id))
        return None if d is None else StepRecord.from_dict(d)

    def get_steps(self, run_id: str, instance_ids: Iterable[str]) -> dict[str, StepRecord]:
        """The checkpoints of those instances that have one, by instance id."""
        out: dict[str, StepRecord] = {}
        with Fence(self.root, "read steps"):
            for instance_id in instance_ids:
                d: dict[str, Any] | None = self._cache.get(step_key(run_id, instance_id))
                if d is not None:
                    out[instance_id] = StepRecord.from_dict(d)
        return out

    # --- cross-run output cache ------------------------------------------------------

    def cache_get(self, fingerprint: str) -> tuple[bool, Any]:
        """``(True, output)`` if a step with this fingerprint already succeeded."""
        with Fence(self.root, "read the output cache"):
            entry: dict[str, Any] | None = self._cache.get(cache_key(fingerprint))
        return (False, None) if entry is None else (True, entry["output"])

    def cache_put(self, fingerprint: str, output: Any, run_id: str) -> None:
        """Remember a successful output under its fingerprint."""
        entry = {"output": output, "run_id": run_id, "at": self.clock()}
        with Fence(self.root, "write the output cache"):
            self._cache.set(cache_key(fingerprint), entry)

    # --- workflows already validated --------------------------------------------------

    def known_valid(self, source_hash: str) -> bool:
        """Whether this exact source (bytes, parameters, storyflow version) passed the schema."""
        with Fence(self.root, "read the validation cache"):
            return self._cache.get(valid_key(source_hash)) is not None

    def remember_valid(self, source_hash: str) -> None:
        with Fence(self.root, "write the validation cache"):
            self._cache.set(valid_key(source_hash), 1)

    @property
    def parsed_files(self) -> Any:
        """This store as a `storyflow.spec.ParsedCache` (``get``/``put``)."""
        return _ParsedFiles(self)

    def parsed(self, path: str, text_hash: str) -> Any:
        """The parsed data of the workflow file at ``path`` if its text hashes to
        ``text_hash`` (it was loaded before, unchanged); else None."""
        with Fence(self.root, "read the parsed-workflow cache"):
            entry = self._cache.get(parsed_key(path))
        if isinstance(entry, dict) and entry.get("hash") == text_hash:
            return entry.get("data")
        return None

    def remember_parsed(self, path: str, text_hash: str, data: Any) -> None:
        """Keep the parsed data of a valid workflow file (one entry per path)."""
        with Fence(self.root, "write the parsed-workflow cache"):
            self._cache.set(parsed_key(path), {"hash": text_hash, "data": data})

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
