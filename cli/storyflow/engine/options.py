"""How a run executes: what the commands (and a parent run) hand the scheduler.

Clocks, sleep, randomness and the environment are injected here, so tests drive time
and backoff without sleeping.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storyflow.engine.executors import LOCAL, Executor
from storyflow.store import StepRecord

if TYPE_CHECKING:
    from storyflow.engine.replay import ReplayBook


@dataclass
class Options:
    """How a run executes; clocks, sleep and randomness are injected for tests."""

    max_parallel: int = 8
    forced: frozenset[str] = frozenset()
    """Steps that re-run even if a previous attempt succeeded (``--from`` and downstream)."""
    previous: Mapping[str, StepRecord] = field(default_factory=dict)
    """Records of an earlier process of this run (resume), or of the run it forks."""
    origin: str | None = None
    """The run ``previous`` comes from when it is not this one (``storyflow fork``): a
    kept instance's record is copied from it, marked ``forked_from``."""
    replay: ReplayBook | None = None
    """Answers agent calls from a recorded run (``storyflow replay``)."""
    clock: Callable[[], float] = time.time
    """Wall-clock epoch seconds, for records and events."""
    monotonic: Callable[[], float] = time.monotonic
    """For breaker cooldowns and pool rates."""
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    """Waits out a retry delay."""
    rand: Callable[[], float] = random.random
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    heartbeat: Callable[[], None] | None = None
    heartbeat_every_s: float = 5.0
    answers: Mapping[str, Any] = field(default_factory=dict)
    """Answers for ``human`` steps by instance id (``resume --answer``), checked already."""
    ask: Callable[[str, str, dict[str, Any]], Awaitable[Any]] | None = None
    """Asks a person on the terminal ``(step, question, schema) -> answer``; None when
    there is no terminal: a ``human`` step then pauses the run."""
    depth: int = 0
    """How many parent runs this run has (a sub-workflow's is 1)."""
    ancestry: tuple[str, ...] = ()
    """Workflow files of the runs above this one, to refuse a workflow that runs itself."""
    no_cache: bool = False
    """Bypass the call cache (``--no-cache``)."""
    executor: Executor = LOCAL
    """Where attempts run (`storyflow.engine.executors`); started by the caller."""
