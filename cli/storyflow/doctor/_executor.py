"""Checks of the executor a workflow runs on: the Dask cluster answers, has workers, every
worker runs this storyflow, and every worker can import each python step's callable.

The cluster is reached exactly as a run reaches it (`storyflow.engine.executors._dask`
`probe`: a temporary local cluster is started, and stopped after the checks; a
scheduler address is connected to). ``distributed`` is an optional extra: it is
imported only here, only when the executor is ``dask``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from storyflow.doctor._check import Check

_INSTALL = "pip install 'storyflow[dask]'"
_SHOWN = 3
"""Failing workers named per line; the rest are counted."""


def executor_checks(
    written: Any, option: str | None, folder: Path | None, callables: Sequence[str]
) -> list[Check]:
    """The checks of the executor set by ``option`` (``--executor``) over ``written`` (the
    workflow's ``executor:``); none for a local executor. ``folder`` is shipped to the
    workers as a run ships it (None: an empty folder, when there is no workflow)."""
    from storyflow.engine.executors import Setting, setting

    chosen: Setting = setting(written, option)
    if chosen.kind != "dask":
        return []
    if importlib.util.find_spec("distributed") is None:
        return [Check("executor", "fail", "the workflow runs on dask, but dask.distributed "
                      "is not installed", _INSTALL)]
    from storyflow.errors import StepFailure

    try:
        from storyflow.engine.executors import _dask
    except ImportError as exc:
        return [Check("executor", "fail", f"dask.distributed cannot be imported: {exc}",
                      _INSTALL)]
    try:
        if folder is None:
            with tempfile.TemporaryDirectory(prefix="storyflow-doctor-") as empty:
                found = asyncio.run(_dask.probe(chosen, Path(empty), list(callables)))
        else:
            found = asyncio.run(_dask.probe(chosen, folder, list(callables)))
    except StepFailure as exc:
        return _unusable(chosen, exc)
    return _usable(chosen, found, callables)


def _reached(chosen: Any, address: str | None = None) -> str:
    """What the ``executor`` line says once the cluster answered."""
    if chosen.address is None:
        at = f" at {address}" if address else ""
        return f"a temporary local cluster{at} started (and stopped after the checks)"
    return f"the scheduler at {address or chosen.address} answers"


def _unusable(chosen: Any, exc: Any) -> list[Check]:
    """The cluster could not be used: why, on the line of what failed."""
    fix = exc.hint or ""
    if type(exc.__cause__).__name__ == "WorkerStartTimeoutError":
        return [
            Check("executor", "ok", _reached(chosen)),
            Check("executor: workers", "warn",
                  f"no worker joined within {chosen.connect_timeout_s:g}s",
                  f"start workers with `dask worker {chosen.address or 'SCHEDULER'}`"),
        ]
    if exc.__cause__ is None and exc.message.startswith("worker "):  # start()'s own checks
        return [
            Check("executor", "ok", _reached(chosen)),
            Check("executor: storyflow version", "fail", exc.message, fix),
        ]
    if exc.error_class.value == "transient":  # not reached: the run's hint speaks of resume
        fix = (f"start one with `dask scheduler` and `dask worker {chosen.address or 'ADDRESS'}`"
               ", or check the address and `executor.dask.connect_timeout`")
    return [Check("executor", "fail", exc.message, fix)]


def _usable(chosen: Any, found: Mapping[str, Any], callables: Sequence[str]) -> list[Check]:
    from storyflow import __version__
    from storyflow.ui.lines import UNICODE, worker_label, workers_text

    address = str(found.get("address") or chosen.address or "?")
    infos: Mapping[str, Any] = found.get("workers") or {}
    checks = [Check("executor", "ok", _reached(chosen, address))]
    if not infos:
        checks.append(Check("executor: workers", "warn", "the scheduler has no workers",
                            f"start workers with `dask worker {address}`"))
        return checks
    names = [worker_label(w) for w in infos]
    checks.append(Check("executor: workers", "ok", workers_text(names, len(names), UNICODE)))

    broken = {w: i for w, i in infos.items() if not isinstance(i, Mapping)}
    other = {w: i.get("storyflow") for w, i in infos.items()
             if isinstance(i, Mapping) and i.get("storyflow") != __version__}
    if broken or other:
        problems = [f"{worker_label(w)}: {why}" for w, why in broken.items()]
        problems += [f"{worker_label(w)} runs storyflow {v}" for w, v in other.items()]
        checks.append(Check("executor: storyflow version", "fail",
                            _some(problems) + f" (this is storyflow {__version__})",
                            f"install storyflow=={__version__} (with the same extras) in "
                            "every worker's environment"))
    else:
        pythons = sorted({str(i.get("python")) for i in infos.values()})
        checks.append(Check("executor: storyflow version", "ok",
                            f"every worker runs storyflow {__version__} "
                            f"(python {', '.join(pythons)})"))

    note = found.get("note")
    if note:
        detail, _, fix = str(note).partition("; ")
        fix = fix.replace("start it with ", "start the scheduler with ", 1)
        checks.append(Check("executor: lost workers", "warn", detail, fix))

    imports: Mapping[str, Mapping[str, str | None]] = found.get("imports") or {}
    for spec in callables:
        answers = imports.get(spec) or {}
        why_not: dict[str, list[str]] = {}
        for w, why in answers.items():
            if why:
                why_not.setdefault(why, []).append(worker_label(w))
        failing = [f"{why} ({_some(where, ', ')})" for why, where in why_not.items()]
        n_failing = sum(len(where) for where in why_not.values())
        label = f"executor: imports {spec}"
        if not answers:
            checks.append(Check(label, "warn", "no worker answered", "run the doctor again"))
        elif failing:
            checks.append(Check(
                label, "fail",
                f"does not import on {n_failing} of {len(answers)} "
                f"worker{'s' if len(answers) != 1 else ''}: " + _some(failing),
                "the workflow's folder is shipped to every worker; a module from anywhere "
                "else must be installed in every worker's environment",
            ))
        else:
            n = len(answers)
            where = "the worker" if n == 1 else f"all {n} workers"
            checks.append(Check(label, "ok", f"imports on {where}"))
    return checks


def _some(problems: Sequence[str], sep: str = "; ") -> str:
    shown = sep.join(problems[:_SHOWN])
    more = len(problems) - _SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")
