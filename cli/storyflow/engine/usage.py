"""Token and cost accounting, budgets, and the call cache of one run.

An agent that calls a model reports each call's usage through `Call.meter` (a
``workflow`` step's child run reports each of its calls through its parent's step);
the run's `Usage` adds it to the step instance and to the run, prices it from the
workflow's ``config.prices`` (``{model: {input: X, output: Y}}``, per million tokens),
and counts it against the pool's ``tokens`` limit. Totals are O(1) per call.

**Budgets are ceilings.** Before each model call the agent asks for room through
`Call.reserve` with the call's estimate — its prompt plus its reply's ``max_tokens``
(or the agent's default allowance), priced like usage. It counts against the run's
``budget`` and its step's (all the step's instances and attempts: map items, loop
iterations, retries, fallbacks):

- what was spent plus the estimate would go over a limit: the call is refused before
  it is made, as ``budget_exceeded`` (not retried; resume with a raised budget,
  ``--set budget.tokens=N``);
- it fits, but not beside what the calls in flight hold: it waits for them to settle
  (they hold nothing once metered) and asks again;
- else it holds its estimate until its usage is metered or it fails.

So calls in parallel cannot jointly cross a budget, and whatever order they run in,
the same number of them run. `Metering.close` gives back what an attempt still holds
when it ends — failed or cancelled too — so holds never leak. A reply that lands over
anyway (a server that ignores ``max_tokens``) is recorded, and its attempt fails as
``budget_exceeded``: never a quiet success. A child run's `Usage` has its parent's
step ``Call`` as `Usage.outer`, where each call reserves (after its own run's budgets:
one order, so no two calls wait on each other) and reports too: the parent's budgets
hold over its children.

**Unknown cost.** A call whose model has no price, or whose server reported no
usage, has an unknown cost: the usage dict says ``priced: false`` (``cost`` then
counts the priced calls only), and a ``cost`` budget refuses a call it cannot price.
A streamed reply whose server sent no usage is counted from its text by the agent and
reported ``estimated``: the usage dict then says ``estimated: true``. So is a stream that
failed once its text had begun (cut, silent, or stopped by the step's timeout): its
prompt and the text that arrived were billed, so the retries of a failing stream spend
the budgets too, and stop at them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from storyflow.errors import BudgetExceeded
from storyflow.spec.model import Budget

METERED_KINDS = frozenset({"llm"})
"""Agent kinds that call models and report usage."""
_EPSILON = 1e-9
"""Cost comparisons are of sums of floats."""


def new_usage() -> dict[str, Any]:
    return {"input_tokens": 0, "output_tokens": 0, "tokens": 0, "cost": 0.0, "calls": 0,
            "cached_calls": 0, "priced": True}


def _nothing() -> None:
    """The release of a reservation that holds nothing."""


class _Ceiling:
    """One budget in force — the run's or a step's — with what was spent under it and
    what the calls in flight hold."""

    __slots__ = ("held_cost", "held_tokens", "holds", "limit", "scope", "spent", "where")

    def __init__(self, scope: str, where: str, limit: Budget, spent: dict[str, Any]) -> None:
        self.scope = scope
        """``run`` or ``step``, for messages."""
        self.where = where
        """The ``--set`` path of the budget: ``budget`` or ``steps.ID.budget``."""
        self.limit = limit
        self.spent = spent
        """A dict with ``tokens`` and ``cost``: the run's totals, or the step's entry."""
        self.holds = 0
        """Calls in flight holding room under it (``held_*``: what they hold)."""
        self.held_tokens = 0
        self.held_cost = 0.0

    def refusal(self, tokens: int, cost: float, priced: bool,
                est: Mapping[str, Any]) -> BudgetExceeded | None:
        """Why a call of this estimate may not run at all (what was spent leaves no
        room for it), or None."""
        lim, used = self.limit, self.spent
        if lim.tokens is not None and used["tokens"] + tokens > lim.tokens:
            return BudgetExceeded(
                f"the {self.scope}'s budget of {lim.tokens} tokens could be exceeded: "
                f"{used['tokens']} used, {_needs(est)} up to {tokens} tokens "
                f"({_count(est.get('input_tokens'))} prompt + "
                f"{_count(est.get('output_tokens'))} reply)",
                hint=_hint(self.where, "tokens", "N", est),
            )
        if lim.cost is None:
            return None
        if not priced:
            model = est.get("model") or "its model"
            return BudgetExceeded(
                f"the {self.scope}'s budget of {lim.cost:g} cannot be kept: {model} has no "
                "price in config.prices, so the call's cost is unknown",
                hint=f"add its price (per million tokens): --set config.prices.{model}="
                "'{input: X, output: Y}', or drop the cost budget",
            )
        if used["cost"] + cost > lim.cost + _EPSILON:
            return BudgetExceeded(
                f"the {self.scope}'s budget of {lim.cost:g} could be exceeded: "
                f"{used['cost']:.4f} spent, {_needs(est)} up to {cost:.4f}",
                hint=_hint(self.where, "cost", "X", est),
            )
        return None

    def room(self, tokens: int, cost: float) -> bool:
        """Whether a call of this estimate fits beside what the calls in flight hold."""
        if not self.holds:
            return True  # `refusal` said it fits
        lim, used = self.limit, self.spent
        return (lim.tokens is None or used["tokens"] + self.held_tokens + tokens <= lim.tokens) \
            and (lim.cost is None or used["cost"] + self.held_cost + cost <= lim.cost + _EPSILON)

    def crossed(self) -> BudgetExceeded | None:
        """Why the spending already went over the limit, or None."""
        lim, used = self.limit, self.spent
        over = None
        if lim.tokens is not None and used["tokens"] > lim.tokens:
            over = f"of {lim.tokens} tokens was exceeded: {used['tokens']} used", "tokens", "N"
        elif lim.cost is not None and used["cost"] > lim.cost + _EPSILON:
            over = f"of {lim.cost:g} was exceeded: {used['cost']:.4f} spent", "cost", "X"
        if over is None:
            return None
        text, key, value = over
        return BudgetExceeded(
            f"the {self.scope}'s budget {text} (a reply came back longer than the call "
            "reserved: does the server honour max_tokens?); the usage is recorded",
            hint=f"raise it and resume: storyflow resume RUN --set {self.where}.{key}={value}",
        )


def _needs(est: Mapping[str, Any]) -> str:
    calls = est.get("calls", 1)
    return "the next call needs" if calls == 1 else \
        f"the attempt's {calls} calls (its repairs included) need"


def _hint(where: str, key: str, value: str, est: Mapping[str, Any]) -> str:
    resume = f"raise it and resume: storyflow resume RUN --set {where}.{key}={value}"
    if est.get("reply_default"):
        reply = _count(est.get("output_tokens")) // (_count(est.get("calls")) or 1)
        return (f"the step sets no max_tokens, so each call reserves the llm agent's "
                f"default of {reply} tokens for its reply: set with.max_tokens to "
                f"reserve less, or {resume}")
    return resume


class _Hold:
    """What one call reserved, until it is released (once)."""

    __slots__ = ("ceilings", "cost", "outer", "tokens", "usage")

    def __init__(self, usage: Usage, ceilings: list[_Ceiling], tokens: int, cost: float,
                 outer: Callable[[], None]) -> None:
        self.usage = usage
        self.ceilings: list[_Ceiling] | None = ceilings
        self.tokens = tokens
        self.cost = cost
        self.outer = outer

    def release(self) -> None:
        ceilings, self.ceilings = self.ceilings, None
        if ceilings is None:
            return
        for c in ceilings:
            c.holds -= 1
            c.held_tokens -= self.tokens
            c.held_cost -= self.cost
            if not c.holds:
                c.held_tokens, c.held_cost = 0, 0.0  # no float residue
        self.outer()
        self.usage.wake()


class Usage:
    """One run's usage: totals, prices and budgets."""

    def __init__(self, config: Mapping[str, Any], budget: Budget | None,
                 start: Mapping[str, Any] | None = None) -> None:
        prices = config.get("prices") if isinstance(config, Mapping) else None
        self.prices: Mapping[str, Any] = prices if isinstance(prices, Mapping) else {}
        self.budget = budget
        self.totals = new_usage()
        """The run's usage, including earlier processes of the run (``start``); with
        budgets, also ``budget`` (the run's limits) and ``steps`` (per step with a
        budget: its limits, ``tokens`` and ``cost``)."""
        start = start or {}
        for key, value in start.items():
            if key in self.totals and isinstance(value, (int, float)):
                self.totals[key] = value
        if start.get("estimated") is True:
            self.totals["estimated"] = True
        steps = start.get("steps")
        if isinstance(steps, Mapping) and steps:
            self.totals["steps"] = {
                sid: {"budget": dict(entry.get("budget") or {}),
                      "tokens": _count(entry.get("tokens")),
                      "cost": float(entry.get("cost") or 0.0),
                      **({"priced": False} if entry.get("priced") is False else {})}
                for sid, entry in steps.items() if isinstance(entry, Mapping)
            }
        self._run: _Ceiling | None = None
        if budget is not None and (budget.tokens is not None or budget.cost is not None):
            self.totals["budget"] = _limits(budget)
            self._run = _Ceiling("run", "budget", budget, self.totals)
        self._steps: dict[str, _Ceiling] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self.outer: Any = None
        """A child run's: its parent's step ``Call``, where each call also reserves and
        reports (None for a top-level run)."""

    def price(self, model: str | None, input_tokens: int, output_tokens: int) -> float:
        """Cost of a call from the price table (0 for a model without a price)."""
        entry = self.prices.get(model or "")
        if not isinstance(entry, Mapping):
            return 0.0
        rate_in = entry.get("input", 0) or 0
        rate_out = entry.get("output", 0) or 0
        return (input_tokens * float(rate_in) + output_tokens * float(rate_out)) / 1_000_000

    def has_price(self, model: str | None) -> bool:
        """Whether the price table prices ``model``."""
        return isinstance(self.prices.get(model or ""), Mapping)

    def attempt(self, inst: Any, budget: Budget | None,
                spend: Callable[[int], None] | None) -> Metering:
        """The ``Call.reserve`` and ``Call.meter`` of one attempt of ``inst``."""
        return Metering(self, inst, budget, spend)

    async def reserve(self, inst: Any, budget: Budget | None,
                      est: Mapping[str, Any]) -> Callable[[], None]:
        """Hold room for one call of ``inst`` (``budget``: its step's) — waiting for
        calls in flight when only their holds are in the way; raise BudgetExceeded
        when a budget could be crossed. Returns the release."""
        ceilings = self._ceilings(inst, budget)
        if not ceilings and self.outer is None:
            return _nothing
        tin, tout = _count(est.get("input_tokens")), _count(est.get("output_tokens"))
        tokens = tin + tout
        cost, priced = self._cost_of(est, tin, tout)
        while True:
            for c in ceilings:
                refusal = c.refusal(tokens, cost, priced, est)
                if refusal is not None:
                    raise refusal
            if all(c.room(tokens, cost) for c in ceilings):
                break
            await self._settled()
        for c in ceilings:
            c.holds += 1
            c.held_tokens += tokens
            c.held_cost += cost
        hold = _Hold(self, ceilings, tokens, cost, _nothing)
        if self.outer is not None:
            try:
                hold.outer = await self.outer.reserve({**est, "cost": cost, "priced": priced})
            except BudgetExceeded as exc:
                hold.release()
                raise BudgetExceeded(
                    f"{exc.message} (in the parent run, through its step {self.outer.step_id})",
                    hint=(exc.hint or "").replace("storyflow resume RUN",
                                                  "storyflow resume PARENT_RUN"),
                ) from None
            except BaseException:
                hold.release()
                raise
        return hold.release

    def holding(self) -> int:
        """Holds of calls in flight, over every budget (0 once every attempt ended)."""
        ceilings = [self._run, *self._steps.values()]
        return sum(c.holds for c in ceilings if c is not None)

    def wake(self) -> None:
        """Holds were given back: the calls waiting for room ask again."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _settled(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def record(self, inst: Any, budget: Budget | None, u: Mapping[str, Any],
               spend: Callable[[int], None] | None) -> BudgetExceeded | None:
        """Add one call's usage to ``inst``, its step and the run; why a budget is now
        crossed, or None."""
        cached = bool(u.get("cached"))
        estimated = not cached and u.get("estimated") is True
        tin = _count(u.get("input_tokens"))
        tout = _count(u.get("output_tokens"))
        if cached:
            cost, priced = 0.0, True  # a cached reply costs nothing and uses no tokens
        else:
            cost, priced = self._cost_of(u, tin, tout)
            if u.get("input_tokens") is None or u.get("output_tokens") is None:
                priced = False  # the server reported no usage: its cost is unknown
        calls = u.get("calls", 1)
        mine = inst.usage
        if mine is None:
            mine = inst.usage = new_usage()
        for target in (mine, self.totals):
            target["calls"] += calls
            if cached:
                target["cached_calls"] += 1
                continue
            target["input_tokens"] += tin
            target["output_tokens"] += tout
            target["tokens"] += tin + tout
            target["cost"] = round(target["cost"] + cost, 10)
            if not priced:
                target["priced"] = False
            if estimated:
                target["estimated"] = True
        ceilings = self._ceilings(inst, budget)
        if not cached:
            for c in ceilings:
                if c is not self._run:  # the run's spent is the totals, counted above
                    c.spent["tokens"] += tin + tout
                    c.spent["cost"] = round(c.spent["cost"] + cost, 10)
                    if not priced:
                        c.spent["priced"] = False
            if spend is not None:
                spend(tin + tout)
        if self.outer is not None:
            self.outer.meter({"model": u.get("model"), "input_tokens": tin,
                              "output_tokens": tout, "cost": cost, "priced": priced,
                              "calls": calls, "cached": cached,
                              **({"estimated": True} if estimated else {})})
        if cached:
            return None
        for c in ceilings:
            crossed = c.crossed()
            if crossed is not None:
                return crossed
        return None

    def _cost_of(self, u: Mapping[str, Any], tin: int, tout: int) -> tuple[float, bool]:
        """A call's (or an estimate's) cost and whether it is known: priced already (a
        child run's report), else from the price table."""
        cost = u.get("cost")
        if isinstance(cost, (int, float)) and not isinstance(cost, bool):
            return float(cost), u.get("priced") is not False
        model = u.get("model")
        name = model if isinstance(model, str) else None
        return self.price(name, tin, tout), self.has_price(name) or tin + tout == 0

    def _ceilings(self, inst: Any, budget: Budget | None) -> list[_Ceiling]:
        """The budgets a call of ``inst`` counts against: the run's, its step's."""
        out = [self._run] if self._run is not None else []
        if budget is None or (budget.tokens is None and budget.cost is None):
            return out
        sid = _base(inst)
        ceiling = self._steps.get(sid)
        if ceiling is None or ceiling.limit != budget:
            steps = self.totals.setdefault("steps", {})
            entry = steps.setdefault(sid, {"tokens": 0, "cost": 0.0})
            entry["budget"] = _limits(budget)
            ceiling = self._steps[sid] = _Ceiling("step", f"steps.{sid}.budget", budget, entry)
        out.append(ceiling)
        return out


class Metering:
    """One attempt's budget hooks: `reserve` and `meter` are its ``Call``'s; `close`
    gives back what it still holds when the attempt ends, however it ends; `over` is
    why the attempt must fail though the agent succeeded (a reply that landed over)."""

    __slots__ = ("budget", "holds", "inst", "over", "spend", "usage")

    def __init__(self, usage: Usage, inst: Any, budget: Budget | None,
                 spend: Callable[[int], None] | None) -> None:
        self.usage = usage
        self.inst = inst
        self.budget = budget
        self.spend = spend
        self.holds: dict[int, Callable[[], None]] = {}
        self.over: BudgetExceeded | None = None

    async def reserve(self, est: dict[str, Any]) -> Callable[[], None]:
        release = await self.usage.reserve(self.inst, self.budget, est)
        if release is _nothing:
            return _nothing
        key = id(release)
        self.holds[key] = release

        def settle() -> None:
            if self.holds.pop(key, None) is not None:
                release()

        return settle

    def meter(self, u: dict[str, Any]) -> None:
        crossed = self.usage.record(self.inst, self.budget, u, self.spend)
        if crossed is not None and self.over is None:
            self.over = crossed

    def close(self) -> None:
        holds, self.holds = self.holds, {}
        for release in holds.values():
            release()


def _limits(budget: Budget) -> dict[str, Any]:
    return {"tokens": budget.tokens, "cost": budget.cost}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _base(inst: Any) -> str:
    return str(inst.node.step.id)


class StoreCallCache:
    """`storyflow.agents.base.CallCache` over the run store's content-addressed cache."""

    def __init__(self, store: Any, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def get(self, key: str) -> tuple[bool, Any]:
        found, value = self.store.cache_get("call-" + key)
        return bool(found), value

    def put(self, key: str, value: Any) -> None:
        self.store.cache_put("call-" + key, value, self.run_id)
