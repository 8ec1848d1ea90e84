"""Names templates can read. Built once per run and updated in O(1) as steps finish."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from storyflow.spec.model import Workflow


class Scope:
    """The run-wide part of every template scope: inputs, config, run, env, steps."""

    __slots__ = ("base", "steps")

    def __init__(
        self, workflow: Workflow, inputs: Mapping[str, Any], run_id: str, environ: Mapping[str, str]
    ) -> None:
        self.steps: dict[str, dict[str, Any]] = {}
        env = {name: environ.get(name, "") for name in workflow.env}
        self.base: dict[str, Any] = {
            "inputs": dict(inputs),
            "config": workflow.config,
            "run": {"id": run_id, "workflow": workflow.name, "seed": workflow.seed},
            "env": env,
            "steps": self.steps,
        }

    def record(
        self,
        step_id: str,
        *,
        output: Any,
        status: str,
        attempts: int,
        error: Any = None,
        agent: str | None = None,
        degraded: bool = False,
        usage: dict[str, Any] | None = None,
    ) -> None:
        """What ``steps.<id>`` shows once the step has finished."""
        self.steps[step_id] = {
            "output": output,
            "status": status,
            "attempts": attempts,
            "error": error,
            "agent": agent,
            "degraded": degraded,
            "usage": usage,
        }

    def for_step(
        self, secrets: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A scope for one step: the shared names plus its secrets and locals (a shallow copy)."""
        scope = dict(self.base)
        scope["secrets"] = dict(secrets or {})
        if extra:
            scope.update(extra)
        return scope
