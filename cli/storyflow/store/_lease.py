"""Leases: one live process holds a run at a time.

A lease is one store key holding ``{"pid", "host", "token", "heartbeat", "since"}``, and
``"groups"`` while the holder runs commands: their process groups (``_orphans.py``),
written when a command starts or ends, so that whoever takes over a dead holder's run
stops what it left running before anything runs again.
The holder refreshes ``heartbeat`` while it runs; a holder whose process is gone (same
host) or whose heartbeat is older than the TTL (any host) is dead, and its lease is
taken over. A dead holder's lease stays in the store until then, so readers (`runs`,
`show`) can tell a run that is running from one whose process was killed. A lease
record that does not read back holds nothing: it is taken over, or overwritten by the
holder's next heartbeat.

``storyflow cancel`` asks the holder to stop by adding ``"cancel": {"reason", "at",
"by"}`` to its lease record (`request_cancel`); the holder's heartbeat keeps the field,
and the holder polls it (`Lease.cancel_requested`, one read of one key). A new holder
(``resume``) writes a fresh record: a request outlives neither its holder nor its run.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from storyflow.errors import RunHeldError
from storyflow.store._closing import Closing
from storyflow.store._fence import Fence, Undecodable, read_value
from storyflow.store._orphans import describe_group, left_running, stop_groups

LEASE_TTL_S = 30.0
"""A holder that has not refreshed its heartbeat for this long is dead (hung or gone)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; trust the heartbeat
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # it exists, it is just not ours
    except OSError:
        return False
    return True


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def holder_alive(record: Any, *, now: float, ttl_s: float, host: str) -> bool:
    """Whether the process described by a lease record still holds it (a record that is
    not one describes no process)."""
    if not isinstance(record, dict) or now - _number(record.get("heartbeat")) >= ttl_s:
        return False
    if record.get("host") != host:
        return True
    return pid_alive(int(_number(record.get("pid"))))


@dataclass(frozen=True, slots=True)
class Holder:
    """What a run's lease says about the process that holds (or held) it."""

    pid: int
    """Its process id, on `host`."""
    host: str
    """The host it runs on."""
    heartbeat: float
    """Epoch seconds of its last sign of life."""
    since: float | None
    """Epoch seconds when it took the run; None in leases written before storyflow kept it."""
    alive: bool
    """Whether it still holds the run: its process exists and its heartbeat is fresh."""


def read_holder(cache: diskcache.Cache, key: str, *, now: float, ttl_s: float,
                root: Path) -> Holder | None:
    """The run's holder as its lease says, alive or dead; None when nobody holds it.
    Reads only: a dead holder's lease is left for the next `acquire` to take over."""
    with Fence(root, "read the run's lease"):
        record = read_value(cache, key)
    if not isinstance(record, dict):
        return None  # none, or damaged: it holds nothing
    since = record.get("since")
    return Holder(
        pid=int(_number(record.get("pid"))),
        host=str(record.get("host", "")),
        heartbeat=_number(record.get("heartbeat")),
        since=float(since) if isinstance(since, int | float) else None,
        alive=holder_alive(record, now=now, ttl_s=ttl_s, host=socket.gethostname()),
    )


def request_cancel(store: Any, run_id: str, reason: str | None) -> dict[str, Any] | None:
    """Ask the process holding ``run_id`` (a top-level run) to stop, by writing a cancel
    request into its lease record; the lease record as it was (None when nobody holds
    the run: nothing is written). Whether the holder is alive is the caller's question."""
    from storyflow.store._store import lease_key

    cache, key = store._cache, lease_key(run_id)
    request = {"reason": reason, "at": store.clock(),
               "by": f"{os.getpid()}@{socket.gethostname()}"}
    with Fence(store.root, "ask the run's holder to stop"), cache.transact():
        current = read_value(cache, key)
        if not isinstance(current, dict):
            return None
        cache.set(key, {**current, "cancel": request})
    return current


def _held_error(run_id: str, record: dict[str, Any]) -> RunHeldError:
    return RunHeldError(
        f"run {run_id} is held by process {record.get('pid')} on {record.get('host')}",
        hint="wait for it to finish, or stop that process",
    )


class Lease(Closing):
    """This process's hold on one run. Refresh it with `heartbeat`, end it with `release`."""

    def __init__(
        self,
        cache: diskcache.Cache,
        key: str,
        run_id: str,
        token: str,
        *,
        clock: Callable[[], float],
        root: Path,
    ) -> None:
        self._cache = cache
        self._key = key
        self._clock = clock
        self._root = root
        self.run_id = run_id
        """The run held."""
        self.token = token
        """Unique to this acquisition; tells our lease from a successor's."""
        self.since = clock()
        """Epoch seconds when this process took the run."""
        self.stopped: tuple[int, ...] = ()
        """Process groups a dead holder's commands left running, stopped when this
        process took the run."""
        self._groups: dict[int, dict[str, Any]] = {}

    def _record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": self.token,
            "heartbeat": self._clock(),
            "since": self.since,
        }
        if self._groups:
            record["groups"] = list(self._groups.values())
        return record

    def track_groups(self, pgids: Iterable[int]) -> None:
        """Record the process groups of the commands this process runs now (written at
        once, with a heartbeat); `RunHeldError` if another process took the run."""
        groups: dict[int, dict[str, Any]] = {}
        for pgid in pgids:
            known = self._groups.get(pgid) or describe_group(pgid)
            if known is not None:
                groups[pgid] = known
        if groups.keys() == self._groups.keys():
            return
        self._groups = groups
        self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the timestamp; raise `RunHeldError` if another process took the run."""
        with Fence(self._root, "refresh the lease"), self._cache.transact():
            current = read_value(self._cache, self._key)
            if isinstance(current, dict) and current.get("token") != self.token:
                raise _held_error(self.run_id, current)
            record = self._record()
            if isinstance(current, dict) and isinstance(current.get("cancel"), dict):
                record["cancel"] = current["cancel"]  # asked to stop: the request stays
            self._cache.set(self._key, record)

    def cancel_requested(self) -> dict[str, Any] | None:
        """The cancel request written for this process's hold (`request_cancel`), or
        None: one read of the lease key, cheap enough for a sub-second poll."""
        with Fence(self._root, "read the run's lease"):
            current = read_value(self._cache, self._key)
        if not isinstance(current, dict) or current.get("token") != self.token:
            return None
        request = current.get("cancel")
        return request if isinstance(request, dict) else None

    def release(self) -> None:
        """Give the run up, unless another process already took it over."""
        with Fence(self._root, "release the lease"), self._cache.transact():
            current = read_value(self._cache, self._key)
            if isinstance(current, Undecodable) or (
                isinstance(current, dict) and current.get("token") == self.token
            ):
                self._cache.delete(self._key)

    close = release  # `with lease:` releases it


def acquire(
    cache: diskcache.Cache,
    key: str,
    run_id: str,
    *,
    ttl_s: float,
    clock: Callable[[], float],
    root: Path,
) -> Lease:
    """Take the run's lease, over a dead or stale holder; `RunHeldError` if one is alive.
    The command groups a dead holder on this host left running are stopped first; until
    they are, the lease records them as this process's own (a crash meanwhile leaves
    them to the next taker)."""
    lease = Lease(cache, key, run_id, uuid.uuid4().hex, clock=clock, root=root)
    host = socket.gethostname()
    with Fence(root, "take the run's lease"), cache.transact():
        current = read_value(cache, key)
        if isinstance(current, dict) and holder_alive(current, now=clock(), ttl_s=ttl_s,
                                                      host=host):
            raise _held_error(run_id, current)
        if isinstance(current, dict) and current.get("host") == host:
            lease._groups = {g["pgid"]: g for g in left_running(current)}
        cache.set(key, lease._record())
    if lease._groups:
        lease.stopped = stop_groups(list(lease._groups.values()))
        lease._groups = {}
        lease.heartbeat()
    return lease
