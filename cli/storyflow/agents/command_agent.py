"""The ``command`` agent: one subprocess per attempt, in its own process group.

``with: {run: [argv...] | "shell string", stdin, env, output: text|json, cwd}``. A list
runs without a shell; only a string goes through ``/bin/sh -c``. The child sees a
minimal environment (PATH, HOME, LANG, LC_ALL, TMPDIR) plus ``with.env`` plus the
agent's declared secrets — nothing else of ours leaks.

Exit 0 succeeds, exit 75 (EX_TEMPFAIL) is transient, any other exit is permanent and
carries the tail of stderr. stdout is read whole (it is the output); stderr goes to the
step's log line by line as it comes (bounded: `storyflow.agents.capture.StepLog`). A
pipe still open once the command's own processes are gone is held by one that left its
group (``setsid``, a daemon): it is read `_DRAIN_S` more, not waited for.

On timeout or cancellation the whole process group gets SIGTERM, then SIGKILL after
`KILL_GRACE_S`, so no grandchild in it outlives its step; every wait on that way out is
bounded, whatever the command does. Each command's group is in flight (`_groups.py`)
while it runs, for the run's lease to record, and on Linux the command gets SIGKILL if
storyflow itself dies.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storyflow.agents._groups import (
    group_alive,
    groups_in_flight,
    kill_groups_in_flight,
    signal_group,
    track,
    untrack,
    watch_groups,
    with_deathsig,
)
from storyflow.agents.base import Call
from storyflow.agents.capture import StepLog
from storyflow.errors import InvalidOutput, PermanentError, StepTimeout, TransientError

EXIT_TEMPFAIL = 75
KILL_GRACE_S = 2.0
"""Seconds between SIGTERM and SIGKILL of a command's process group."""
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
"""The only variables of our own environment a command inherits."""
_TAIL_LINES = 20
_TAIL_CHARS = 2000
_TAIL_WINDOW = 64 * 1024
"""The end of stderr kept for the error's tail (the log gets all of it, bounded)."""
_CHUNK = 64 * 1024
_DRAIN_S = 2.0
"""Once the command's group is gone, how long a pipe held by an escapee is still read."""
_STOP_DRAIN_S = 0.25
"""After a stop killed the group: what is left in the pipes is read at once."""
_REAP_S = 1.0
"""After SIGKILL: the child watcher reaps the leader within this."""
_START_S = 2.0
"""A start cancelled half way is let finish this long, then its group is stopped."""
_POLL_S = 0.25
"""How often a command that runs is checked for having left only escapees behind."""


__all__ = ["CommandAgent", "groups_in_flight", "kill_groups_in_flight", "watch_groups"]


class CommandAgent:
    """Runs a command; its output is its stdout (text or parsed JSON)."""

    kind: str = "command"
    required: tuple[str, ...] = ("run",)

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    async def run(self, call: Call) -> Any:
        """Run the command once and return its output."""
        inputs = call.inputs
        run = inputs.get("run")
        argv = _argv(run)
        output = inputs.get("output", "text")
        if output not in ("text", "json"):
            raise PermanentError(
                f"`with.output` must be 'text' or 'json', not {output!r}",
                hint="use output: text (the default) or output: json",
            )
        stdin = _stdin(inputs.get("stdin"))
        env = self._env(inputs.get("env"), call.secrets)
        cwd = _cwd(call.workflow_dir, inputs.get("cwd"))

        proc = await _spawn(argv, env, cwd, piped_stdin=stdin is not None)
        log = StepLog(call.log)
        try:
            stdout, err_end = await _communicate(proc, stdin, call.timeout_s, log)
        finally:
            log.close()
        tail = _tail(err_end)
        code = proc.returncode
        assert code is not None  # communicate() waited for the exit
        if code == EXIT_TEMPFAIL:
            raise TransientError(_exit_message(code, tail))
        if code != 0:
            hint = None
            if code == 127 and isinstance(run, str):
                hint = "the shell could not find the command; check PATH and spelling"
            raise PermanentError(_exit_message(code, tail), hint=hint)

        text = stdout.decode("utf-8", errors="replace")
        if output == "text":
            return text.rstrip("\n")
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidOutput(
                f"command output is not valid JSON ({exc.msg} at line {exc.lineno} "
                f"column {exc.colno}): {text[:200]!r}",
                hint="print one JSON document on stdout and logs on stderr",
            ) from exc

    def _env(self, extra: Any, secrets: Mapping[str, str]) -> dict[str, str]:
        env = {k: self._environ[k] for k in PASSED_ENV if k in self._environ}
        env.setdefault("PATH", os.defpath)
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise PermanentError(
                    f"`with.env` must be a mapping of NAME: value, not {type(extra).__name__}"
                )
            for name, value in extra.items():
                if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                    raise PermanentError(f"bad environment variable name {name!r} in `with.env`")
                env[name] = _env_value(value)
        env.update(secrets)
        return env


def _argv(run: Any) -> list[str]:
    if isinstance(run, str):
        if not run.strip():
            raise PermanentError("`with.run` is an empty command")
        return ["/bin/sh", "-c", run]
    if isinstance(run, list) and run:
        if any(isinstance(a, dict | list) or a is None for a in run):
            raise PermanentError(
                "`with.run` arguments must be strings or numbers",
                hint='quote the template, e.g. "{{ steps.x.output | tojson }}"',
            )
        return [str(a) for a in run]
    raise PermanentError(
        "`with.run` must be an argv list or a shell string",
        hint='e.g. run: ["wc", "-w"] or run: "wc -w < draft.txt"',
    )


def _stdin(value: Any) -> bytes | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.encode("utf-8")


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _cwd(workflow_dir: Path, cwd: Any) -> Path:
    if cwd is None:
        return workflow_dir
    if not isinstance(cwd, str):
        raise PermanentError(f"`with.cwd` must be a path, not {type(cwd).__name__}")
    path = workflow_dir / cwd
    if not path.is_dir():
        raise PermanentError(
            f"`with.cwd` {cwd!r} is not a directory",
            hint=f"relative paths resolve against the workflow folder {workflow_dir}",
        )
    return path


async def _spawn(
    argv: list[str], env: dict[str, str], cwd: Path, *, piped_stdin: bool
) -> asyncio.subprocess.Process:
    """Start the command in a new session (its own process group), tracked as in flight.

    Shielded: asyncio answers a cancellation that lands while the child starts by
    killing the child alone and waiting for its pipes, which its own children hold, so
    a Ctrl-C at that moment would wait for them. Instead the start completes and the
    whole group is stopped."""
    starting = asyncio.ensure_future(_create(with_deathsig(argv, env, cwd), env, cwd,
                                             piped_stdin=piped_stdin))
    try:
        proc = await asyncio.shield(starting)
    except asyncio.CancelledError:
        started = None
        try:
            await asyncio.wait({starting}, timeout=_START_S)
            started = _started(starting)
            if started is not None:
                track(started.pid)
                await _stop(started, None)
        finally:
            if started is None:  # not started yet, or this wait was cancelled as well
                starting.add_done_callback(_kill_started)
        raise
    track(proc.pid)
    return proc


async def _create(
    argv: list[str], env: dict[str, str], cwd: Path, *, piped_stdin: bool
) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if piped_stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise PermanentError(
            f"command not found: {argv[0]!r}",
            hint=f"install it or give its full path; commands see PATH={env['PATH']}",
        ) from exc
    except PermissionError as exc:
        raise PermanentError(
            f"command is not executable: {argv[0]!r}", hint="check the file's permissions"
        ) from exc
    except (OSError, ValueError) as exc:
        raise PermanentError(f"cannot start command {argv[0]!r}: {exc}") from exc


def _started(
    starting: asyncio.Future[asyncio.subprocess.Process],
) -> asyncio.subprocess.Process | None:
    if starting.done() and not starting.cancelled() and starting.exception() is None:
        return starting.result()
    return None


def _kill_started(starting: asyncio.Future[asyncio.subprocess.Process]) -> None:
    proc = _started(starting)
    if proc is not None:
        signal_group(proc.pid, signal.SIGKILL)
        _close(proc)
        untrack(proc.pid)


async def _communicate(
    proc: asyncio.subprocess.Process, stdin: bytes | None, timeout_s: float | None,
    log: StepLog,
) -> tuple[bytes, str]:
    """Feed stdin, collect stdout, log stderr: ``(stdout, the end of stderr)``; on timeout
    or cancellation stop the group. Every wait on the way out is bounded."""
    io = asyncio.ensure_future(_io(proc, stdin, log))
    try:
        result = await asyncio.wait_for(asyncio.shield(io), timeout_s)
    except TimeoutError:
        await _stop(proc, io)
        raise StepTimeout(f"command timed out after {timeout_s:g}s") from None
    except BaseException:  # cancelled (a signal, the engine's timeout), or worse
        await _stop(proc, io)
        raise
    _close(proc)
    untrack(proc.pid)
    return result


async def _io(
    proc: asyncio.subprocess.Process, stdin: bytes | None, log: StepLog
) -> tuple[bytes, str]:
    """Read until EOF and the command's exit. Once its process group is gone, a pipe
    still open is held by a process that left the group (``setsid``, a daemon): it is
    given `_DRAIN_S` more, then the output is what was read (like Go's ``WaitDelay``)."""
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    work: list[Any] = [_read_all(proc.stdout, out), _log_stderr(proc.stderr, log)]
    if stdin is not None:
        assert proc.stdin is not None
        work.append(_feed(proc.stdin, stdin))
    reading = asyncio.gather(*work)
    err_end = ""
    try:
        while True:
            done, _ = await asyncio.wait({reading}, timeout=_POLL_S)
            if done:
                err_end = reading.result()[1]
                break
            if proc.returncode is not None and not group_alive(proc.pid):
                done, _ = await asyncio.wait({reading}, timeout=_DRAIN_S)
                if done:
                    err_end = reading.result()[1]
                break
    finally:
        if not reading.done():
            reading.cancel()
            # A cancelled gather ends with its CancelledError as an exception: retrieve it.
            reading.add_done_callback(_retrieve)
    await _exited(proc, None)
    return bytes(out), err_end


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _read_all(stream: asyncio.StreamReader, out: bytearray) -> None:
    while chunk := await stream.read(_CHUNK):
        out += chunk


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    try:
        pipe.write(data)
        await pipe.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command does not read its stdin (whole)
    pipe.close()


async def _log_stderr(stream: asyncio.StreamReader, log: StepLog) -> str:
    """Each line of stderr to the log as it comes; the end of stderr."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    end = ""
    while True:
        chunk = await stream.read(_CHUNK)
        text = decoder.decode(chunk, final=not chunk)
        if text:
            log.write(text, 1)
            end = (end + text)[-_TAIL_WINDOW:]
        if not chunk:
            return end


async def _stop(
    proc: asyncio.subprocess.Process, io: asyncio.Future[tuple[bytes, str]] | None
) -> None:
    """SIGTERM the group, wait up to the grace period for it to go, SIGKILL it, reap
    the child, close the pipes. Bounded: ``KILL_GRACE_S`` + ``_REAP_S`` + ``_STOP_DRAIN_S``
    at most, whatever the command does (a TERM trap, a grandchild holding the pipes).

    The child leads its own group (``start_new_session``), so its pid is the group id,
    which stays valid for signalling stragglers even after the leader has been reaped.
    """
    pgid = proc.pid
    try:
        signal_group(pgid, signal.SIGTERM)
        await _gone(proc, KILL_GRACE_S)
    finally:
        # Also runs when the grace wait is itself cancelled (a second Ctrl-C).
        signal_group(pgid, signal.SIGKILL)
        try:
            await _gone(proc, _REAP_S)
            if io is not None:
                await _drain(io)
        finally:
            _close(proc)
            untrack(pgid)


async def _gone(proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Wait until the child has exited and its process group is empty, or the timeout."""
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while proc.returncode is None or group_alive(proc.pid):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


async def _exited(proc: asyncio.subprocess.Process, timeout_s: float | None) -> None:
    """Wait for the child's exit (not for its pipes, as ``Process.wait`` does before
    Python 3.12), at most ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pause = 0.001
    while proc.returncode is None:
        if deadline is not None and time.monotonic() >= deadline:
            return
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


async def _drain(io: asyncio.Future[tuple[bytes, str]]) -> None:
    """Let the I/O task read what is left; give up if an escapee holds the pipes."""
    try:
        await asyncio.wait({io}, timeout=_STOP_DRAIN_S)
    finally:
        if not io.done():
            io.cancel()
        io.add_done_callback(_retrieve)  # the outcome was decided already


def _close(proc: asyncio.subprocess.Process) -> None:
    """Close the transport and its pipes now, while the loop runs: left to the garbage
    collector, a transport whose pipes an escapee holds closes on a closed loop
    (``Exception ignored ... Event loop is closed``)."""
    transport = getattr(proc, "_transport", None)
    if transport is not None and proc.returncode is not None:
        transport.close()


def _tail(text: str) -> str:
    lines = text.rstrip().splitlines()[-_TAIL_LINES:]
    return "\n".join(lines)[-_TAIL_CHARS:]


def _exit_message(code: int, tail: str) -> str:
    if code < 0:
        try:
            head = f"command killed by {signal.Signals(-code).name}"
        except ValueError:
            head = f"command killed by signal {-code}"
    else:
        head = f"command exited with status {code}"
    return f"{head}: {tail}" if tail else head
