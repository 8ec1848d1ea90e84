"""What every agent kind shares: the `Call` it receives and the `Agent` protocol it meets.

An agent is a small object with a ``kind``, the ``with`` keys it ``required``, and an
async ``run(call)`` that returns a JSON-serialisable output or raises a
`storyflow.errors.StepFailure` subclass. The engine renders templates, enforces
timeouts, retries and checkpoints; an agent only does the one attempt it is given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import logging


def discard(message: str) -> None:
    """The default agent logger: drops the line."""


def ignore_usage(usage: dict[str, Any]) -> None:
    """The default usage meter: drops the report."""


def release_nothing() -> None:
    """The release of a reservation that holds nothing."""


async def reserve_nothing(estimate: dict[str, Any]) -> Callable[[], None]:
    """The default reservation: no budget to ask."""
    return release_nothing


class CallCache(Protocol):
    """A content-addressed cache of agent calls, shared across runs (see `Call.cache`)."""

    def get(self, key: str) -> tuple[bool, Any]:
        """``(True, value)`` when ``key`` was stored, else ``(False, None)``."""
        ...

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``."""
        ...


@dataclass(frozen=True, slots=True)
class Call:
    """Everything one attempt of one step instance gets."""

    run_id: str
    """The run this attempt belongs to."""
    step_id: str
    """The step instance id, like ``draft[2]`` or ``polish#2.revise``."""
    attempt: int
    """1-based attempt number."""
    inputs: dict[str, Any]
    """The step's ``with``, already rendered by the engine, plus ``prompt`` if the step has one."""
    workflow_dir: Path
    """Folder of the workflow file: python modules import from here, relative paths resolve here."""
    run_dir: Path
    """The run's folder."""
    secrets: dict[str, str] = field(repr=False)
    """Only the secrets this agent declared, name → value. Never shown in a repr."""
    timeout_s: float | None
    """Seconds the attempt may take; ``None`` for no limit."""
    output_schema: dict[str, Any] | None = None
    """The step's ``output_schema``, for agents that can ask for structured output."""
    log: Callable[[str], None] = discard
    """The agent's logger; each line becomes a step log event."""
    seed: int | None = None
    """The workflow's ``seed``; agents that sample derive their randomness from it."""
    meter: Callable[[dict[str, Any]], None] = ignore_usage
    """Reports one model call's usage, once per HTTP call (repairs included):
    ``{"model": str, "input_tokens": int | None, "output_tokens": int | None,
    "cached": bool, "truncated": bool, "estimated"?: True}`` (``estimated``: counted
    from the text, the server sent no usage). The engine totals tokens and prices them
    from the workflow's ``config.prices`` per step and per run, and checks budgets."""
    cache: CallCache | None = None
    """The call cache, or None when the run bypasses it (``--no-cache``)."""
    placed: Callable[[str], None] = discard
    """An executor that runs the attempt elsewhere reports the worker that ran it."""
    delta: Callable[[str], None] = discard
    """The reply's text as it arrives, for an agent that streams (``llm``): called on the
    event loop once per streamed chunk with that chunk's text (the engine counts the
    calls as the tokens so far and coalesces the text into ``step.delta`` events). Text
    of a reply that is then retried or repaired is not taken back."""
    environ: Mapping[str, str] | None = None
    """When the attempt runs on another machine: the variables of the coordinator's
    environment the agent reads (its ``environ_keys``), instead of the local ones."""
    reserve: Callable[[dict[str, Any]], Awaitable[Callable[[], None]]] = reserve_nothing
    """Asks the run's budgets for room before a model call is made (awaited: it may wait
    for calls in flight to settle), with its estimate ``{"model", "input_tokens",
    "output_tokens", "reply_default"?, "calls"?}`` — the prompt, and the reply's
    ``max_tokens`` or the agent's default allowance (``reply_default``); ``calls`` when
    it covers several calls at once — or with ``"cost"`` already priced. Raises
    `storyflow.errors.BudgetExceeded` when the call could cross a budget; else returns
    the release, to call once the call's usage was metered or the call failed (the
    engine releases whatever an attempt still holds when it ends). An agent that makes
    several calls in one attempt asks before each."""


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a python callable with a ``context`` parameter receives."""

    run_id: str
    """The run this attempt belongs to."""
    step_id: str
    """The step instance id, like ``draft[2]``."""
    attempt: int
    """1-based attempt number."""
    log: Callable[[str], None]
    """Write a line (each line of a text) to the step's log."""
    run_dir: Path
    """The run's folder."""
    workflow_dir: Path
    """Folder of the workflow file."""
    secrets: dict[str, str] = field(repr=False)
    """Only the secrets the agent declared, name → value. Never shown in a repr."""
    _logger: logging.Logger | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def logger(self) -> logging.Logger:
        """A `logging.Logger` (``storyflow.step.<step id>``, level DEBUG) whose records
        go to the step's log as ``LEVEL: message`` lines, and nowhere else."""
        logger = self._logger
        if logger is None:
            from storyflow.agents.capture import step_logger

            logger = step_logger(self.step_id, self.log)
            object.__setattr__(self, "_logger", logger)
        return logger

    @classmethod
    def of(cls, call: Call, log: Callable[[str], None] | None = None) -> StepContext:
        """The context of one call; ``log`` (else the call's) writes to the step's log."""
        return cls(
            run_id=call.run_id,
            step_id=call.step_id,
            attempt=call.attempt,
            log=call.log if log is None else log,
            run_dir=call.run_dir,
            workflow_dir=call.workflow_dir,
            secrets=call.secrets,
        )


class Agent(Protocol):
    """One agent kind. Instances are shared by every step that uses the kind."""

    kind: str
    """The name used in a workflow's ``uses:``, like ``python``."""
    required: tuple[str, ...]
    """The ``with`` keys the kind needs; validation reports the missing ones."""

    async def run(self, call: Call) -> Any:
        """Do one attempt; return a JSON-serialisable output or raise a StepFailure."""
        ...
