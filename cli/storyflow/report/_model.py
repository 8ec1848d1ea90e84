"""The report's value types: one run's timings, retries, tokens, cost and critical path.

All times are epoch seconds (``*_at``) or durations in seconds (``*_s``), exactly as the
store and the event log hold them; the renderers format them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of one step instance, as the event log tells it."""

    number: int
    """1-based attempt number (counted per process of the run)."""
    agent: str
    """The agent that served it: a named agent, or the kind of an inline ``uses:``."""
    started_at: float | None
    """Its ``step.started``; None when it failed fast (an open circuit breaker)."""
    ended_at: float
    """The event that ended it."""
    outcome: str
    """``succeeded``, ``retrying``, ``fallback``, ``failed`` or ``cancelled``."""
    error_class: str | None = None
    """The error class when it failed."""
    delay_s: float = 0.0
    """The backoff delay that followed it (``step.retrying``)."""
    message: str | None = None
    """Its error message, in one line, when it failed."""

    @property
    def failed(self) -> bool:
        """Whether it failed (retried, handed to a fallback, or for good)."""
        return self.outcome in ("retrying", "fallback", "failed")

    @property
    def latency_s(self) -> float | None:
        """How long the agent took, or None for a call that was never made."""
        return None if self.started_at is None else max(0.0, self.ended_at - self.started_at)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and cost an instance's model calls reported (zero for non-LLM steps)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    """In the currency of the workflow's price table."""
    calls: int = 0
    """Model calls (HTTP requests), repairs included."""

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost + other.cost,
            self.calls + other.calls,
        )


@dataclass(frozen=True, slots=True)
class InstanceReport:
    """One step instance: ``draft``, a map item ``draft[2]``, a loop step ``polish#2.revise``."""

    id: str
    """The instance id."""
    step: str
    """The top-level step it belongs to."""
    parent: str | None
    """The map or loop instance it belongs to, or None for a top-level step."""
    kind: str
    """``task`` (calls an agent), ``map`` or ``loop`` (made of other instances)."""
    status: str
    """A step status; ``pending`` for an instance the store has no record of."""
    attempts: int
    """Attempts started in the process that last ran it."""
    agent: str | None
    """The agent that served it (a fallback's name when degraded)."""
    degraded: bool
    """True when a fallback agent produced the output."""
    ready_at: float | None
    """When its needs were met."""
    first_started_at: float | None
    """When its first attempt started (after waiting for a slot)."""
    last_started_at: float | None
    """When its last attempt started."""
    ended_at: float | None
    """When it reached a final status."""
    error_class: str | None
    """The class of its last failure, if it failed."""
    error_message: str | None
    """Its last failure, in one line (already redacted)."""
    retries: dict[str, int] = field(default_factory=dict)
    """Retries by the error class that caused them."""
    usage: Usage = Usage()
    worker: str | None = None
    """The executor worker that ran its latest attempt (a Dask worker's address); None
    when it ran in the ``storyflow`` process."""
    queued: str | None = None
    """The full limit it waited behind once ready: ``max_parallel`` or ``pool:NAME``
    (the record's ``meta["queued"]``); None when it could start at once."""
    child_run: str | None = None
    """The child run of a sub-workflow step (the run record's ``meta["children"]``)."""
    tries: tuple[Attempt, ...] = ()
    """Its attempts since it last became ready, from the event log, first to last."""

    @property
    def ready_to_start_s(self) -> float | None:
        """Ready → first attempt, whatever held it up."""
        return _span(self.ready_at, self.first_started_at)

    @property
    def wait_s(self) -> float | None:
        """Ready → first attempt of an instance that waited behind a full limit
        (``--max-parallel``, a pool): waiting for a slot; 0 for one that did not."""
        span = self.ready_to_start_s
        return None if span is None else (span if self.queued else 0.0)

    @property
    def latency_s(self) -> float | None:
        """Ready → first attempt of an instance no limit held up: scheduling latency
        (the coordinator busy, a dispatch to a cluster); 0 for one that waited."""
        span = self.ready_to_start_s
        return None if span is None else (0.0 if self.queued else span)

    @property
    def retry_s(self) -> float | None:
        """First attempt → last attempt: failed attempts plus backoff delays."""
        return _span(self.first_started_at, self.last_started_at)

    @property
    def run_s(self) -> float | None:
        """The last attempt: start → end."""
        return _span(self.last_started_at, self.ended_at)

    @property
    def duration_s(self) -> float | None:
        """First attempt → end (``retry_s + run_s``)."""
        return _span(self.first_started_at, self.ended_at)


@dataclass(frozen=True, slots=True)
class AgentReport:
    """One agent across the run."""

    agent: str
    """A named agent, or the kind of an inline ``uses:``."""
    calls: int
    """Attempts it served (fast failures of an open breaker included)."""
    latencies_s: tuple[float, ...]
    """How long each call it actually made took, in the order they ended."""
    failures: dict[str, int]
    """Failed attempts by error class."""
    breaker_openings: int
    """Times its circuit breaker opened."""
    usage: Usage = Usage()


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """One executor worker (a Dask worker) across the run."""

    worker: str
    """Its address, like ``tcp://10.0.0.7:40123``."""
    steps: int
    """Step instances whose latest attempt ran on it."""
    busy_s: float
    """What those attempts took, summed (an attempt still running counts nothing)."""
    failed: int
    """Of those instances, the ones that failed."""
    lost: int
    """Attempts that failed because it died (``worker_lost``), from the event log."""

    @property
    def failures(self) -> dict[str, int]:
        """``{"failed": n, "worker_lost": m}`` without the zeros."""
        counts = {"failed": self.failed, "worker_lost": self.lost}
        return {k: v for k, v in counts.items() if v}


@dataclass(frozen=True, slots=True)
class PathEntry:
    """One instance on the critical path and the slice of wall time it accounts for.

    Its segment runs from the end of the previous entry (the run's start for the
    first) to its own end: ``gap_s + wait_s + latency_s + retry_s + run_s``.
    """

    id: str
    """The instance id."""
    step: str
    """The top-level step it belongs to."""
    gap_s: float
    """Previous end → ready: scheduling, a map's expansion, a loop's condition."""
    wait_s: float
    """Ready → first attempt behind a full limit: waiting for a slot (``queued``)."""
    retry_s: float
    """First attempt → last attempt: failed attempts and backoff delays."""
    run_s: float
    """The last attempt."""
    latency_s: float = 0.0
    """Ready → first attempt with no limit full: scheduling latency."""
    queued: str | None = None
    """The limit it waited behind (``max_parallel``, ``pool:NAME``), if any."""

    @property
    def segment_s(self) -> float:
        return self.gap_s + self.wait_s + self.latency_s + self.retry_s + self.run_s


@dataclass(frozen=True, slots=True)
class CriticalPath:
    """The chain of instances that determined the wall time, first to last."""

    entries: tuple[PathEntry, ...]
    tail_s: float
    """Last entry's end → the run's end: outputs, artifacts, the final checkpoint."""
    source: str
    """``plan`` when dependencies came from the workflow file, ``timings`` otherwise."""

    @property
    def wait_s(self) -> float:
        """Waiting for a slot behind a full limit, over the path."""
        return sum(e.wait_s for e in self.entries)

    @property
    def latency_s(self) -> float:
        """Scheduling latency (ready → started, no limit full), over the path."""
        return sum(e.latency_s for e in self.entries)

    @property
    def retry_s(self) -> float:
        return sum(e.retry_s for e in self.entries)

    def waits_by_limit(self) -> dict[str, float]:
        """Waiting for a slot over the path, by the limit that was full (``max_parallel``,
        ``pool:NAME``)."""
        out: dict[str, float] = {}
        for e in self.entries:
            if e.queued and e.wait_s > 0:
                out[e.queued] = out.get(e.queued, 0.0) + e.wait_s
        return out


@dataclass(frozen=True, slots=True)
class BudgetReport:
    """One budget of the run — its own or a step's — and what was spent under it."""

    scope: str
    """``run``, or the id of the step whose ``budget`` it is."""
    tokens: int | None
    """The token limit; None when only the cost is limited."""
    cost: float | None
    """The cost limit, in the currency of ``config.prices``; None for tokens only."""
    spent_tokens: int
    """Tokens its calls used (earlier processes of the run included)."""
    spent_cost: float
    """What its calls cost."""
    priced: bool = True
    """False when a call's cost is unknown (a model without a price, a server that
    reported no usage): ``spent_cost`` counts the priced calls only."""


@dataclass(frozen=True, slots=True)
class Report:
    """Everything `storyflow report` shows about one run."""

    run_id: str
    workflow: str
    workflow_version: str | None
    status: str
    """The run's status."""
    started_at: float
    """When the run was created."""
    ended_at: float | None
    """When it last finished; None while it runs."""
    wall_s: float
    """Start → end (now, for a run still going)."""
    instances: tuple[InstanceReport, ...]
    """Every step instance, in display order."""
    agents: tuple[AgentReport, ...]
    """Every agent that served an attempt or whose breaker opened, by name."""
    critical_path: CriticalPath
    graph: str | None = None
    """The workflow's plan as text, when its file is still there and unchanged."""
    workers: tuple[WorkerReport, ...] = ()
    """Every executor worker a step instance ran on, by address; empty when every step
    ran in the ``storyflow`` process."""
    levels: tuple[tuple[str, ...], ...] = ()
    """The plan's top-level steps by level (0 = can start at once), when the workflow
    file is still there and unchanged; empty otherwise."""
    edges: tuple[tuple[str, str], ...] = ()
    """The plan's dependencies as (step, the step it needs), top level and loop bodies
    (``polish.revise`` needs ``polish.critique``); empty when the plan is unknown."""
    children: tuple[Report, ...] = ()
    """The reports of its sub-workflow steps' child runs (their own children inside)."""
    budgets: tuple[BudgetReport, ...] = ()
    """The run's budget and its steps' budgets that calls were made under, run first."""

    @property
    def steps(self) -> tuple[InstanceReport, ...]:
        """The plan's top-level steps (a map or a loop counting once)."""
        return tuple(i for i in self.instances if i.parent is None)

    @property
    def tasks(self) -> tuple[InstanceReport, ...]:
        """The instances that call agents (not maps and loops, which are made of others)."""
        return tuple(i for i in self.instances if i.kind == "task")

    def share_pct(self, seconds: float) -> float:
        """``seconds`` as a percentage of the wall time."""
        return 100.0 * seconds / self.wall_s if self.wall_s > 0 else 0.0


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, end - start)
