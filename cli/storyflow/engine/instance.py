"""A step instance in memory, and the `StepRecord` that checkpoints it."""

from __future__ import annotations

import asyncio
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
        "fingerprint",
        "grant",
        "id",
        "node",
        "output",
        "ready_at",
        "reason",
        "seq",
        "slot",
        "started_at",
        "state",
        "task",
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

    def record(self, definition: str) -> StepRecord:
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
            meta={"def": definition},
        )
