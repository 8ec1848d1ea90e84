"""Executors: where an attempt's work runs. The scheduler never knows which.

The runner hands every attempt to an agent; an executor decides which object that is
(`Executor.agent`). `local` hands back the agent itself, so a local run pays nothing
for the seam. `dask` hands back, for the kinds that run on workers (``python``,
``command``, ``builtin/grammar``, and ``llm`` with ``executor.llm: workers``), a proxy
with the same `Agent` protocol that sends the attempt to a Dask worker and translates
what comes back; ``template``, ``human``, ``workflow`` and third-party kinds stay on the
coordinator. Everything the scheduler decides — pools, budgets, breakers, retries,
checkpoints — is decided before the proxy is called, so it holds across the cluster.

``distributed`` is an optional extra, imported only by `storyflow.engine.executors._dask`
and only when a run uses it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from storyflow.agents.base import Agent
from storyflow.errors import UsageError

__all__ = [
    "LOCAL",
    "Executor",
    "LocalExecutor",
    "Setting",
    "agent_for",
    "open_executor",
    "require_dask",
    "setting",
]

INSTALL_HINT = "pip install 'storyflow[dask]' (it installs dask.distributed)"


@dataclass(frozen=True, slots=True)
class Setting:
    """Which executor a run uses, resolved from ``--executor`` and the workflow's
    ``executor:``."""

    kind: str = "local"
    """``local`` or ``dask``."""
    address: str | None = None
    """The Dask scheduler's address; None starts a temporary local cluster."""
    workers: int | None = None
    """Worker processes of a temporary local cluster (None: the number of cores)."""
    threads: int = 1
    """Threads per worker of a temporary local cluster."""
    llm_on_workers: bool = False
    """``executor.llm: workers``: ``llm`` steps run on workers too."""
    connect_timeout_s: float = 10.0
    """How long to wait for the scheduler to answer."""

    def describe(self) -> str:
        """``local``, ``dask (local cluster)`` or ``dask tcp://…``."""
        if self.kind == "local":
            return "local"
        return f"dask {self.address}" if self.address else "dask (local cluster)"


LOCAL_SETTING = Setting()


def _address(value: Any, where: str) -> Any:
    """``value`` when it can be a scheduler address: a usage error before anything is
    recorded, not a run failed at connect (``tcp://HOST:port``, ``tcp://[::1``)."""
    if not isinstance(value, str) or "://" not in value:
        return value
    from urllib.parse import urlsplit

    try:
        urlsplit(value).port  # noqa: B018  (a port that is not 0-65535 raises)
    except ValueError as exc:
        raise UsageError(f"{where} {value!r} is not a scheduler address ({exc})",
                         hint="e.g. tcp://127.0.0.1:8786") from exc
    return value


def setting(written: Any, option: str | None = None) -> Setting:
    """The executor of a run: ``--executor local|dask|tcp://HOST:PORT`` (``option``) over
    the workflow's ``executor:`` (``written``, already validated by the schema).

    ``--executor dask`` keeps the workflow's Dask settings; an address given on the
    command line replaces the workflow's.
    """
    from storyflow.spec.units import duration_s

    kind = "local"
    dask: dict[str, Any] = {}
    llm = "coordinator"
    if isinstance(written, str):
        kind = written
    elif isinstance(written, dict):
        if "dask" in written:
            kind, dask = "dask", dict(written.get("dask") or {})
        llm = written.get("llm", llm)
    if option is not None:
        if option == "local":
            kind = "local"
        elif option == "dask":
            kind = "dask"
        elif "://" in option and option.split("://", 1)[1]:
            kind, dask = "dask", {**dask, "address": _address(option, "--executor")}
        else:
            raise UsageError(
                f"--executor {option!r} is not local, dask or a scheduler address",
                hint="e.g. --executor dask (a temporary local cluster) or "
                "--executor tcp://127.0.0.1:8786",
            )
    if kind == "local":
        return LOCAL_SETTING
    if option is None or "://" not in option:
        _address(dask.get("address"), "executor.dask.address")
    timeout = dask.get("connect_timeout")
    return Setting(
        kind="dask",
        address=dask.get("address"),
        workers=dask.get("workers"),
        threads=int(dask.get("threads") or 1),
        llm_on_workers=llm == "workers",
        connect_timeout_s=duration_s(timeout) if timeout is not None else 10.0,
    )


def require_dask(chosen: Setting) -> None:
    """Refuse a Dask run when the ``dask`` extra is missing or broken (exit 2), before
    anything of the run is created."""
    if chosen.kind != "dask":
        return
    try:
        importlib.import_module("distributed")
    except ImportError as exc:
        raise UsageError(
            f"the dask executor needs dask.distributed, which cannot be imported ({exc})",
            hint=INSTALL_HINT,
        ) from exc


class Executor(Protocol):
    """Where the attempts of a run (and of its child runs) run."""

    @property
    def setting(self) -> Setting:
        """What it was opened with."""
        ...

    def agent(self, kind: str, agent: Agent) -> Agent:
        """The object an attempt of ``kind`` is handed to: ``agent`` itself, or a proxy
        that runs it elsewhere."""
        ...

    async def start(self) -> dict[str, Any]:
        """Connect (or start a cluster); what the run's ``run.started`` event says of it:
        ``{"kind", "address", "workers": [...]}``. Raises `StepFailure` subclasses (a
        transient failure when the cluster cannot be reached)."""
        ...

    async def close(self) -> None:
        """Disconnect (and stop a cluster the run started)."""
        ...


def agent_for(executor: Executor, kind: str) -> Agent:
    """What an attempt of ``kind`` is handed to: its agent, or the executor's proxy of
    it that runs it elsewhere."""
    from storyflow.agents import registry

    return executor.agent(kind, registry.get(kind))


class LocalExecutor:
    """Every attempt runs in this process: the agent itself is handed every attempt."""

    setting = LOCAL_SETTING

    def agent(self, kind: str, agent: Agent) -> Agent:
        return agent

    async def start(self) -> dict[str, Any]:
        return {"kind": "local"}

    async def close(self) -> None:
        return None


LOCAL = LocalExecutor()
"""The default executor (stateless, shared)."""


def open_executor(
    chosen: Setting, private: tuple[Path, ...] = (), *, verbose: bool = False
) -> Executor:
    """The executor for ``chosen`` (not started yet). Folders in ``private`` (the state
    directory) are never shipped to workers; ``verbose`` (``--debug``) lets the cluster
    library's own log through."""
    if chosen.kind == "local":
        return LOCAL
    require_dask(chosen)
    from storyflow.engine.executors._dask import DaskExecutor

    return DaskExecutor(chosen, private, verbose=verbose)
