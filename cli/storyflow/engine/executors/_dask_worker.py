"""The workers' side of the Dask executor, and what travels to the workers.

What the workers run, from their own storyflow install (Dask ships functions by
reference, by module path): `cancel_attempt` and `import_check` as they are
(``Client.run``), `attempt` inside the task `storyflow.engine.executors._dask.run_attempt`
(which tells it the worker's address), and `unpack_folder` inside the worker plugin
`_dask.WorkflowFolder`. This module does not import ``distributed``: `_dask`, the only
one that does, holds what needs it.

An attempt travels as a `Payload`: its inputs and output as JSON text, its secrets in a
field no ``repr`` shows (Dask logs a failed task's arguments by their ``repr``; the
task key names only the run, the step instance and the attempt). ``attempt`` never
raises: a failure comes back as data, so nothing of the attempt reaches a worker's log.

A workflow's folder travels zipped (`zip_folder`, on the coordinator) and is unpacked on
every worker by content digest (`unpack_folder`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storyflow.agents.base import Call
from storyflow.errors import PermanentError, StepFailure
from storyflow.events import ErrorClass

SKIPPED = frozenset({
    ".git", ".hg", ".storyflow", ".venv", "venv", "__pycache__", "node_modules",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox",
})
"""Folders of a workflow's folder that are not shipped to workers."""
MAX_FOLDER_BYTES = 64 * 1024 * 1024
"""The most a workflow's folder may weigh, zipped, to be shipped to workers."""
_RUNNING: dict[str, tuple[asyncio.Task[Any], list[dict[str, Any]]]] = {}
"""On a worker: the attempts running, by task key, each with the usage its agent has
metered so far (for `cancel_attempt`)."""
CANCEL_SETTLE_S = 3.0
"""How long `cancel_attempt` waits for a cancelled attempt to unwind and meter what it
spent (a stream cut by the cancellation is billed, and counted)."""
_FOLDERS: dict[str, Path] = {}
"""On a worker: shipped workflow folders, by content digest."""


# -- what travels ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Payload:
    """One attempt, as a worker receives it. Its ``repr`` names the step only."""

    key: str
    kind: str
    run_id: str
    step_id: str
    attempt: int
    inputs_json: str
    folder: str
    """The content digest of the workflow's folder (see `zip_folder`)."""
    run_dir: str
    output_schema: dict[str, Any] | None
    seed: int | None
    cache: bool
    """Whether the agent may store call-cache entries (sent back to the coordinator)."""
    environ: dict[str, str]
    """The coordinator's values of the variables the agent reads (`Call.environ`)."""
    secrets: dict[str, str] = field(repr=False)

    def __repr__(self) -> str:
        return f"<storyflow attempt {self.step_id} #{self.attempt} ({self.kind})>"


def zip_folder(folder: Path, private: tuple[Path, ...] = ()) -> tuple[str, bytes]:
    """``(digest, zip bytes)`` of a workflow's folder, without state, caches and VCS, and
    without the ``private`` folders (the state directory)."""
    buf = io.BytesIO()
    h = hashlib.sha256()
    hidden = {p.resolve() for p in private}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(
                d for d in dirs
                if d not in SKIPPED and (Path(root) / d).resolve() not in hidden
            )
            for name in sorted(files):
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = Path(root) / name
                if not path.is_file():
                    continue
                rel = path.relative_to(folder).as_posix()
                data = path.read_bytes()
                h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
                z.writestr(rel, data)
                if buf.tell() > MAX_FOLDER_BYTES:
                    raise PermanentError(
                        f"the workflow folder {folder} is over "
                        f"{MAX_FOLDER_BYTES // 2**20} MiB zipped: too big to ship to workers",
                        hint="keep large data out of the workflow's folder and read it "
                        "from storage every worker reaches",
                    )
    return h.hexdigest(), buf.getvalue()


def unpack_folder(local_directory: Path, digest: str, data: bytes) -> None:
    """Unpack a zipped workflow's folder (`zip_folder`) under a worker's local directory,
    by content digest, unless this machine has it already; `attempt` finds it there."""
    root = local_directory / "storyflow-folders" / digest
    if not root.is_dir():
        tmp = root.with_name(f"{root.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            z.extractall(tmp)
        try:
            os.replace(tmp, root)
        except OSError:  # another process of this machine unpacked it first
            pass
    _FOLDERS[digest] = root


# -- the workers' side ---------------------------------------------------------------------
async def cancel_attempt(key: str) -> list[dict[str, Any]] | None:
    """Cancel the attempt ``key`` if it runs on this worker (run by ``Client.run``, on
    the worker's event loop); once it has unwound, what its agent metered — the
    coordinator counts it, as it would have had the attempt ended. None when the attempt
    does not run here."""
    entry = _RUNNING.get(key)
    if entry is None:
        return None
    task, usage = entry
    if task.get_loop() is not asyncio.get_running_loop():
        task.get_loop().call_soon_threadsafe(task.cancel)
        return []
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_SETTLE_S)
    return list(usage)


def import_check(digest: str, specs: list[str]) -> dict[str, str | None]:
    """For ``doctor``: each python ``callable`` → None if it imports here, else why not."""
    from storyflow.agents.python_agent import _resolve

    folder = _FOLDERS.get(digest)
    out: dict[str, str | None] = {}
    for spec in specs:
        if folder is None:
            out[spec] = "the workflow folder has not reached this worker"
            continue
        try:
            _resolve(folder, spec)
            out[spec] = None
        except StepFailure as exc:
            out[spec] = exc.message
    return out


class _Recorder:
    """The call cache on a worker: nothing is found there; what the agent stores is
    sent back and stored by the coordinator."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, Any]] = []

    def get(self, key: str) -> tuple[bool, Any]:
        return False, None

    def put(self, key: str, value: Any) -> None:
        self.puts.append((key, value))


async def attempt(p: Payload, worker: str) -> dict[str, Any]:
    """Run one attempt on this worker (its address: ``worker``); the outcome as data
    (never raises)."""
    from storyflow.agents import registry

    out: dict[str, Any] = {"worker": worker, "host": socket.gethostname(),
                           "pid": os.getpid(), "logs": [], "usage": [], "puts": []}
    folder = _FOLDERS.get(p.folder)
    if folder is None:
        out["error"] = {"class": ErrorClass.TRANSIENT.value,
                        "message": f"the workflow folder has not reached worker {worker}"}
        return out
    recorder = _Recorder() if p.cache else None
    call = Call(
        run_id=p.run_id,
        step_id=p.step_id,
        attempt=p.attempt,
        inputs=json.loads(p.inputs_json),
        workflow_dir=folder,
        run_dir=Path(p.run_dir),
        secrets=dict(p.secrets),
        timeout_s=None,  # the coordinator times the attempt, dispatch included
        output_schema=p.output_schema,
        log=out["logs"].append,
        seed=p.seed,
        meter=out["usage"].append,
        cache=recorder,
        environ=p.environ or None,
    )
    task = asyncio.ensure_future(registry.get(p.kind).run(call))
    _RUNNING[p.key] = task, out["usage"]
    try:
        output = await task
        out["output"] = json.dumps(output, ensure_ascii=False, allow_nan=False)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the worker itself is closing
        out["cancelled"] = True
    except StepFailure as exc:
        out["error"] = _error_of(exc)
    except (TypeError, ValueError, RecursionError) as exc:
        out["error"] = {"class": ErrorClass.INVALID_OUTPUT.value,
                        "message": f"the output is not JSON-serialisable: {exc}"}
    except Exception as exc:  # an agent bug fails the step, not the worker
        out["error"] = {"class": ErrorClass.PERMANENT.value,
                        "message": f"{type(exc).__name__}: {exc}"}
    finally:
        _RUNNING.pop(p.key, None)
        if recorder is not None:
            out["puts"] = recorder.puts
    return out


def _error_of(exc: StepFailure) -> dict[str, Any]:
    error: dict[str, Any] = {"class": exc.error_class.value, "message": exc.message}
    if exc.hint:
        error["hint"] = exc.hint
    if exc.retry_after_s is not None:
        error["retry_after_s"] = exc.retry_after_s
    if exc.traceback:
        error["traceback"] = exc.traceback
    return error
