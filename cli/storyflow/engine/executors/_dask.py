"""The Dask executor: attempts run on the workers of a ``dask.distributed`` cluster.

The only module that imports ``distributed``. The coordinator's side lives here
(`DaskExecutor`, `RemoteAgent`): connect to a scheduler or start a temporary
`LocalCluster`, check that every worker runs this storyflow (`worker_info`), ship the
workflow's folder to the workers (`WorkflowFolder`, a Dask worker plugin), submit one
task per attempt (`run_attempt`) and translate what comes back. What runs on the
workers, and what travels to them (the attempt's `Payload`, the zipped folder), is
`storyflow.engine.executors._dask_worker`'s; the workers import those functions by
name from their own storyflow install.

What Dask decides is Dask's: where a task runs, worker liveness, transport. A worker
that dies mid-attempt reaches the coordinator as Dask's ``KilledWorker`` once the
scheduler gives up on the task — at once with ``allowed-failures: 0``, which the
temporary cluster sets (an external scheduler re-runs the task itself that many times
first; ``start`` reports it) — and becomes `WorkerLost`, a transient failure the step's
retry policy runs again. Dask cannot stop a running task, so a cancelled attempt is
also cancelled on its worker (`cancel_attempt`): a command's process group is killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import platform
import re
import socket
import uuid
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

import storyflow
from storyflow.agents.base import Agent, Call
from storyflow.engine.executors import Setting
from storyflow.engine.executors._dask_worker import (
    Payload,
    attempt,
    cancel_attempt,
    import_check,
    unpack_folder,
    zip_folder,
)
from storyflow.errors import (
    InvalidOutput,
    PermanentError,
    StepFailure,
    TransientError,
    WorkerLost,
)
from storyflow.events import ErrorClass

REMOTE_KINDS = frozenset({"python", "command", "builtin/grammar"})
"""Kinds whose attempts run on workers (``llm`` too with ``executor.llm: workers``)."""
CANCEL_WAIT_S = 5.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class WorkflowFolder(WorkerPlugin):
    """A workflow's folder, zipped, unpacked on every worker (those that join later too)
    under the worker's local directory, by content digest: no shared filesystem, and two
    versions of a folder never mix.

    Dask's own `UploadDirectory` reaches only workers with a nanny, unpacks by the
    folder's base name (two projects' ``workflows/`` would overwrite each other) and
    leaves the path to guess; this plugin, keyed by content, tells `run_attempt`
    exactly where the folder is (`_dask_worker.unpack_folder` does the unpacking)."""

    def __init__(self, digest: str, data: bytes) -> None:
        self.digest = digest
        self.data = data
        self.name = f"storyflow-folder-{digest[:20]}"
        self.idempotent = True  # registered once per content, whoever asks again

    def setup(self, worker: Any) -> None:
        unpack_folder(Path(worker.local_directory), self.digest, self.data)


# -- what the workers run by this module's name --------------------------------------------
def worker_info() -> dict[str, Any]:
    """What a worker runs: checked when a run connects. (Here, at the address every
    storyflow version's workers know, so that a mismatched install is reported as one.)"""
    return {
        "storyflow": storyflow.__version__,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


async def run_attempt(p: Payload) -> dict[str, Any]:
    """Run one attempt on this worker; the outcome as data (never raises). The task
    `RemoteAgent` submits: `_dask_worker.attempt`, told the worker's address."""
    return await attempt(p, get_worker().address)


CLIENT_SEND_INTERVAL_S = 0.002
"""How long the client may hold a submission to batch it with others. Dask's default
(10 ms) suits a notebook sending thousands of tasks at once; a run submits attempts one
by one as steps become ready, and a chain of steps would wait out the whole interval
at every step (measured: 10.6 → 5.6 ms per round trip on a 2-core machine)."""


def _prompt_stream(stream: Any) -> None:
    """Shorten one of Dask's batched streams' interval (see `CLIENT_SEND_INTERVAL_S`),
    where this version of Dask has one."""
    if stream is not None and isinstance(getattr(stream, "interval", None), (int, float)):
        stream.interval = min(stream.interval, CLIENT_SEND_INTERVAL_S)


def _prompt(client: Any) -> None:
    """The client's stream to the scheduler."""
    _prompt_stream(getattr(client, "scheduler_comm", None))


def _prompt_worker(dask_worker: Any) -> None:
    """A worker's stream to the scheduler (run on the workers of a cluster the run
    started; another's cluster is left as its owner set it up)."""
    _prompt_stream(getattr(dask_worker, "batched_stream", None))


def _quiet(level: int) -> None:
    """Raise the level of Dask's loggers (each has its own, set by Dask's config) and of
    the handler they share."""
    root = logging.getLogger("distributed")
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(level)
    for handler in root.handlers:
        handler.setLevel(level)


def _allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)


# -- the coordinator's side ---------------------------------------------------------------
class DaskExecutor:
    """Runs the worker kinds' attempts on a Dask cluster; see the module docstring."""

    def __init__(
        self, chosen: Setting, private: tuple[Path, ...] = (), *, verbose: bool = False
    ) -> None:
        self.setting = chosen
        self.private = private
        self.verbose = verbose
        self.client: Any = None
        self.cluster: Any = None
        self.lost: str | None = None
        """Why the cluster cannot be used any more (the scheduler went away)."""
        self._proxies: dict[str, RemoteAgent] = {}
        self._folders: dict[Path, asyncio.Task[str]] = {}

    def agent(self, kind: str, agent: Agent) -> Agent:
        if kind not in REMOTE_KINDS and not (kind == "llm" and self.setting.llm_on_workers):
            return agent
        proxy = self._proxies.get(kind)
        if proxy is None:
            proxy = self._proxies[kind] = RemoteAgent(self, kind, agent)
        return proxy

    async def start(self) -> dict[str, Any]:
        s = self.setting
        # Dask's own log (reconnection attempts, a worker's removal) is not for the
        # user: what matters reaches them as step failures. `--debug` lets it through.
        _quiet(logging.WARNING if self.verbose else logging.CRITICAL)
        where = s.address or "a local cluster"
        try:
            if s.address is None:
                self.cluster = await LocalCluster(  # type: ignore[no-untyped-call]
                    n_workers=s.workers or os.cpu_count() or 1,
                    threads_per_worker=s.threads,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    asynchronous=True,
                    silence_logs=logging.WARNING if self.verbose else logging.CRITICAL,
                    # no fixed port for its HTTP endpoint: several runs may share a machine
                    scheduler_kwargs={"allowed_failures": 0, "dashboard_address": "127.0.0.1:0"},
                )
                self.client = await Client(  # type: ignore[no-untyped-call]
                    self.cluster, asynchronous=True, set_as_default=False
                )
            else:
                self.client = await asyncio.wait_for(
                    Client(  # type: ignore[no-untyped-call]
                        s.address, asynchronous=True, set_as_default=False,
                        timeout=s.connect_timeout_s,
                    ),
                    s.connect_timeout_s + 5,
                )
            _prompt(self.client)
            # Ours: every worker asked for (placement then spreads from the start);
            # another's: at least one.
            expected = len(self.cluster.workers) if self.cluster is not None else 1
            await self.client.wait_for_workers(expected, timeout=s.connect_timeout_s)
            infos = await self.client.run(worker_info, on_error="return")
            allowed = await self.client.run_on_scheduler(_allowed_failures)
            if self.cluster is not None:  # ours: its streams may be prompt too
                for stream in getattr(self.cluster.scheduler, "stream_comms", {}).values():
                    _prompt_stream(stream)
                await self.client.run(_prompt_worker, on_error="ignore")
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise TransientError(
                f"cannot reach the Dask scheduler at {where}: {type(exc).__name__}: {exc}",
                hint="start one with `dask scheduler` and `dask worker ADDRESS`, or check "
                "the address (run it again with `storyflow resume RUN` once it answers)",
            ) from exc
        except Exception as exc:  # a cluster that cannot start: Dask's words, no traceback
            await self.close()
            raise PermanentError(
                f"cannot start the Dask cluster at {where}: {type(exc).__name__}: {exc}",
                hint="check the executor settings; `storyflow doctor FILE` tries the cluster",
            ) from exc
        problems = []
        for addr, info in sorted(infos.items()):
            if isinstance(info, BaseException):
                problems.append(f"worker {addr} cannot run storyflow "
                                f"({type(info).__name__}: {info})")
            elif info.get("storyflow") != storyflow.__version__:
                problems.append(f"worker {addr} runs storyflow {info.get('storyflow')}, "
                                f"not {storyflow.__version__}")
        if problems:
            await self.close()
            raise PermanentError(
                "; ".join(problems),
                hint=f"install storyflow=={storyflow.__version__} (with the same extras) "
                "in every worker's environment",
            )
        described: dict[str, Any] = {
            "kind": "dask",
            "address": self.client.scheduler.address,
            "cluster": "local" if self.cluster is not None else "external",
            "workers": sorted(infos),
        }
        if allowed:
            described["note"] = (
                f"the scheduler re-runs an attempt whose worker died up to {allowed} times "
                "before storyflow sees worker_lost; start it with "
                "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 to let retry policies decide"
            )
        return described

    async def close(self) -> None:
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        for folder in self._folders.values():
            folder.cancel()
        try:
            if client is not None:
                await client.close()
            if cluster is not None:
                await cluster.close()
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass  # the cluster is gone already

    async def folder(self, workflow_dir: Path) -> str:
        """The digest of ``workflow_dir`` once every worker has it (shipped once a run)."""
        task = self._folders.get(workflow_dir)
        if task is None:
            task = self._folders[workflow_dir] = asyncio.ensure_future(
                self._ship(workflow_dir)
            )
        return await asyncio.shield(task)

    async def _ship(self, workflow_dir: Path) -> str:
        digest, data = await asyncio.to_thread(zip_folder, workflow_dir, self.private)
        await self.client.register_plugin(WorkflowFolder(digest, data))
        return digest

    def check_alive(self) -> None:
        if self.lost is None and (self.client is None or self.client.status != "running"):
            self.lost = "the connection to the Dask scheduler was lost"
        if self.lost is not None:
            raise TransientError(self.lost, hint="resume the run once the cluster is back")

    async def cancel(self, fut: Any, key: str) -> list[dict[str, Any]]:
        """Stop an attempt: drop its task, and cancel it on the worker running it; what
        the attempt metered there before it stopped (a cut stream is billed)."""
        client = self.client
        if client is None or client.status != "running":
            return []
        try:
            found, _ = await asyncio.wait_for(
                asyncio.gather(client.run(cancel_attempt, key, on_error="ignore"),
                               fut.cancel(), return_exceptions=True),
                CANCEL_WAIT_S,
            )
        except (TimeoutError, OSError):
            return []
        if not isinstance(found, dict):
            return []
        return [u for usage in found.values() if isinstance(usage, list) for u in usage]


class RemoteAgent:
    """An agent kind whose attempts run on the cluster: the `Agent` protocol, so the
    scheduler calls it as it calls any agent."""

    def __init__(self, executor: DaskExecutor, kind: str, local: Agent) -> None:
        self.ex = executor
        self.kind = kind
        self.required = local.required
        self.local = local
        self.environ_keys: tuple[str, ...] = getattr(local, "environ_keys", ())

    async def run(self, call: Call) -> Any:
        ex = self.ex
        ex.check_alive()
        cached = getattr(self.local, "cached", None)
        if cached is not None and call.cache is not None:
            hit, output = cached(call)  # answered here: no dispatch
            if hit:
                return output
        digest = await ex.folder(call.workflow_dir)
        key = f"storyflow-{_UNSAFE.sub('-', call.run_id)}-{_UNSAFE.sub('-', call.step_id)}" \
              f"-a{call.attempt}-{uuid.uuid4().hex[:8]}"
        # A worker cannot ask the budgets: what every model call of the attempt may use
        # (the repairs too) is reserved here, up front, at once; the hold goes once its
        # usage has been replayed below — or, on any failure, when the attempt ends.
        estimate = getattr(self.local, "estimate", None)
        needs = estimate(call) if estimate is not None else None
        release = await call.reserve(needs) if needs is not None else None
        payload = Payload(
            key=key,
            kind=self.kind,
            run_id=call.run_id,
            step_id=call.step_id,
            attempt=call.attempt,
            inputs_json=json.dumps(call.inputs, ensure_ascii=False),
            folder=digest,
            run_dir=str(call.run_dir),
            output_schema=call.output_schema,
            seed=call.seed,
            cache=call.cache is not None,
            environ={k: os.environ[k] for k in self.environ_keys if k in os.environ},
            secrets=dict(call.secrets),
        )
        fut = ex.client.submit(run_attempt, payload, key=key, pure=False, retries=0)
        try:
            out: dict[str, Any] = await fut
        except asyncio.CancelledError:
            # A timeout, a signal: stop it on its worker too, and count what it spent.
            for usage in await ex.cancel(fut, key):
                call.meter(usage)
            raise
        except concurrent.futures.CancelledError as exc:  # Dask dropped the task
            if "connection" in str(exc) or ex.client is None or ex.client.status != "running":
                ex.lost = "the connection to the Dask scheduler was lost during the attempt"
            raise TransientError(
                ex.lost or f"the Dask cluster cancelled the attempt: {exc}",
                hint="resume the run once the cluster is back",
            ) from exc
        except Exception as exc:
            raise _translate(exc, call) from exc
        finally:
            fut.release()
        call.placed(out["worker"])
        for line in out["logs"]:
            call.log(line)
        for usage in out["usage"]:
            call.meter(usage)
        if release is not None:
            release()
        if call.cache is not None:
            for k, v in out["puts"]:
                call.cache.put(k, v)
        error = out.get("error")
        if error is not None:
            raise StepFailure(
                error["message"],
                hint=error.get("hint"),
                retry_after_s=error.get("retry_after_s"),
                error_class=ErrorClass(error["class"]),
                traceback=error.get("traceback"),
            )
        if out.get("cancelled"):
            raise TransientError(f"the attempt was cancelled on worker {out['worker']}")
        return json.loads(out["output"])


def _translate(exc: Exception, call: Call) -> StepFailure:
    """A failure of the cluster (not of the step) as a step failure."""
    name = type(exc).__name__
    if name == "KilledWorker":
        last = exc.args[1] if len(exc.args) > 1 else None
        worker = getattr(last, "address", None) or (str(last) if last else "its worker")
        call.placed(worker)
        return WorkerLost(
            f"worker {worker} died while running the attempt",
            hint="the step's retry policy runs it again on another worker",
        )
    if isinstance(exc, (OSError, TimeoutError)) or name in ("CommClosedError",):
        return TransientError(f"the Dask cluster failed during the attempt: {name}: {exc}")
    if isinstance(exc, (TypeError, ValueError)):
        return InvalidOutput(f"the attempt's result could not be read: {name}: {exc}")
    return PermanentError(f"the Dask cluster failed the attempt: {name}: {exc}")


async def probe(chosen: Setting, folder: Path, callables: list[str]) -> dict[str, Any]:
    """For ``doctor``: connect as a run would and report what the cluster can do.

    ``{"address", "workers": {address: info or error text}, "imports": {callable:
    {worker: None or error text}}, "note"?}``; raises `StepFailure` as `start` does.
    """
    ex = DaskExecutor(chosen)
    try:
        described = await ex.start()
        digest = await ex.folder(folder)
        infos = await ex.client.run(worker_info, on_error="return")
        imports: dict[str, dict[str, str | None]] = {spec: {} for spec in callables}
        if callables:
            found = await ex.client.run(import_check, digest, callables, on_error="return")
            for worker, result in found.items():
                for spec in callables:
                    imports[spec][worker] = (
                        f"{type(result).__name__}: {result}"
                        if isinstance(result, BaseException) else result.get(spec)
                    )
        report: dict[str, Any] = {
            "address": described["address"],
            "workers": {w: i if isinstance(i, dict) else f"{type(i).__name__}: {i}"
                        for w, i in sorted(infos.items())},
            "imports": imports,
        }
        if "note" in described:
            report["note"] = described["note"]
        return report
    finally:
        await ex.close()
