"""A step instance in memory, and the `StepRecord` that checkpoints it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from storyflow.engine.plan import Node
from storyflow.engine.pools import Pool
from storyflow.events import StepStatus
from storyflow.store import StepRecord

OK = (StepStatus.SUCCEEDED.value, StepStatus.CACHED.value)
"""The statuses of an instance whose output stands (for ``needs`` and for resume)."""


class Instance:
    """One step instance in memory; ``state`` is driven by the lifecycle machine."""

    __slots__ = (
        "agent",
        "attempts",
        "degraded",
        "ended_at",
        "error",
        "extra",
        "fingerprint",
        "forked_from",
        "grant",
        "id",
        "node",
        "output",
        "parent",
        "queued",
        "ready_at",
        "reason",
        "request",
        "seq",
        "slot",
        "started_at",
        "state",
        "task",
        "usage",
        "waiting",
        "worker",
    )

    def __init__(self, node: Node) -> None:
        self.id = node.step.id
        self.node = node
        self.state = StepStatus.PENDING.value
        self.attempts = 0
        self.output: Any = None
        self.error: dict[str, str] | None = None
        self.fingerprint: str | None = None
        self.ready_at: float | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.agent: str | None = node.step.agent
        self.degraded = False
        self.reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.seq = 0
        """Order in which instances became ready."""
        self.slot: Pool | None = None
        """The pool whose slot this instance holds."""
        self.grant: Pool | None = None
        """The pool the scheduler took a slot and a token from for the first attempt."""
        self.parent: Instance | None = None
        """For a map item its map; for a step of a loop iteration its loop."""
        self.usage: dict[str, Any] | None = None
        """Tokens, cost and calls its model calls used (agents that report usage)."""
        self.waiting: list[dict[str, Any]] | None = None
        """The questions of a step paused for an answer (``human``)."""
        self.worker: str | None = None
        """The executor worker that ran the latest attempt (None: this process)."""
        self.queued: str | None = None
        """The full limit it waited behind once ready (``pool:NAME`` or
        ``max_parallel``); None when it could start at once."""
        self.extra: dict[str, Any] | None = None
        """Local names: a map item's (the item, ``index``, ``previous``), a loop
        iteration's (``loop``)."""
        self.request: dict[str, Any] | None = None
        """The rendered request of the latest attempt (`storyflow.engine.replay`)."""
        self.forked_from: str | None = None
        """The run a fork copied this instance's record from."""

    def record(self, definition: str) -> StepRecord:
        meta: dict[str, Any] = {"def": definition}
        if self.waiting:
            meta["waiting"] = self.waiting
        if self.usage:
            meta["usage"] = self.usage
        if self.worker:
            meta["worker"] = self.worker
        if self.queued:
            meta["queued"] = self.queued
        return StepRecord(
            id=self.id,
            status=self.state,
            attempts=self.attempts,
            fingerprint=self.fingerprint,
            output=self.output,
            error=self.error,
            ready_at=self.ready_at,
            started_at=self.started_at,
            ended_at=self.ended_at,
            agent=self.agent,
            degraded=self.degraded,
            request=self.request,
            forked_from=self.forked_from,
            meta=meta,
        )


class MapInstance(Instance):
    """A ``for_each`` step as a whole: its items are `Instance` objects of their own.

    Its record holds the status of the whole, the list of item outputs and
    ``meta["items"]`` (the number of items, so ``show`` can list them).
    """

    __slots__ = ("active", "items", "limit", "next", "settled")

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self.items: list[Instance] = []
        self.next = 0
        """Index of the next item to make ready."""
        self.active = 0
        """Items made ready and not yet settled."""
        self.settled = 0
        step = node.step
        self.limit: int | None = 1 if step.sequential else step.max_parallel
        """Items of this map running at once (None: only the run's bound)."""

    def record(self, definition: str) -> StepRecord:
        rec = super().record(definition)
        if self.items or self.state in OK:
            rec.meta["items"] = len(self.items)
        return rec


class LoopInstance(Instance):
    """A ``loop`` step as a whole. Each iteration makes one instance per step of the
    body (``polish#2.revise``), with dependency counters of its own.

    Its record holds the status of the whole, the chosen iteration's outputs by step id,
    and ``meta["iterations"]`` and ``meta["body"]`` (so ``show`` can list the instances),
    ``meta["best"]`` (the iteration whose outputs stand) and ``meta["scores"]``.
    """

    __slots__ = ("current", "history", "iteration", "left", "needs", "scores")

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self.iteration = 0
        """The iteration under way (1-based); 0 before the first."""
        self.current: dict[str, Instance] = {}
        """The instances of the iteration under way, by step id."""
        self.needs: dict[str, int] = {}
        """Per step of the iteration: needs not yet settled."""
        self.left = 0
        """Steps of the iteration not yet settled."""
        self.history: list[dict[str, Any]] = []
        """Each finished iteration's outputs by step id."""
        self.scores: list[Any] = []
        """Each finished iteration's ``best_by`` score."""

    def record(self, definition: str) -> StepRecord:
        rec = super().record(definition)
        assert self.node.body is not None
        rec.meta["iterations"] = self.iteration
        rec.meta["body"] = list(self.node.body.order)
        if self.scores:
            rec.meta["scores"] = self.scores
        if self.state in OK and self.history:
            rec.meta["best"] = self.best()
        return rec

    def best(self) -> int:
        """The 1-based iteration whose outputs are the loop's: the highest ``best_by``
        score (the later one on a tie), else the last."""
        if self.node.step.loop is None or self.node.step.loop.best_by is None or not self.scores:
            return len(self.history)
        top = max(range(len(self.scores)), key=lambda i: (_rank(self.scores[i]), i))
        return top + 1


def _rank(score: Any) -> tuple[int, float]:
    """Scores compare as numbers; anything else (None, text) ranks below every number."""
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return (0, 0.0)
    return (1, float(score))


def blocked_reason(inst: Instance, top: Mapping[str, Instance]) -> str | None:
    """Why ``inst`` cannot run now that its needs have settled (its ``join`` is not
    met), or None. ``top``: the run's instances, for a step outside any loop."""
    siblings = inst.parent.current if isinstance(inst.parent, LoopInstance) else top
    deps = [siblings[d] for d in inst.node.deps]
    join = inst.node.step.join
    if join == "all_done" or not deps:
        return None
    ok = [d.state in OK for d in deps]
    if join == "any_succeeded":
        return None if any(ok) else "none of its needs succeeded"
    for d, good in zip(deps, ok, strict=True):
        if not good:
            return f"{d.id} {d.state}"
    return None


def new_instance(node: Node) -> Instance:
    """The in-memory instance of a plan node: a map, a loop or a plain step."""
    if node.step.loop is not None:
        return LoopInstance(node)
    if node.step.for_each is not None:
        return MapInstance(node)
    return Instance(node)
