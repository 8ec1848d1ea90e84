"""Pools: shared capacity that steps draw from — a concurrency limit and a rate limit.

Each pool of the workflow becomes a `Pool` for the run: a count of slots in use
against ``concurrency``, and a `TokenBucket` for ``rate``. A call (an attempt of a
step whose agent is in the pool) takes a slot and a token; the slot is given back
when the attempt ends (a step waiting out a retry delay holds no slot).

Two kinds of waiters, each served first come, first served:

- *parked* steps, ready but not started: the scheduler parks a step whose pool cannot
  take it and moves on, so a full pool never holds up steps of other pools. When the
  pool can take its oldest parked step again, the pool is offered to the scheduler
  (`Pools.next_seq`, a heap keyed by the order steps became ready), which starts it
  as soon as ``--max-parallel`` allows.
- *held* waiters, steps already running that need the pool for their next attempt (a
  retry, or a fallback agent in another pool). They already count against
  ``--max-parallel``, so they go before parked steps: otherwise a full run could wait
  on itself.

Nothing polls: a slot given back wakes its pool; a missing token arms one
``call_later`` for the moment the next token is due. Every operation is O(1)
amortised (O(log P) for the heap, P the number of pools).

The bucket starts full and holds one second's worth of tokens (at least one), so
``rate: 10/s`` lets ten calls start at once, then one every 100 ms, and ``60/min``
one a second. Time comes from an injected monotonic clock.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from storyflow.spec.model import Pool as PoolSpec

_EPSILON = 1e-9


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``capacity`` banked; starts full."""

    __slots__ = ("capacity", "rate_per_s", "tokens", "updated")

    def __init__(self, rate_per_s: float, now: float, capacity: float | None = None) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate must be positive, got {rate_per_s}")
        self.rate_per_s = rate_per_s
        self.capacity = capacity if capacity is not None else max(1.0, math.floor(rate_per_s))
        self.tokens = self.capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now

    def available(self, now: float) -> bool:
        """Whether a token can be taken now."""
        self._refill(now)
        return self.tokens >= 1.0 - _EPSILON

    def take(self, now: float) -> None:
        """Take one token (the caller checked `available`)."""
        self._refill(now)
        self.tokens -= 1.0

    def spend(self, now: float, amount: float) -> None:
        """Use ``amount`` after the fact (LLM tokens as reported): the level may go negative."""
        self._refill(now)
        self.tokens -= amount

    def wait_s(self, now: float) -> float:
        """Seconds until a token is available (0 if one is)."""
        self._refill(now)
        missing = 1.0 - self.tokens
        return 0.0 if missing <= _EPSILON else missing / self.rate_per_s


class Pool:
    """One pool in one run: slots in use, its bucket and its waiters."""

    __slots__ = (
        "bucket", "held", "index", "limit", "name", "running", "timer", "usage", "waiting"
    )

    def __init__(self, spec: PoolSpec, index: int, now: float) -> None:
        self.name = spec.name
        self.index = index
        self.limit = spec.concurrency
        self.bucket = None if not spec.rate_per_s else TokenBucket(spec.rate_per_s, now)
        self.usage = (
            None
            if not spec.tokens_per_s
            else TokenBucket(spec.tokens_per_s, now, capacity=max(1.0, spec.tokens_per_s * 60))
        )
        """LLM tokens: a minute's worth banked; calls wait while it is spent (below 1)."""
        self.running = 0
        """Slots in use."""
        self.waiting: deque[tuple[int, Any]] = deque()
        """Parked steps as (ready sequence number, item), oldest first."""
        self.held: deque[tuple[asyncio.Future[None], bool]] = deque()
        """Running steps waiting for this pool: (their future, whether they need a slot)."""
        self.timer: asyncio.TimerHandle | None = None

    def admits(self, now: float, slot: bool = True) -> bool:
        """Whether a call (``slot``) or a token alone could be taken now."""
        if slot and self.limit is not None and self.running >= self.limit:
            return False
        if self.usage is not None and not self.usage.available(now):
            return False
        return self.bucket is None or self.bucket.available(now)

    def take(self, now: float, slot: bool = True) -> None:
        if slot:
            self.running += 1
        if self.bucket is not None:
            self.bucket.take(now)

    def wait_s(self, now: float, slot: bool) -> float | None:
        """When a waiter could be served by time alone; None if it needs a slot back."""
        if slot and self.limit is not None and self.running >= self.limit:
            return None
        wait = 0.0 if self.bucket is None else self.bucket.wait_s(now)
        if self.usage is not None:
            wait = max(wait, self.usage.wait_s(now))
        return wait


class Pools:
    """The pools of one run and the order in which their parked steps start.

    ``on_ready`` is called (from a timer) when a pool can take a parked step again: the
    scheduler then pumps. ``before_wait`` is called before a running step awaits a pool
    (the engine flushes its checkpoints there).
    """

    def __init__(
        self,
        specs: Mapping[str, PoolSpec],
        monotonic: Callable[[], float],
        on_ready: Callable[[], None],
        before_wait: Callable[[], None] = lambda: None,
    ) -> None:
        now = monotonic()
        self.by_name = {name: Pool(spec, i, now) for i, (name, spec) in enumerate(specs.items())}
        self._monotonic = monotonic
        self._on_ready = on_ready
        self._before_wait = before_wait
        self._heap: list[tuple[int, int, Pool]] = []
        """(ready sequence of a pool's oldest parked step, pool index, pool); checked lazily."""

    def get(self, name: str | None) -> Pool | None:
        return None if name is None else self.by_name.get(name)

    # -- the scheduler's side ------------------------------------------------------------
    def admits_now(self, pool: Pool) -> bool:
        """Whether a newly ready step may start at once (nothing parked, capacity free)."""
        return not pool.waiting and not pool.held and pool.admits(self._monotonic())

    def take(self, pool: Pool) -> None:
        """Take a slot and a token for a step starting now (after `admits_now`)."""
        pool.take(self._monotonic())

    def park(self, pool: Pool, seq: int, item: Any) -> None:
        """Queue a ready step that cannot start yet."""
        pool.waiting.append((seq, item))
        self.wake(pool)

    def next_seq(self) -> int | None:
        """Ready sequence number of the oldest parked step that could start now, if any."""
        heap = self._heap
        now = self._monotonic()
        while heap:
            seq, _, pool = heap[0]
            if pool.waiting and pool.waiting[0][0] == seq and not pool.held and pool.admits(now):
                return seq
            heapq.heappop(heap)  # stale: the pool pushes itself again when it can
        return None

    def pop(self) -> tuple[Any, Pool]:
        """Start the step `next_seq` named: its slot and token are taken."""
        _, _, pool = heapq.heappop(self._heap)
        _, item = pool.waiting.popleft()
        pool.take(self._monotonic())
        self.wake(pool)
        return item, pool

    def drain(self) -> list[Any]:
        """Every parked step, oldest first per pool (the run is stopping); timers off."""
        out: list[Any] = []
        for pool in self.by_name.values():
            out.extend(item for _, item in pool.waiting)
            pool.waiting.clear()
        self._heap.clear()
        self.close()
        return out

    def close(self) -> None:
        for pool in self.by_name.values():
            if pool.timer is not None:
                pool.timer.cancel()
                pool.timer = None

    # -- a running step's side -----------------------------------------------------------
    async def acquire(self, pool: Pool, *, slot: bool) -> None:
        """Wait for a slot and a token (``slot``) or a token alone, before parked steps."""
        if not pool.held and pool.admits(self._monotonic(), slot):
            pool.take(self._monotonic(), slot)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pool.held.append((future, slot))
        self.wake(pool)
        if future.done():
            return
        self._before_wait()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and slot:
                pool.running -= 1  # granted, then cancelled before it could be used
            self.wake(pool)
            raise

    def spend(self, pool: Pool, tokens: int) -> None:
        """Count LLM tokens a call of the pool used (a pool with a ``tokens`` limit)."""
        if pool.usage is not None and tokens > 0:
            pool.usage.spend(self._monotonic(), tokens)

    def release(self, pool: Pool) -> None:
        """Give a slot back."""
        pool.running -= 1
        self.wake(pool)

    # -- wake-ups ------------------------------------------------------------------------
    def wake(self, pool: Pool) -> None:
        """Serve what the pool can serve now; arm a timer for what time alone will allow."""
        now = self._monotonic()
        held = pool.held
        while held:
            future, slot = held[0]
            if future.done():  # its step was cancelled
                held.popleft()
                continue
            if not pool.admits(now, slot):
                self._arm(pool, now, slot)
                return
            held.popleft()
            pool.take(now, slot)
            future.set_result(None)
        if pool.waiting:
            if pool.admits(now):
                heapq.heappush(self._heap, (pool.waiting[0][0], pool.index, pool))
            else:
                self._arm(pool, now, True)

    def _arm(self, pool: Pool, now: float, slot: bool) -> None:
        if pool.timer is not None:
            return
        delay = pool.wait_s(now, slot)
        if delay is not None:
            pool.timer = asyncio.get_running_loop().call_later(delay, self._fire, pool)

    def _fire(self, pool: Pool) -> None:
        pool.timer = None
        self.wake(pool)
        self._on_ready()


class Slots:
    """The pool slots step instances hold between attempts (``inst.slot``, and
    ``inst.grant`` for what the scheduler took for a first attempt); a slot given back
    may let a parked step start (``on_free``)."""

    __slots__ = ("on_free", "pools")

    def __init__(self, pools: Pools, on_free: Callable[[], None]) -> None:
        self.pools = pools
        self.on_free = on_free

    async def hold_for(self, inst: Any, name: str | None) -> None:
        """Hold what the next attempt of ``inst`` needs from pool ``name`` (a slot and
        a token)."""
        pool = self.pools.get(name)
        grant, inst.grant = inst.grant, None
        if grant is not None and grant is pool:
            return  # the scheduler took both for this attempt
        if inst.slot is not pool:
            self.release(inst)
            if pool is not None:
                await self.pools.acquire(pool, slot=True)
                inst.slot = pool
        elif pool is not None and pool.bucket is not None:
            await self.pools.acquire(pool, slot=False)  # the slot is held: a token

    def release(self, inst: Any, *, pump: bool = True) -> None:
        """Give back the slot ``inst`` holds; a parked step may start (``pump``)."""
        if inst.slot is not None:
            slot, inst.slot, inst.grant = inst.slot, None, None
            self.pools.release(slot)
            if pump and slot.waiting:
                self.on_free()

    def spender(self, inst: Any) -> Callable[[int], None]:
        """Counts reported tokens against the ``tokens`` limit of the pool ``inst`` holds."""
        pools = self.pools

        def spend(tokens: int) -> None:
            if inst.slot is not None:
                pools.spend(inst.slot, tokens)

        return spend
