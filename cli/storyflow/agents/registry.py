"""Agent kinds: the built-in ones and third parties from the `storyflow.agents` entry points.

`kinds()` is the table validation checks ``uses:`` against; `get()` hands the engine a
shared instance. Every built-in kind is listed, implemented or not, so a workflow using
a kind this version lacks is valid and fails only when that step runs.

A third-party package registers ``[project.entry-points."storyflow.agents"]
mykind = "pkg.module:MyAgent"``: a class or factory that, called with no arguments,
returns an object with the `Agent` protocol. Built-in names are reserved. Entry
points are discovered on first use and each is loaded at most once per process.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from storyflow.agents.base import Agent
from storyflow.errors import PermanentError
from storyflow.spec.semantic import BUILTIN_KINDS
from storyflow.spec.units import did_you_mean

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

GROUP = "storyflow.agents"
"""The entry-point group third-party agent kinds register under."""

_IMPLEMENTED: dict[str, str] = {
    "python": "storyflow.agents.python_agent:PythonAgent",
    "command": "storyflow.agents.command_agent:CommandAgent",
    "template": "storyflow.agents.template_agent:TemplateAgent",
    "llm": "storyflow.agents.llm_agent:LlmAgent",
    "workflow": "storyflow.engine.subrun:WorkflowAgent",
    "human": "storyflow.engine.human:HumanAgent",
    "builtin/grammar": "storyflow.agents.grammar_agent:GrammarAgent",
}
"""Built-in kind → its class, imported on first use (validation needs none of them)."""


def _builtin(kind: str) -> Callable[[], Agent]:
    module, _, name = _IMPLEMENTED[kind].partition(":")
    factory: Callable[[], Agent] = getattr(importlib.import_module(module), name)
    return factory


@dataclass(frozen=True, slots=True)
class _Broken:
    """Why an entry point could not be loaded (kept so it is tried only once)."""

    message: str
    hint: str


_instances: dict[str, Agent] = {}
_plugins: dict[str, EntryPoint] | None = None
_broken: dict[str, _Broken] = {}


class _Kinds(Mapping[str, tuple[str, ...]]):
    """Built-in kinds at once; installed plugins only when a name is not built in.

    Scanning entry points reads the metadata of every installed distribution, so a
    workflow that uses only built-in kinds never pays for it.
    """

    def _plugin_required(self, name: str) -> tuple[str, ...]:
        try:
            return get(name).required
        except PermanentError:
            return ()

    def __getitem__(self, kind: str) -> tuple[str, ...]:
        if kind in BUILTIN_KINDS:
            return BUILTIN_KINDS[kind]
        if kind in _discover():
            return self._plugin_required(kind)
        raise KeyError(kind)

    def __contains__(self, kind: object) -> bool:
        return kind in BUILTIN_KINDS or (isinstance(kind, str) and kind in _discover())

    def __iter__(self) -> Iterator[str]:
        yield from BUILTIN_KINDS
        yield from _discover()

    def __len__(self) -> int:
        return len(BUILTIN_KINDS) + len(_discover())


def kinds() -> Mapping[str, tuple[str, ...]]:
    """Agent kind → the ``with`` keys it requires, built-in and third-party.

    A third-party kind that fails to load is still listed (requiring nothing), so the
    workflow validates and the step fails with the loading error when it runs.
    """
    return _Kinds()


def get(kind: str) -> Agent:
    """The shared agent instance of ``kind``.

    Raises PermanentError for a kind this version lists but does not implement, for an
    unknown kind, and for a third-party kind whose entry point cannot be loaded.
    """
    agent = _instances.get(kind)
    if agent is not None:
        return agent
    if kind in _IMPLEMENTED:
        agent = _builtin(kind)()
    elif kind in BUILTIN_KINDS:
        implemented = ", ".join(sorted(_IMPLEMENTED))
        raise PermanentError(
            f"agent kind {kind!r} is not available in this version",
            hint=f"this version implements {implemented} and installed plugins",
        )
    elif kind in _discover():
        agent = _load(kind, _discover()[kind])
    else:
        names = [*BUILTIN_KINDS, *_discover()]
        raise PermanentError(
            f"agent kind {kind!r} is not available in this version",
            hint=did_you_mean(kind, names, what="agent kinds")
            or f"install a package that registers it under the {GROUP!r} entry points",
        )
    _instances[kind] = agent
    return agent


def reset() -> None:
    """Forget instances and discovered entry points (tests, or after installing a plugin)."""
    global _plugins
    _instances.clear()
    _broken.clear()
    _plugins = None


def entry_points(*, group: str) -> Any:
    """`importlib.metadata.entry_points`, imported only when a plugin kind is asked for
    (importing it costs ~10 ms of every command)."""
    from importlib.metadata import entry_points as found

    return found(group=group)


def _discover() -> dict[str, EntryPoint]:
    """Entry-point name → entry point, found once; the first of duplicate names wins."""
    global _plugins
    if _plugins is None:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=GROUP):
            if ep.name not in BUILTIN_KINDS:
                found.setdefault(ep.name, ep)
        _plugins = found
    return _plugins


def _load(kind: str, ep: EntryPoint) -> Agent:
    broken = _broken.get(kind)
    if broken is None:
        try:
            return _instantiate(ep)
        except Exception as exc:
            dist = f" (from {ep.dist.name})" if ep.dist is not None else ""
            broken = _Broken(
                f"cannot load agent kind {kind!r} from entry point "
                f"{ep.name} = {ep.value}{dist}: {type(exc).__name__}: {exc}",
                "reinstall or fix the package providing it, or remove it from the environment",
            )
            _broken[kind] = broken
            raise PermanentError(broken.message, hint=broken.hint) from exc
    raise PermanentError(broken.message, hint=broken.hint)


def _instantiate(ep: EntryPoint) -> Agent:
    obj: Any = ep.load()
    if inspect.isclass(obj) or (callable(obj) and not hasattr(obj, "run")):
        obj = obj()
    if not inspect.iscoroutinefunction(getattr(obj, "run", None)):
        raise TypeError(f"{type(obj).__name__} has no `async def run(self, call)`")
    if not isinstance(getattr(obj, "kind", None), str):
        raise TypeError(f"{type(obj).__name__} has no `kind` string")
    required = getattr(obj, "required", None)
    if not isinstance(required, tuple) or not all(isinstance(k, str) for k in required):
        raise TypeError(f"{type(obj).__name__}.required must be a tuple of `with` key names")
    return cast(Agent, obj)
