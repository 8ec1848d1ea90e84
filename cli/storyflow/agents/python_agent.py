"""The ``python`` agent: calls ``with.callable: "package.module:function"``.

The workflow's folder is importable. Every other ``with`` key (and ``prompt``) is passed
as a keyword argument, except ``isolate`` and ``blocking``; a parameter named ``context``
receives a `StepContext`. ``isolate: process`` runs the call in a fresh subprocess with
a minimal environment and only the step's declared secrets (`storyflow.agents._isolated`).
Async functions are awaited on the loop; sync functions run on one shared thread pool
whose size the engine sets from ``--max-parallel`` — unless ``blocking: false`` says
the function is quick and never waits: then it is called on the event loop, saving
the thread hop (about 100 µs a call), and nothing else runs while it does.

This module is the fence for user code: StepFailure subclasses pass through,
``TimeoutError``/``ConnectionError`` become `TransientError`, anything else
`PermanentError`, always chained with ``from``, and each carries the traceback of the
user's frames (`user_traceback`). What the callable prints, and the `logging` records
that would reach the terminal, go to the attempt's log (`storyflow.agents.capture`).

The hot path (a resolved callable) does no import or signature work: one cache lookup,
a few set comparisons, the executor hop and a ``json.dumps`` of the output.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import inspect
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storyflow.agents.base import Call, StepContext
from storyflow.agents.capture import StepLog, capturing, install
from storyflow.errors import InvalidOutput, PermanentError, StepFailure, TransientError

DEFAULT_THREAD_POOL_SIZE = 8
_CALLABLE_HINT = 'write it as "package.module:function", e.g. "agents:outline"'

_pool_size = DEFAULT_THREAD_POOL_SIZE
_executor: ThreadPoolExecutor | None = None


def set_thread_pool_size(n: int) -> None:
    """Size of the pool sync callables run on (the engine passes ``--max-parallel``)."""
    global _executor, _pool_size
    if n < 1:
        raise ValueError(f"thread pool size must be at least 1, got {n}")
    if n != _pool_size and _executor is not None:
        _executor.shutdown(wait=False)  # work already submitted still finishes
        _executor = None
    _pool_size = n


_in_flight = [0]
"""Synchronous calls given to worker threads and not finished (a list: updated from
those threads)."""
_in_flight_lock = threading.Lock()


def calls_in_flight() -> int:
    """Synchronous calls given to a worker thread that have not finished, started or
    not yet: a step cancelled by its timeout or a signal leaves its thread running, for
    threads cannot be stopped, and a call its thread has just picked up can no longer be
    withdrawn."""
    return _in_flight[0]


def _done(_: Any) -> None:
    with _in_flight_lock:
        _in_flight[0] -= 1


async def _off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on the pool, counted in `calls_in_flight` from the moment it is
    submitted until it ends (or is withdrawn before it started)."""
    with _in_flight_lock:
        _in_flight[0] += 1
    try:
        future = _pool().submit(fn, *args)
    except BaseException:
        _done(None)
        raise
    future.add_done_callback(_done)
    return await asyncio.wrap_future(future)


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(_pool_size, thread_name_prefix="storyflow-python")
    return _executor


@dataclass(frozen=True, slots=True)
class _Target:
    """A resolved callable and what its signature allows, computed once."""

    spec: str
    fn: Callable[..., Any]
    is_async: bool
    wants_context: bool
    var_keyword: bool
    accepted: frozenset[str]
    """Names that can be passed by keyword (without ``context``)."""
    needed: frozenset[str]
    """Keyword names without a default (without ``context``)."""


_targets: dict[tuple[Path, str], _Target] = {}


def clear_cache() -> None:
    """Forget every resolved callable (the next call imports and inspects again)."""
    _targets.clear()


class PythonAgent:
    """Calls a Python function from the workflow's folder or the environment."""

    kind: str = "python"
    required: tuple[str, ...] = ("callable",)

    async def run(self, call: Call) -> Any:
        """Call the function once with the step's inputs; return its output."""
        inputs = call.inputs
        spec = inputs.get("callable")
        if not isinstance(spec, str):
            raise PermanentError("the python agent needs `with.callable`", hint=_CALLABLE_HINT)
        isolate = inputs.get("isolate")
        if isolate is not None:
            if isolate != "process":
                raise PermanentError(
                    f"`with.isolate` must be 'process', not {isolate!r}",
                    hint="isolate: process runs the call in a fresh subprocess; omit it "
                         "to run in storyflow's own process",
                )
            from storyflow.agents._isolated import run_isolated

            return await run_isolated(call, spec)
        install()  # before a module is imported: a handler it makes writes to the router
        target = _targets.get((call.workflow_dir, spec))
        if target is None:
            # Off the loop: a user module may take seconds to import.
            target = await _off_loop(_resolve, call.workflow_dir, spec)
            _targets[call.workflow_dir, spec] = target

        kwargs = dict(inputs)
        del kwargs["callable"]
        inline = kwargs.pop("blocking", True) is False
        if "blocking" in inputs and not isinstance(inputs["blocking"], bool):
            raise PermanentError(
                f"`with.blocking` must be true or false, not {inputs['blocking']!r}",
                hint="blocking: false runs a quick sync function on the event loop, "
                     "without a thread; omit it for anything that may wait",
            )
        _check_arguments(target, kwargs)
        output = StepLog(call.log)
        if target.wants_context:
            kwargs["context"] = StepContext.of(call, output.line)

        token = capturing.set(output)  # what the callable prints goes to the step's log
        try:
            if target.is_async:
                result = await target.fn(**kwargs)
            elif inline:  # it said it never waits: no thread hop (~100 µs a call)
                result = target.fn(**kwargs)
                if inspect.isawaitable(result):
                    result = await result
            else:
                result = await _off_loop(
                    contextvars.copy_context().run,  # the thread captures for this attempt
                    functools.partial(target.fn, **kwargs),
                )
                if inspect.isawaitable(result):
                    result = await result
        except StepFailure as exc:
            if exc.traceback is None:
                exc.traceback = user_traceback(exc, call.workflow_dir)
            raise
        except (TimeoutError, ConnectionError) as exc:
            raise TransientError(
                f"{type(exc).__name__}: {exc}", traceback=user_traceback(exc, call.workflow_dir)
            ) from exc
        except (Exception, SystemExit) as exc:
            raise PermanentError(
                f"{type(exc).__name__}: {exc}", traceback=user_traceback(exc, call.workflow_dir)
            ) from exc
        finally:
            capturing.reset(token)
            output.close()

        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidOutput(
                f"{spec} returned a {type(result).__name__} that is not JSON-serialisable: {exc}",
                hint="return dicts, lists, strings, numbers, booleans or None",
            ) from exc
        return result


def _check_arguments(target: _Target, kwargs: dict[str, Any]) -> None:
    keys = kwargs.keys()
    if target.wants_context and "context" in keys:
        raise PermanentError(
            f"`with.context` clashes with the `context` parameter of {target.spec}",
            hint="rename the `with` key; `context` receives the step context",
        )
    if not target.var_keyword and not keys <= target.accepted:
        unexpected = sorted(keys - target.accepted)
        accepts = ", ".join(sorted(target.accepted)) or "no keyword arguments"
        raise PermanentError(
            f"{target.spec} got an unexpected keyword argument {unexpected[0]!r}",
            hint=f"it accepts: {accepts}; add the parameter (or **kwargs) or remove the key",
        )
    if not target.needed <= keys:
        missing = ", ".join(repr(k) for k in sorted(target.needed - keys))
        raise PermanentError(
            f"{target.spec} is missing the argument(s) {missing}",
            hint="pass them in the step's `with`",
        )


def _resolve(workflow_dir: Path, spec: str) -> _Target:
    """Import ``module:attr`` with the workflow folder importable and inspect it."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not _dotted(module_name) or not _dotted(attr_path):
        raise PermanentError(f"bad callable {spec!r}", hint=_CALLABLE_HINT)
    folder = str(workflow_dir)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PermanentError(
            f"cannot import module {module_name!r} for {spec!r}: {exc}",
            hint=f"put {module_name.replace('.', '/')}.py in {folder} or install it",
            traceback=None if _missing(exc, module_name) else user_traceback(exc, workflow_dir),
        ) from exc
    except Exception as exc:
        raise PermanentError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}",
            hint="fix the error in the module; it runs when first imported",
            traceback=user_traceback(exc, workflow_dir),
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PermanentError(
                f"module {module_name!r} has no attribute {attr_path!r}",
                hint="check the name after the colon in `with.callable`",
            ) from None
    if not callable(obj):
        raise PermanentError(f"{spec} is a {type(obj).__name__}, not a callable")
    return _inspect(spec, obj)


def _inspect(spec: str, fn: Callable[..., Any]) -> _Target:
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (an object with an async __call__)
    )
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return _Target(spec, fn, is_async, False, True, frozenset(), frozenset())
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in keyword}
    needed = {p.name for p in params if p.kind in keyword and p.default is p.empty}
    wants_context = "context" in names
    names.discard("context")
    needed.discard("context")
    return _Target(
        spec=spec,
        fn=fn,
        is_async=is_async,
        wants_context=wants_context,
        var_keyword=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params),
        accepted=frozenset(names),
        needed=frozenset(needed),
    )


def _missing(exc: ImportError, module_name: str) -> bool:
    """The module (or a package above it) does not exist: no code of the user's ran."""
    name = exc.name or ""
    return bool(name) and (module_name == name or module_name.startswith(name + "."))


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


# -- the traceback of the user's code --------------------------------------------------------
MAX_TRACEBACK_CHARS = 20_000
"""A longer traceback keeps its end: the exception and the innermost frames."""
_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
"""The storyflow package's folder: its frames are not the user's."""
_STDLIB = os.path.join(os.path.dirname(os.path.abspath(os.__file__)), "")
"""The standard library's folder (its ``site-packages`` aside)."""
_SITE = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def user_traceback(exc: BaseException, workflow_dir: Path) -> str:
    """The traceback of ``exc`` as Python prints it, with storyflow's frames left out:
    only frames in the workflow's folder or outside the storyflow package, and none of
    the machinery that called the user's code (storyflow, then the standard library's
    thread pool or importer) before the first frame of it. Chained exceptions too."""
    te = traceback.TracebackException.from_exception(exc)
    _trim(te, os.path.join(str(workflow_dir), ""), set())
    text = "".join(te.format()).rstrip("\n")
    if len(text) > MAX_TRACEBACK_CHARS:
        cut = text.find("\n", len(text) - MAX_TRACEBACK_CHARS) + 1
        text = f"… ({cut:,} earlier characters of the traceback not shown)\n" + text[cut:]
    return text


def _trim(te: traceback.TracebackException, folder: str, seen: set[int]) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    frames = [
        f for f in te.stack if f.filename.startswith(folder) or not f.filename.startswith(_OURS)
    ]
    first = 0
    while first < len(frames) and _machinery(frames[first].filename, folder):
        first += 1
    te.stack = traceback.StackSummary.from_list(frames[first:])
    for other in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
        if other is not None:
            _trim(other, folder, seen)


def _machinery(filename: str, folder: str) -> bool:
    """A frame of the standard library (or a frozen module), outside the workflow's folder."""
    if filename.startswith(folder):
        return False
    if filename.startswith("<frozen "):
        return True
    return filename.startswith(_STDLIB) and not any(s in filename for s in _SITE)
