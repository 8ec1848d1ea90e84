"""The process groups of the command steps this process runs, and their parent-death signal.

Each command attempt leads its own process group (``start_new_session``). While it runs,
its group id is *in flight* here; a watcher (the ``run``/``resume`` command, which
writes them into the run's lease) hears of every change, so that after a ``kill -9`` of
storyflow the next ``resume`` can stop what the dead process left running. On Linux the
command itself also gets SIGKILL when storyflow dies (``setpriv --pdeathsig``); its own
children do not, which is why the groups are recorded.

A group counts as alive while a process of it is not a zombie: in a container whose
PID 1 never reaps, dead members stay in the process table for good.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

_PROC = Path("/proc")

_groups: dict[int, None] = {}
"""Process groups of the commands this process runs now, oldest first."""
_watchers: list[Callable[[tuple[int, ...]], None]] = []


def groups_in_flight() -> tuple[int, ...]:
    """The process group ids of the commands this process runs now."""
    return tuple(_groups)


def watch_groups(watcher: Callable[[tuple[int, ...]], None]) -> Callable[[], None]:
    """Call ``watcher(groups)`` each time a command starts or ends; returns the unwatch.
    The watcher runs on the event loop and should be quick."""
    _watchers.append(watcher)

    def unwatch() -> None:
        if watcher in _watchers:
            _watchers.remove(watcher)

    return unwatch


def kill_groups_in_flight() -> None:
    """SIGKILL every command group in flight: the process is about to leave at once.
    Safe from any thread (the copy of the keys is taken under the GIL)."""
    for pgid in tuple(_groups):
        signal_group(pgid, signal.SIGKILL)


def track(pgid: int) -> None:
    """A command started: its group is in flight."""
    _groups[pgid] = None
    _tell()


def untrack(pgid: int) -> None:
    """A command ended and its group was stopped (or left only to escapees)."""
    if pgid in _groups:
        del _groups[pgid]
        _tell()


def _tell() -> None:
    now = tuple(_groups)
    for watcher in list(_watchers):
        watcher(now)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the group; nothing if it is gone (or no longer ours to signal)."""
    if pgid <= 1:
        return  # never our own group (0) nor everything (-1)
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not _PROC.is_dir():
        return True
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "stat"), "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended while we looked
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


# -- parent-death signal ----------------------------------------------------------------------
_setpriv: list[str | None] = []
"""``[path]`` once probed: ``setpriv`` when it can set a parent-death signal here, else
``[None]``."""


def with_deathsig(argv: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    """``argv`` run through ``setpriv --pdeathsig KILL --`` (util-linux 2.33+): the
    command gets SIGKILL when this process dies, even by ``kill -9``. The command's own
    children do not; the lease's record of the group covers them.

    Linux only, and only from the main thread: the signal fires when the *thread* that
    forked ends, and asyncio forks in the event loop's thread (storyflow's main thread;
    on a Dask worker, whichever thread runs the worker's loop). A command that does not
    resolve runs unwrapped, so "command not found" stays our error, not setpriv's."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return argv
    if not _setpriv:
        _setpriv.append(_probe())
    setpriv = _setpriv[0]
    if setpriv is None or not _resolves(argv[0], env.get("PATH", os.defpath), cwd):
        return argv
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


def _probe() -> str | None:
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "--pdeathsig", "KILL", "--", "true"], timeout=5, check=False,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path if done.returncode == 0 else None


def _resolves(name: str, path: str, cwd: Path) -> bool:
    if "/" in name:
        target = Path(name) if os.path.isabs(name) else cwd / name
        return target.is_file() and os.access(target, os.X_OK)
    return shutil.which(name, path=path) is not None
