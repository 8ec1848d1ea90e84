"""``isolate: process``: a python step's call in a fresh subprocess of its own.

The parent (`run_isolated`) starts ``sys.executable -m storyflow.agents._isolated`` the
way the command agent starts a command — its own process group, recorded while it runs
(`storyflow.agents._groups`), SIGKILLed if storyflow dies, the group stopped on
timeout or cancellation — with a minimal environment: PATH, HOME, LANG, LC_ALL, TMPDIR
and only the step's declared secrets (also in ``context.secrets``). The child imports
the callable with the workflow's folder importable, as the python agent does in
process (it *is* the python agent, run in the child: the same argument checks, error
fence and traceback of the user's frames).

The protocol: the request goes in as one JSON document on stdin (the ``with`` keys
without ``isolate``, the workflow and run folders, the step's ids, the names of its
secrets). The child moves its stdout aside for the answer and points file descriptor 1
at stderr, so whatever the call prints — ``print``, ``context.log``, a C extension, a
subprocess — comes back on stderr, line by line, into the step's log. The answer is one
JSON document on the stdout it kept: ``{"output": …}`` or ``{"error": {"class",
"error_class", "message", "hint", "traceback", "retry_after_s"}}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import storyflow
from storyflow.agents.base import Call
from storyflow.agents.capture import StepLog
from storyflow.agents.command_agent import (
    PASSED_ENV,
    _communicate,
    _exit_message,
    _spawn,
    _tail,
)
from storyflow.errors import (
    BudgetExceeded,
    InvalidOutput,
    PermanentError,
    StepFailure,
    StepTimeout,
    TransientError,
)
from storyflow.events import ErrorClass

_ROOT = str(Path(storyflow.__file__).resolve().parent.parent)
"""The folder storyflow imports from, for the child (unless it is site-packages)."""
_FAILURES: dict[str, type[StepFailure]] = {
    c.__name__: c
    for c in (PermanentError, TransientError, StepTimeout, InvalidOutput, BudgetExceeded)
}
"""The failures a child's answer names that come back as themselves."""


# -- the parent ------------------------------------------------------------------------------
async def run_isolated(call: Call, spec: str) -> Any:
    """Run the python call ``spec`` of ``call`` in a fresh subprocess; its output."""
    request = {
        "inputs": {k: v for k, v in call.inputs.items() if k != "isolate"},
        "workflow_dir": str(call.workflow_dir),
        "run_dir": str(call.run_dir),
        "run_id": call.run_id,
        "step_id": call.step_id,
        "attempt": call.attempt,
        "seed": call.seed,
        "secrets": sorted(call.secrets),
    }
    data = json.dumps(request, ensure_ascii=False).encode("utf-8")
    argv = [sys.executable, "-m", "storyflow.agents._isolated"]
    proc = await _spawn(argv, child_env(call.secrets), call.workflow_dir, piped_stdin=True)
    log = StepLog(call.log)
    try:
        stdout, err_end = await _communicate(proc, data, call.timeout_s, log)
    except StepTimeout:
        raise StepTimeout(
            f"{spec} timed out after {call.timeout_s:g}s; its process was killed"
        ) from None
    finally:
        log.close()
    try:
        answer = json.loads(stdout.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or not ("output" in answer or "error" in answer):
        code = proc.returncode
        assert code is not None
        head = _exit_message(code, _tail(err_end)).replace("command", "process", 1)
        raise PermanentError(
            f"the isolated process of {spec} gave no answer: {head}",
            hint="it ended before the call returned (os._exit, a crash, a signal)",
        )
    if "error" in answer:
        raise _failure(answer["error"])
    return answer["output"]


def child_env(secrets: dict[str, str]) -> dict[str, str]:
    """What the child sees: a minimal environment plus the step's declared secrets."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    if os.path.basename(_ROOT) not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = _ROOT
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(secrets)
    return env


def _failure(error: Any) -> StepFailure:
    if not isinstance(error, dict):
        return PermanentError(f"the isolated process answered a bad error: {error!r}")
    message = str(error.get("message") or "the call failed")
    hint = error.get("hint") if isinstance(error.get("hint"), str) else None
    tb = error.get("traceback") if isinstance(error.get("traceback"), str) else None
    after = error.get("retry_after_s")
    retry_after_s = float(after) if isinstance(after, int | float) else None
    cls = _FAILURES.get(str(error.get("class")))
    if cls is not None:
        return cls(message, hint=hint, traceback=tb, retry_after_s=retry_after_s)
    try:
        error_class = ErrorClass(str(error.get("error_class")))
    except ValueError:
        error_class = ErrorClass.PERMANENT
    return StepFailure(message, hint=hint, traceback=tb, retry_after_s=retry_after_s,
                       error_class=error_class)


# -- the child ---------------------------------------------------------------------------------
def main() -> None:
    """Read the request, make the call, answer on the stdout kept aside, exit."""
    answer_fd = os.dup(1)  # not inheritable: the call's own subprocesses do not hold it
    os.dup2(2, 1)  # everything printed to fd 1 from now on goes to the step's log
    err = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            err.write(line + "\n")
            err.flush()

    try:
        answer = _answer(json.loads(sys.stdin.buffer.read().decode("utf-8")), log)
        text = json.dumps(answer, ensure_ascii=False, allow_nan=False)
    except BaseException as exc:  # a bad request, an unexpected failure
        text = json.dumps({"error": {
            "class": "PermanentError",
            "message": f"the isolated process failed: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }})
    for stream in (sys.stdout, sys.stderr, err):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    with os.fdopen(answer_fd, "wb") as out:
        out.write(text.encode("utf-8"))
    os._exit(0)  # threads the call left behind do not hold the step


def _answer(request: dict[str, Any], log: Any) -> dict[str, Any]:
    from storyflow.agents.python_agent import PythonAgent

    names = request.get("secrets") or []
    call = Call(
        run_id=request["run_id"],
        step_id=request["step_id"],
        attempt=int(request["attempt"]),
        inputs=dict(request["inputs"]),
        workflow_dir=Path(request["workflow_dir"]),
        run_dir=Path(request["run_dir"]),
        secrets={n: os.environ[n] for n in names if n in os.environ},
        timeout_s=None,  # the parent keeps the time
        log=log,
        seed=request.get("seed"),
    )
    try:
        return {"output": asyncio.run(PythonAgent().run(call))}
    except StepFailure as exc:
        return {"error": {
            "class": _known(exc),
            "error_class": str(exc.error_class),
            "message": exc.message,
            "hint": getattr(exc, "hint", None),
            "traceback": exc.traceback,
            "retry_after_s": exc.retry_after_s,
        }}


def _known(exc: StepFailure) -> str:
    """The nearest class of ``exc`` the parent rebuilds (a user's StepFailure subclass
    comes back as the storyflow class it derives from)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _FAILURES and cls is _FAILURES[cls.__name__]:
            return cls.__name__
    return "StepFailure"


if __name__ == "__main__":
    main()
