"""Typed, frozen values for a validated workflow. Nothing downstream sees raw YAML.

Mappings held here (``with_``, ``config``, ``output_schema`` …) are plain JSON-like
``dict``/``list`` values taken from the file; treat them as read-only.
Durations are seconds (``*_s``); ids are the keys the author wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_RETRY_ON: tuple[str, ...] = ("transient", "timeout", "invalid_output")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed attempt is retried."""

    attempts: int = 1
    """Total attempts, the first included; 1 means no retry."""
    delay_s: float = 1.0
    """Base delay before the second attempt."""
    backoff: str = "exponential"
    """``fixed``, ``linear`` or ``exponential``."""
    max_delay_s: float = 60.0
    """Cap on any single delay."""
    jitter: bool = True
    """Full jitter: the delay is drawn uniformly from [0, computed delay]."""
    on: tuple[str, ...] = DEFAULT_RETRY_ON
    """Error classes that retry."""


@dataclass(frozen=True, slots=True)
class Breaker:
    """Circuit breaker settings for one agent."""

    failures: int = 5
    """Consecutive failures that open the breaker."""
    cooldown_s: float = 30.0
    """How long it stays open before one trial call."""


@dataclass(frozen=True, slots=True)
class Budget:
    """Spending limits for a run or a step."""

    tokens: int | None = None
    """Maximum tokens (input + output)."""
    cost: float | None = None
    """Maximum cost in the price table's currency."""


@dataclass(frozen=True, slots=True)
class Pool:
    """Shared capacity that steps draw from."""

    name: str
    concurrency: int | None = None
    """Steps of this pool running at once; None is unbounded."""
    rate_per_s: float | None = None
    """Token-bucket start rate, converted from ``N/s``, ``N/min`` or ``N/h``."""
    rate_text: str | None = None
    """The rate as the author wrote it."""
    tokens_per_s: float | None = None
    """LLM tokens per second the pool may use (from ``tokens: N/min``)."""


@dataclass(frozen=True, slots=True)
class Agent:
    """A named role that steps reuse."""

    name: str
    uses: str
    """Agent kind: ``llm``, ``python``, ``command``, ``template``, ``workflow``, ``human``,
    ``builtin/grammar`` or a registered third-party kind."""
    with_: dict[str, Any] = field(default_factory=dict)
    """Configuration; strings may be templates."""
    pool: str | None = None
    secrets: tuple[str, ...] = ()
    """Environment variables this agent may see as ``secrets.NAME``."""
    breaker: Breaker | None = None
    fallback: str | None = None
    """Agent that serves when this one fails for good or its breaker is open."""
    retry: dict[str, Any] | None = None
    """Retry keys as written, merged between defaults and the step's own."""
    timeout_s: float | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Fallback:
    """One agent of a step's fallback chain, resolved for that step.

    Holds the same fields the engine reads from a `Step` to call its agent, so either
    can serve: a fallback is the step run by another agent.
    """

    agent: str
    """The fallback agent's name (a key of ``agents``)."""
    uses: str
    """Its agent kind."""
    with_: dict[str, Any] = field(default_factory=dict)
    """The fallback agent's ``with`` with the step's own ``with`` merged over it."""
    retry: RetryPolicy = RetryPolicy()
    """Retry keys merged: defaults → the fallback agent → the step."""
    timeout_s: float | None = None
    """The step's own ``timeout``, else the fallback agent's, else the default."""
    pool: str | None = None
    """The step's own ``pool``, else the fallback agent's, else the default."""


@dataclass(frozen=True, slots=True)
class Loop:
    """A bounded revise loop: nested steps repeated until a condition holds."""

    steps: tuple[Step, ...]
    until: str | None = None
    """Expression evaluated after each iteration; true ends the loop."""
    max_iterations: int = 3
    best_by: str | None = None
    """Expression scored per iteration; the best iteration is the output."""
    on_exhausted: str = "succeed"
    """``succeed`` or ``fail`` when max_iterations pass without ``until``."""


@dataclass(frozen=True, slots=True)
class Step:
    """One step as written, with agent defaults resolved."""

    id: str
    uses: str | None = None
    """Agent kind (resolved from ``agent`` when one is named); None for a loop."""
    agent: str | None = None
    """The named agent, when the step names one."""
    with_: dict[str, Any] = field(default_factory=dict)
    """The agent's ``with`` with the step's merged over it; strings are templates."""
    prompt: str | None = None
    needs: tuple[str, ...] = ()
    """Explicit ordering dependencies."""
    deps: tuple[str, ...] = ()
    """Every step of the same scope this one waits for: ``needs`` plus what its templates read."""
    sequential: bool = False
    """A map whose items read ``previous``: items run one after another, in order."""
    when: str | None = None
    join: str = "all_succeeded"
    """``all_succeeded``, ``any_succeeded`` or ``all_done``."""
    for_each: Any = None
    """An expression giving the items, or a literal list."""
    as_: str = "item"
    max_parallel: int | None = None
    loop: Loop | None = None
    output_schema: dict[str, Any] | None = None
    timeout_s: float | None = None
    retry: RetryPolicy = RetryPolicy()
    pool: str | None = None
    cache: bool = False
    fallback: str | None = None
    """The first fallback agent: the step's own ``fallback``, else its agent's."""
    fallbacks: tuple[Fallback, ...] = ()
    """The whole fallback chain, in the order the agents are tried."""
    allow_failure: bool = False
    budget: Budget | None = None
    description: str | None = None

    @property
    def kind(self) -> str:
        """``loop``, ``map`` or ``task``."""
        if self.loop is not None:
            return "loop"
        if self.for_each is not None:
            return "map"
        return "task"


@dataclass(frozen=True, slots=True)
class Workflow:
    """A whole validated workflow file, environment applied."""

    name: str
    path: str
    """The file it was loaded from."""
    api_version: str = "storyflow/v1"
    version: str | None = None
    description: str | None = None
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Input name → JSON Schema."""
    config: dict[str, Any] = field(default_factory=dict)
    env: tuple[str, ...] = ()
    """Environment variables templates may read as ``env.NAME``."""
    environments: tuple[str, ...] = ()
    """Names of the environments the file defines."""
    environment: str | None = None
    """The environment applied with ``--env``."""
    pools: dict[str, Pool] = field(default_factory=dict)
    agents: dict[str, Agent] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()
    outputs: dict[str, Any] = field(default_factory=dict)
    """Output name → template."""
    artifacts: dict[str, Any] = field(default_factory=dict)
    """Relative path → template."""
    timeout_s: float | None = None
    budget: Budget | None = None
    seed: int | None = None
    executor: dict[str, Any] | str | None = None
    """The ``executor`` setting as written (environment applied); None for the default,
    ``local``. Read by `storyflow.engine.executors.setting`."""
    source_hash: str = ""
    """Hash of the file's bytes and the applied parameters."""

    def step(self, step_id: str) -> Step:
        """The top-level step ``step_id``."""
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)
