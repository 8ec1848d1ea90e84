"""The end of a run: how it ended (`Result`), its outputs and its artifacts.

An interrupted run (a signal) ends ``interrupted``; a run stopped by its ``timeout``
ends ``failed`` with class ``timeout``; a failed step (unless ``allow_failure``) fails
the run with the first such step's error. Otherwise the workflow's ``outputs`` are
rendered and its ``artifacts`` written inside the run folder; an error there fails the
run. Secret values are redacted from both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storyflow.engine.instance import Instance
from storyflow.engine.scope import Scope
from storyflow.errors import PermanentError, StepFailure
from storyflow.events import ErrorClass, RunStatus, StepStatus
from storyflow.spec.model import Workflow
from storyflow.store import redact


@dataclass(frozen=True, slots=True)
class Stop:
    """Why the run is stopping before every step has settled."""

    reason: str
    """The ``reason`` of the ``step.cancelled`` events."""
    error: dict[str, str]
    """The error recorded on each cancelled instance."""
    signum: int | None = None
    """The signal, for an interruption; None for the run's timeout."""


@dataclass
class Result:
    """How a run ended."""

    status: RunStatus
    outputs: dict[str, Any]
    error: dict[str, str] | None
    counts: dict[str, int]
    """Every instance this process knows (map items, loop iterations' steps, the maps
    and loops themselves), by status: the summary's ``instances``."""
    waiting: list[dict[str, Any]] | None = None
    """For a run paused for answers: the questions (``run_id``, ``step``, ``question``,
    ``schema``)."""
    usage: dict[str, Any] | None = None
    """The run's tokens, cost and model calls so far (earlier processes included)."""
    steps: dict[str, int] = field(default_factory=dict)
    """The plan's top-level steps by status: the summary's ``steps``."""


def tally(insts: Iterable[Instance]) -> tuple[dict[str, int], dict[str, int]]:
    """Top-level steps by status, and every instance by status."""
    steps: dict[str, int] = {}
    counts: dict[str, int] = {}
    for inst in insts:
        counts[inst.state] = counts.get(inst.state, 0) + 1
        if inst.parent is None:
            steps[inst.state] = steps.get(inst.state, 0) + 1
    return steps, counts


def not_started(
    insts: Iterable[Instance], error: dict[str, str], usage: dict[str, Any]
) -> Result:
    """A run that failed before any step could start (its executor could not)."""
    steps, counts = tally(insts)
    return Result(RunStatus.FAILED, {}, error, counts, usage=usage, steps=steps)


def finish(
    wf: Workflow,
    insts: Iterable[Instance],
    stop: Stop | None,
    *,
    paused: list[Instance] | None = None,
    templates: Any,
    scope: Scope,
    run_dir: Path,
    secret_values: list[str],
) -> Result:
    """The result of a run whose every step has settled (or that stopped early)."""
    insts = list(insts)
    steps, counts = tally(insts)
    failed = [
        inst
        for inst in insts
        if inst.state == StepStatus.FAILED.value and not inst.node.step.allow_failure
    ]
    if stop is not None and stop.signum is not None:
        return Result(RunStatus.INTERRUPTED, {}, None, counts, steps=steps)
    if stop is not None:
        error = {
            "class": ErrorClass.TIMEOUT.value,
            "message": f"run timed out after {wf.timeout_s:g}s",
        }
        return Result(RunStatus.FAILED, {}, error, counts, steps=steps)
    if failed:
        first = failed[0]
        err = {
            "class": (first.error or {}).get("class", "permanent"),
            "message": f"step {first.id} failed: {(first.error or {}).get('message', '')}",
        }
        return Result(RunStatus.FAILED, {}, err, counts, steps=steps)
    if paused:
        questions = [q for inst in paused for q in inst.waiting or ()]
        return Result(RunStatus.WAITING, {}, None, counts, questions, steps=steps)
    try:
        names = scope.for_step()
        outputs = {k: templates.render(v, names) for k, v in wf.outputs.items()}
        _write_artifacts(wf, templates, names, run_dir, secret_values)
    except StepFailure as exc:
        return Result(
            RunStatus.FAILED,
            {},
            {"class": exc.error_class.value, "message": exc.message},
            counts,
            steps=steps,
        )
    if secret_values:
        outputs = redact(outputs, secret_values)
    return Result(RunStatus.SUCCEEDED, outputs, None, counts, steps=steps)


def _write_artifacts(
    wf: Workflow, templates: Any, names: dict[str, Any], run_dir: Path, secret_values: list[str]
) -> None:
    root = run_dir.resolve()
    for rel, template in wf.artifacts.items():
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or target == root:
            raise PermanentError(
                f"artifact {rel!r} would be written outside the run folder",
                hint="use a relative path without '..'",
            )
        value = templates.render(template, names)
        text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
        if secret_values:
            text = redact(text, secret_values)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
