"""The ``command`` agent: one subprocess per attempt, in its own process group.

``with: {run: [argv...] | "shell string", stdin, env, output: text|json, cwd}``. A list
runs without a shell; only a string goes through ``/bin/sh -c``. The child sees a
minimal environment (PATH, HOME, LANG, LC_ALL, TMPDIR) plus ``with.env`` plus the
agent's declared secrets — nothing else of ours leaks.

Exit 0 succeeds, exit 75 (EX_TEMPFAIL) is transient, any other exit is permanent and
carries the tail of stderr. On timeout or cancellation the whole process group gets
SIGTERM, then SIGKILL after a grace period, so no grandchild outlives its step.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storyflow.agents.base import Call
from storyflow.errors import InvalidOutput, PermanentError, StepTimeout, TransientError

EXIT_TEMPFAIL = 75
KILL_GRACE_S = 2.0
"""Seconds between SIGTERM and SIGKILL of a command's process group."""
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
"""The only variables of our own environment a command inherits."""
_TAIL_LINES = 20
_TAIL_CHARS = 2000
_DRAIN_S = 2.0


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
        stdout, stderr = await _communicate(proc, stdin, call.timeout_s)
        err_text = stderr.decode("utf-8", errors="replace")
        tail = _tail(err_text)
        if tail:
            call.log(tail)
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


async def _communicate(
    proc: asyncio.subprocess.Process, stdin: bytes | None, timeout_s: float | None
) -> tuple[bytes, bytes]:
    """Feed stdin, collect stdout/stderr; on timeout or cancellation kill the group."""
    io = asyncio.ensure_future(proc.communicate(stdin))
    try:
        return await asyncio.wait_for(asyncio.shield(io), timeout_s)
    except TimeoutError:
        await _stop(proc, io)
        raise StepTimeout(f"command timed out after {timeout_s:g}s") from None
    except asyncio.CancelledError:
        await _stop(proc, io)
        raise


async def _stop(proc: asyncio.subprocess.Process, io: asyncio.Future[tuple[bytes, bytes]]) -> None:
    """SIGTERM the group, wait up to the grace period, SIGKILL it, reap the child.

    The child leads its own group (``start_new_session``), so its pid is the group id,
    which stays valid for signalling stragglers even after the leader has been reaped.
    """
    pgid = proc.pid
    try:
        _signal_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
        except TimeoutError:
            pass
    finally:
        # Also runs when the grace wait is itself cancelled (a second Ctrl-C).
        _signal_group(pgid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()
        await _drain(io)


async def _drain(io: asyncio.Future[tuple[bytes, bytes]]) -> None:
    """Let the I/O task see EOF so the pipes close; give up if an escapee holds them."""
    try:
        await asyncio.wait_for(io, _DRAIN_S)
    except Exception:  # cleanup only: the outcome was decided already
        pass
    finally:
        io.cancel()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


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
