"""Token and cost accounting, budgets, and the call cache of one run.

An agent that calls a model reports each call's usage through `Call.meter` (a
``workflow`` step reports what its child run used, already priced); the run's
`Usage` adds it to the step instance and to the run, prices it from the workflow's
``config.prices`` (``{model: {input: X, output: Y}}``, per million tokens), and counts
it against the pool's ``tokens`` limit. Before each attempt of a metered step (an
``llm`` step), the step's and the run's ``budget`` are checked with an estimate of the
call; a call that would go over fails the step with class ``budget_exceeded`` (no
retry), and the run can be resumed with a raised budget (``--set budget.tokens=N``).
Totals are O(1) per call: counters, no scans.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from storyflow.errors import BudgetExceeded
from storyflow.spec.model import Budget

METERED_KINDS = frozenset({"llm"})
"""Agent kinds that report usage; only their calls are checked against budgets."""
_CHARS_PER_TOKEN = 4


def new_usage() -> dict[str, Any]:
    return {"input_tokens": 0, "output_tokens": 0, "tokens": 0, "cost": 0.0, "calls": 0,
            "cached_calls": 0}


class Usage:
    """One run's usage: totals, prices and budgets."""

    def __init__(self, config: Mapping[str, Any], budget: Budget | None,
                 start: Mapping[str, Any] | None = None) -> None:
        prices = config.get("prices") if isinstance(config, Mapping) else None
        self.prices: Mapping[str, Any] = prices if isinstance(prices, Mapping) else {}
        self.budget = budget
        self.totals = new_usage()
        """The run's usage, including earlier processes of the run (``start``)."""
        for key, value in (start or {}).items():
            if key in self.totals and isinstance(value, (int, float)):
                self.totals[key] = value

    def price(self, model: str | None, input_tokens: int, output_tokens: int) -> float:
        """Cost of a call from the price table (0 for a model without a price)."""
        entry = self.prices.get(model or "")
        if not isinstance(entry, Mapping):
            return 0.0
        rate_in = entry.get("input", 0) or 0
        rate_out = entry.get("output", 0) or 0
        return (input_tokens * float(rate_in) + output_tokens * float(rate_out)) / 1_000_000

    def meter(
        self, inst: Any, spend: Callable[[int], None] | None
    ) -> Callable[[dict[str, Any]], None]:
        """The ``Call.meter`` of one attempt of ``inst``."""

        def report(u: dict[str, Any]) -> None:
            cached = bool(u.get("cached"))
            tin = _count(u.get("input_tokens"))
            tout = _count(u.get("output_tokens"))
            cost = 0.0 if cached else self.price(u.get("model"), tin, tout)
            if isinstance(u.get("cost"), (int, float)):
                cost = float(u["cost"])  # already priced (a sub-workflow's usage)
            calls = u.get("calls", 1)
            mine = inst.usage
            if mine is None:
                mine = inst.usage = new_usage()
            for target in (mine, self.totals):
                target["calls"] += calls
                if cached:
                    target["cached_calls"] += 1
                    continue  # a cached reply costs nothing and uses no tokens
                target["input_tokens"] += tin
                target["output_tokens"] += tout
                target["tokens"] += tin + tout
                target["cost"] = round(target["cost"] + cost, 10)
            if spend is not None and not cached:
                spend(tin + tout)

        return report

    def check(self, inst: Any, budget: Budget | None, inputs: Mapping[str, Any]) -> None:
        """Raise BudgetExceeded when the next call of ``inst`` would go over a budget."""
        if budget is None and self.budget is None:
            return
        tokens = estimate_tokens(inputs)
        cost = self.price(_model(inputs), tokens, 0)
        mine = inst.usage or new_usage()
        for scope, limit, used in (("step", budget, mine), ("run", self.budget, self.totals)):
            if limit is None:
                continue
            where = "budget" if scope == "run" else f"steps.{_base(inst)}.budget"
            if limit.tokens is not None and used["tokens"] + tokens > limit.tokens:
                raise BudgetExceeded(
                    f"the {scope}'s budget of {limit.tokens} tokens would be exceeded: "
                    f"{used['tokens']} used, the next call needs about {tokens}",
                    hint=f"raise it and resume: storyflow resume RUN --set {where}.tokens=N",
                )
            if limit.cost is not None and used["cost"] + cost > limit.cost:
                raise BudgetExceeded(
                    f"the {scope}'s budget of {limit.cost:g} would be exceeded: "
                    f"{used['cost']:.4f} spent, the next call costs about {cost:.4f}",
                    hint=f"raise it and resume: storyflow resume RUN --set {where}.cost=X",
                )


def estimate_tokens(inputs: Mapping[str, Any]) -> int:
    """A call's tokens before it is made: its text at ~4 characters a token, plus the
    reply's ``max_tokens``."""
    text = 0
    for key in ("system", "prompt"):
        value = inputs.get(key)
        if isinstance(value, str):
            text += len(value)
    messages = inputs.get("messages")
    if messages is not None:
        text += len(json.dumps(messages, default=str))
    reply = inputs.get("max_tokens")
    return math.ceil(text / _CHARS_PER_TOKEN) + (reply if isinstance(reply, int) else 0)


def _model(inputs: Mapping[str, Any]) -> str | None:
    model = inputs.get("model")
    return model if isinstance(model, str) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


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
