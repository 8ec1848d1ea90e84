"""The records the store persists: one per run, one per step instance.

Both are persisted as plain dicts (`to_dict`), so the store never pickles our classes
and an older or newer storyflow can still read them; `from_dict` ignores unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any


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
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        """Rebuild a record; keys this version does not know are ignored."""
        return cls(**{k: d[k] for k in _RUN_FIELDS if k in d})


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
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRecord:
        """Rebuild a record; keys this version does not know are ignored."""
        return cls(**{k: d[k] for k in _STEP_FIELDS if k in d})


_RUN_FIELDS = tuple(f.name for f in fields(RunRecord))
_STEP_FIELDS = tuple(f.name for f in fields(StepRecord))
