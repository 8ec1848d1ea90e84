"""How a run stops on SIGINT or SIGTERM: cleanly when it can, within a grace period always.

From the start of `executing.execute` until the process exits, the two signals are
handled here (Python-level handlers, with a wakeup fd so that the event loop hears of a
signal at once whichever thread the kernel delivered it to):

- the first one cancels the run's running steps (`Runner.interrupt`: command groups get
  SIGTERM, then SIGKILL), the run is checkpointed ``interrupted`` and the process exits
  130 (SIGINT) or 143 (SIGTERM). One that arrives before the event loop runs is acted
  on when it starts; one that arrives once every step has settled changes nothing: the
  run ends as it would have, and its exit code is the run's (0 for a success);
- a second one leaves at once;
- either way a watchdog thread sees to it that the process is gone `STOP_GRACE_S` after
  the first signal, whatever a step does (a callable that blocks the loop, a pipe that
  never closes, a store that stays busy).

``storyflow cancel`` from another process asks through the store: it writes a cancel
request into the run's lease (`storyflow.store.request_cancel`), and a thread here reads
that one key every `CANCEL_POLL_S` (never per step). A request acts as a first SIGINT
(exit 130), its reason recorded as the run's error (``cancel_error``); after a signal it
changes nothing.

Leaving at once (`_leave_now`) kills the command groups in flight, records the run
``interrupted`` if the store still says ``running`` (one small write, bounded), says so
on stderr and calls ``os._exit``. Every checkpoint is committed as it happens, so
nothing committed is lost; the attempts in flight run again on ``resume``.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from storyflow.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_WAITING

STOP_GRACE_S = 8.0
"""Seconds from the first signal to the process's exit at the latest (under the 10 s
that ``docker stop`` and most supervisors give before SIGKILL)."""
GRACE_ENV = "STORYFLOW_STOP_GRACE_S"
"""An environment variable that sets another grace period (seconds)."""
_WRITE_S = 2.0
"""At most this long for the last record written on the way out."""
CANCEL_POLL_S = 0.5
"""How often the holder reads its lease for a ``storyflow cancel`` request."""
CANCEL_KEY = "cancel"
"""The key of ``RunRecord.meta`` that carries a cancel request to `end_run` (in
memory: `end_run` takes it off before the record is saved)."""
_HANDLED = (signal.SIGINT, signal.SIGTERM)
_BY_STATUS = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "waiting": EXIT_WAITING}


def grace_s() -> float:
    """The grace period: `GRACE_ENV` if it is a positive number, else `STOP_GRACE_S`."""
    try:
        value = float(os.environ.get(GRACE_ENV, ""))
    except ValueError:
        return STOP_GRACE_S
    return value if value > 0 else STOP_GRACE_S


def signal_exit_code(signum: int) -> int:
    """130 for SIGINT, 143 for SIGTERM."""
    return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT


class Stopping:
    """The signal handling of one run's process (see the module's docstring)."""

    def __init__(self, store: Any, record: Any, *, grace: float | None = None,
                 debug: bool = False) -> None:
        self.signals: list[int] = []
        """The signals received, first first."""
        self.grace_s = grace_s() if grace is None else grace
        self.debug = debug
        """Show where every thread was when the grace period ran out."""
        self._store = store
        self._record = record
        self._loop: Any = None
        self._interrupt: Callable[[int], None] | None = None
        self._settled: Callable[[], bool] = lambda: False
        self._wakeup: tuple[socket.socket, socket.socket, int] | None = None
        self._unwatch: Callable[[], None] | None = None
        self._armed = threading.Event()
        self._now = threading.Event()
        self._urgent = False
        self._leaving = threading.Lock()
        self.cancel: dict[str, Any] | None = None
        """The ``storyflow cancel`` request that stopped the run, if one did."""
        self._ended = threading.Event()

    @property
    def code(self) -> int:
        """The exit code of a run the signals interrupted."""
        return signal_exit_code(self.signals[0]) if self.signals else EXIT_SIGINT

    def install(self, lease: Any) -> None:
        """Take SIGINT and SIGTERM from now until the process exits, and keep ``lease``
        told of the command groups in flight. Only the main thread can do this; from
        another one, nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            return
        from storyflow.agents.command_agent import watch_groups

        threading.Thread(target=self._watch, name="storyflow-stop", daemon=True).start()
        threading.Thread(target=self._poll_cancel, args=(lease,), name="storyflow-cancel",
                         daemon=True).start()
        for signum in _HANDLED:
            signal.signal(signum, self._on_signal)

        def record_groups(groups: tuple[int, ...]) -> None:
            try:
                lease.track_groups(groups)
            except Exception:  # busy or taken over: the next heartbeat says so
                pass

        self._unwatch = watch_groups(record_groups)

    def attach(self, loop: Any, interrupt: Callable[[int], None],
               settled: Callable[[], bool]) -> None:
        """The run's event loop is about to run: a signal now ``interrupt``s the run,
        unless every step has ``settled``; one that came before does so as it starts."""
        self._interrupt, self._settled = interrupt, settled
        if self._unwatch is not None:  # installed: wake the loop on a signal
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            loop.add_reader(reader.fileno(), _drain, reader)
            self._wakeup = (reader, writer, old)
        self._loop = loop
        if self.signals:
            loop.call_soon(self._interrupt_run, self.signals[0])

    def detach(self) -> None:
        """The event loop has ended (before it is closed): from now on a first signal
        changes nothing; the watchdog and a second signal still bound the exit."""
        loop, self._loop = self._loop, None
        self._ended.set()
        if self._unwatch is not None:
            self._unwatch()
        if self._wakeup is not None and loop is not None:
            reader, writer, old = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(old)
            loop.remove_reader(reader.fileno())
            reader.close()
            writer.close()

    def defer_to_leaving(self) -> None:
        """The main thread is on its way out. When a second signal came, or the
        watchdog is already leaving at once, let the watchdog finish: it says why on
        stderr and exits with the code — an interpreter exiting first would cut it off
        mid-sentence (a daemon thread dies with it). Bounded, in case it cannot."""
        if self._now.is_set() or self._leaving.locked():
            time.sleep(_WRITE_S + 2.0)  # os._exit in the watchdog ends it sooner

    # -- signals -------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of whatever it was doing: only
        # appends, flags and the loop's thread-safe call; the watchdog does the rest.
        self.signals.append(signum)
        if len(self.signals) > 1:
            if not self._urgent:
                self._urgent = True
                self._now.set()
            return
        self._armed.set()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._interrupt_run, signum)
            except RuntimeError:  # the loop closed meanwhile: the run has ended
                pass

    def _interrupt_run(self, signum: int) -> None:
        loop = self._loop
        if loop is None or self._interrupt is None or self._settled():
            return
        if self.cancel is not None:  # the loop's thread: nothing else writes the record now
            self._record.meta[CANCEL_KEY] = dict(self.cancel)
        self._interrupt(signum)

    # -- storyflow cancel ----------------------------------------------------------------
    def _poll_cancel(self, lease: Any) -> None:
        while not self._ended.wait(CANCEL_POLL_S):
            try:
                request = lease.cancel_requested()
            except Exception:  # busy: the next poll reads it
                continue
            if request is not None:
                self._on_cancel(request)
                return

    def _on_cancel(self, request: dict[str, Any]) -> None:
        """A ``storyflow cancel`` request: a first SIGINT, with its reason (after a
        signal, nothing more)."""
        if self.signals or self._ended.is_set():
            return
        self.cancel = request
        self._on_signal(signal.SIGINT, None)

    def _watch(self) -> None:
        self._armed.wait()
        if self._now.wait(self.grace_s):
            why = "a second signal: leaving at once"
        else:
            why = f"the run did not stop within {self.grace_s:g}s of the signal: leaving now"
            if self.debug:
                import faulthandler

                faulthandler.dump_traceback(all_threads=True)
        self._leave_now(why)

    # -- leaving at once -----------------------------------------------------------------
    def _leave_now(self, why: str) -> None:
        if not self._leaving.acquire(blocking=False):
            return
        from storyflow.agents.command_agent import kill_groups_in_flight

        kill_groups_in_flight()
        record = copy.copy(self._record)  # the main thread may still be using it
        status = record.status
        if status == "running":
            _bounded(lambda: self._mark_interrupted(record), _WRITE_S)
            status = "interrupted"
        code = _BY_STATUS.get(status, self._last_code() if self._urgent else self.code)
        said = f"storyflow: {why}; run {record.run_id} is {status}"
        if status == "interrupted":
            said += f"; continue with: storyflow resume {record.run_id}"
        for flush in (_stdout, _stderr):  # what was printed so far, unless it blocks
            _bounded(flush, 0.5)
        _bounded(lambda: _say(said), 0.5)
        os._exit(code)

    def _last_code(self) -> int:
        return signal_exit_code(self.signals[-1])

    def _mark_interrupted(self, record: Any) -> None:
        from storyflow.engine.runs import end_crashed

        end_crashed(self._store, record, KeyboardInterrupt(), _discard, 0.0,
                    cancel=self.cancel)


def ignore_signals() -> None:
    """From here to the exit the run's outcome is decided: a signal cannot change the
    exit code (nor kill the process with -2/-15 while it closes)."""
    if threading.current_thread() is threading.main_thread():
        for signum in _HANDLED:
            signal.signal(signum, signal.SIG_IGN)


def _drain(reader: socket.socket) -> None:
    try:
        while reader.recv(64):
            pass
    except OSError:  # nothing more to read (BlockingIOError), or closed
        pass


def _bounded(fn: Callable[[], Any], timeout_s: float) -> None:
    """``fn()`` in a daemon thread, waited for at most ``timeout_s``: the main thread may
    hold what it needs (a store lock, a blocked stdout)."""
    worker = threading.Thread(target=_quietly, args=(fn,), daemon=True)
    worker.start()
    worker.join(timeout_s)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # best effort on the way out
        pass


def _say(text: str) -> None:
    os.write(2, (text + "\n").encode("utf-8", errors="replace"))


def _stdout() -> None:
    import sys

    sys.stdout.flush()


def _stderr() -> None:
    import sys

    sys.stderr.flush()


def _discard(event: dict[str, Any]) -> None:
    """No events on the way out: the main thread may be writing the log."""
