"""Command process groups a run's holder had in flight, and how a successor stops them.

A holder records in its lease each command's process group while it runs
(`describe_group`: the group id, its leader's start time and the boot it ran in). If the
holder dies without stopping them (``kill -9``, out of memory), whoever takes the run
over stops them first (`stop_groups`: SIGTERM, SIGKILL after a grace period), so a
resumed step never runs beside the attempt it replaces.

Process ids are reused, so a group is stopped only when it is provably the one recorded:
same boot, and its leader, if it is still in the process table (a zombie counts), started
at the recorded time; a group whose leader is gone while members remain cannot have been
reused (the kernel does not hand out an id a group still uses). Linux only (``/proc``):
elsewhere nothing is recorded, and nothing is stopped.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

ORPHAN_GRACE_S = 2.0
"""Seconds between SIGTERM and SIGKILL of a dead holder's command groups."""
_PROC = Path("/proc")
_BOOT_ID = _PROC / "sys" / "kernel" / "random" / "boot_id"


def describe_group(pgid: int) -> dict[str, Any] | None:
    """What a lease records of a command's process group, or None where ``/proc`` is not."""
    boot = _boot_id()
    if boot is None:
        return None
    stat = _stat(pgid)
    return {"pgid": pgid, "start": None if stat is None else stat[1], "boot": boot}


def left_running(record: Any) -> list[dict[str, Any]]:
    """The well-formed group records of a lease record (its ``groups``)."""
    groups = record.get("groups") if isinstance(record, dict) else None
    if not isinstance(groups, list):
        return []
    return [
        g for g in groups
        if isinstance(g, dict) and isinstance(g.get("pgid"), int)
        and not isinstance(g.get("pgid"), bool) and g["pgid"] > 1
    ]


def stop_groups(
    groups: list[dict[str, Any]], *, grace_s: float = ORPHAN_GRACE_S
) -> tuple[int, ...]:
    """SIGTERM each recorded group that is still ours and alive, SIGKILL what is left after
    ``grace_s``, and wait (briefly) until they are gone; the groups that were stopped."""
    boot = _boot_id()
    if boot is None:
        return ()
    live = _live_groups()
    mine = {os.getpgrp(), os.getpid()}
    targets = tuple(
        g["pgid"] for g in groups
        if g["pgid"] in live and g["pgid"] not in mine and g.get("boot") == boot
        and _same_leader(g["pgid"], g.get("start"))
    )
    if not targets:
        return ()
    for pgid in targets:
        _signal(pgid, signal.SIGTERM)
    if not _wait_gone(targets, grace_s):
        for pgid in targets:
            _signal(pgid, signal.SIGKILL)
        _wait_gone(targets, 1.0)
    return targets


def _same_leader(pgid: int, start: Any) -> bool:
    stat = _stat(pgid)
    if stat is None:
        return True  # the leader is gone, its group is not: still the recorded group
    return isinstance(start, int) and stat[1] == start


def _wait_gone(pgids: tuple[int, ...], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while not _live_groups().isdisjoint(pgids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return True


def _signal(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        return None


def _stat(pid: int) -> tuple[int, int, bytes] | None:
    """``(process group, start time in clock ticks since boot, state)`` of a process in
    the table, zombies included; None when there is none."""
    try:
        with open(_PROC / str(pid) / "stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[2]), int(fields[19]), fields[0]
    except (OSError, IndexError, ValueError):
        return None


def _live_groups() -> set[int]:
    """The process groups that have a member that is not a zombie."""
    live: set[int] = set()
    for entry in os.scandir(_PROC):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[2] not in (b"Z", b"X"):
                live.add(stat[0])
    return live
