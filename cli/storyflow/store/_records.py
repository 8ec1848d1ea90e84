"""The records the store persists: one per run, one per step instance.

Both are persisted as plain dicts (`to_dict`), so the store never pickles our classes
and an older or newer storyflow can still read them; `from_dict` ignores unknown keys.
`from_dict` also checks the shape of what it reads (fields present, of the right
types) and raises `RecordError` for a record that is not one, so a damaged record is
reported rather than misread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any


class RecordError(ValueError):
    """A stored value does not have the shape of the record it should be."""


def _plain(value: Any) -> Any:
    """An Enum member (RunStatus, StepStatus, ErrorClass) as its plain value."""
    if type(value) is str:
        return value
    return value.value if isinstance(value, Enum) else value


def _plain_error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {k: _plain(v) for k, v in error.items()}


@dataclass(slots=True)
class RunRecord:
    """What the store knows about one run."""

    run_id: str
    """Unique and sortable by time, like ``20250101-120000-a1b2c3``."""
    workflow: str
    """The workflow's name."""
    workflow_path: str
    """Absolute path of the workflow file."""
    workflow_version: str | None
    """The workflow's declared version, if any."""
    source_hash: str
    """Hash of the workflow file's text when the run started."""
    status: str
    """A `RunStatus` value."""
    inputs: dict[str, Any]
    """The resolved workflow inputs (already redacted)."""
    environment: str | None
    """The `--env` name, if any."""
    sets: list[str]
    """The `--set path=value` overrides, as given."""
    created_at: float
    """Epoch seconds when the run was created; fixed for the run's life."""
    updated_at: float
    """Epoch seconds of the last change."""
    ended_at: float | None = None
    """Epoch seconds when the run last finished (succeeded, failed, interrupted...)."""
    outputs: dict[str, Any] | None = None
    """The workflow outputs, once it succeeded."""
    error: dict[str, Any] | None = None
    """``{"class", "message"}`` of the failure that ended the run."""
    parent_run: str | None = None
    """The run that started this one as a sub-workflow."""
    parent_step: str | None = None
    """The step instance of `parent_run` that started this one."""
    forked_from: str | None = None
    """The run this one was made from by ``storyflow fork`` or ``storyflow replay``."""
    fork: dict[str, Any] | None = None
    """How it was made from `forked_from`: ``{"kind": "fork"|"replay", "from": [steps],
    "inputs": [changed input names], "sets": [new --set], "file": path or None}``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form: tokens, cost, plan summary..."""

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-like dict (shallow: nested values are shared, not copied)."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "workflow_path": self.workflow_path,
            "workflow_version": self.workflow_version,
            "source_hash": self.source_hash,
            "status": _plain(self.status),
            "inputs": self.inputs,
            "environment": self.environment,
            "sets": list(self.sets),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "ended_at": self.ended_at,
            "outputs": self.outputs,
            "error": _plain_error(self.error),
            "parent_run": self.parent_run,
            "parent_step": self.parent_step,
            "forked_from": self.forked_from,
            "fork": self.fork,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any) -> RunRecord:
        """Rebuild a record; keys this version does not know are ignored.
        `RecordError` when ``d`` is not a run record (a field missing or mistyped)."""
        return cls(**_checked(d, _RUN_SHAPE, _RUN_REQUIRED))


@dataclass(slots=True)
class StepRecord:
    """What the store knows about one step instance."""

    id: str
    """The instance id: ``draft``, ``draft[2]``, ``polish#2.revise``."""
    status: str
    """A `StepStatus` value."""
    attempts: int = 0
    """Attempts started so far."""
    fingerprint: str | None = None
    """Hash of the step's agent, rendered configuration and inputs."""
    output: Any = None
    """The step's output, once it succeeded."""
    error: dict[str, Any] | None = None
    """``{"class": ErrorClass value, "message": str}`` of the last failure."""
    ready_at: float | None = None
    """Epoch seconds when its dependencies were met."""
    started_at: float | None = None
    """Epoch seconds when the current (or last) attempt started."""
    ended_at: float | None = None
    """Epoch seconds when it reached a final status."""
    agent: str | None = None
    """The agent that served it (a fallback's name when degraded)."""
    degraded: bool = False
    """True when a fallback agent produced the output."""
    request: dict[str, Any] | None = None
    """The rendered request of its latest attempt (secrets redacted): ``{"uses",
    "inputs", "output_schema", "seed"}`` — what `storyflow replay` matches and `show --step`
    prints (a ``cache: true`` step answered by the cache: the request it stands for).
    None for maps, loops and steps that never reached an agent."""
    forked_from: str | None = None
    """The run it was copied from, when a fork kept it instead of running it."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form: ``{"items": 5}`` for a map, tokens, attempt history..."""

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-like dict (shallow: nested values are shared, not copied)."""
        error = self.error
        return {
            "id": self.id,
            "status": _plain(self.status),
            "attempts": self.attempts,
            "fingerprint": self.fingerprint,
            "output": self.output,
            "error": None if error is None else _plain_error(error),
            "ready_at": self.ready_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "agent": self.agent,
            "degraded": self.degraded,
            "request": self.request,
            "forked_from": self.forked_from,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any) -> StepRecord:
        """Rebuild a record; keys this version does not know are ignored.
        `RecordError` when ``d`` is not a step record (a field missing or mistyped)."""
        return cls(**_checked(d, _STEP_SHAPE, _STEP_REQUIRED))


# --- Shapes: what each field may hold, checked when a record is read -----------------

_Test = tuple[Callable[[Any], bool], str]


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _error(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("class"), str) and isinstance(
        v.get("message"), str
    )


def _run_meta(v: Any) -> bool:
    """A mapping; the keys readers walk (``steps``, ``children``) hold what they expect."""
    if not isinstance(v, dict):
        return False
    steps, children = v.get("steps"), v.get("children")
    return (steps is None or (isinstance(steps, list) and all(isinstance(s, str) for s in steps))
            ) and (children is None or (isinstance(children, dict) and all(
                isinstance(c, str) for c in children.values())))


def _or_none(test: _Test) -> _Test:
    check, what = test
    return (lambda v: v is None or check(v)), f"{what} or null"


_STR: _Test = (lambda v: isinstance(v, str), "a string")
_NUM: _Test = (_num, "a number")
_INT: _Test = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_BOOL: _Test = (lambda v: isinstance(v, bool), "true or false")
_MAP: _Test = (lambda v: isinstance(v, dict), "a mapping")
_ERROR: _Test = (_error, "an error ({class, message})")
_ANY: _Test = (lambda v: True, "anything")

_RUN_SHAPE: dict[str, _Test] = {
    "run_id": _STR, "workflow": _STR, "workflow_path": _STR,
    "workflow_version": _or_none(_STR), "source_hash": _STR, "status": _STR,
    "inputs": _MAP, "environment": _or_none(_STR),
    "sets": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
             "a list of strings"),
    "created_at": _NUM, "updated_at": _NUM, "ended_at": _or_none(_NUM),
    "outputs": _or_none(_MAP), "error": _or_none(_ERROR), "parent_run": _or_none(_STR),
    "parent_step": _or_none(_STR), "forked_from": _or_none(_STR), "fork": _or_none(_MAP),
    "meta": (_run_meta, "a mapping"),
}
_STEP_SHAPE: dict[str, _Test] = {
    "id": _STR, "status": _STR, "attempts": _INT, "fingerprint": _or_none(_STR),
    "output": _ANY, "error": _or_none(_ERROR), "ready_at": _or_none(_NUM),
    "started_at": _or_none(_NUM), "ended_at": _or_none(_NUM), "agent": _or_none(_STR),
    "degraded": _BOOL, "request": _or_none(_MAP), "forked_from": _or_none(_STR), "meta": _MAP,
}
_RUN_REQUIRED = frozenset(
    f.name for f in fields(RunRecord) if f.default is MISSING and f.default_factory is MISSING
)
_STEP_REQUIRED = frozenset(
    f.name for f in fields(StepRecord) if f.default is MISSING and f.default_factory is MISSING
)


def _checked(d: Any, shape: dict[str, _Test], required: frozenset[str]) -> dict[str, Any]:
    """The fields of ``d`` this version knows, each checked; `RecordError` if one is off."""
    if not isinstance(d, dict):
        raise RecordError(f"a {type(d).__name__}, not a mapping")
    missing = sorted(required.difference(d))
    if missing:
        raise RecordError("missing " + ", ".join(f"field {name!r}" for name in missing))
    out: dict[str, Any] = {}
    for name, (check, what) in shape.items():
        if name in d:
            value = d[name]
            if not check(value):
                raise RecordError(f"field {name!r} is {_kind(value)}, not {what}")
            out[name] = value
    return out


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
