"""Validated raw data → frozen `Workflow`. Precedence everywhere: defaults → agent → step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from storyflow.spec.model import (
    DEFAULT_RETRY_ON,
    Agent,
    Breaker,
    Budget,
    Fallback,
    Loop,
    Pool,
    RetryPolicy,
    Step,
    Workflow,
)
from storyflow.spec.semantic import Analysis
from storyflow.spec.units import duration_s, rate_per_s


def build(
    data: dict[str, Any],
    analysis: Analysis,
    *,
    path: str,
    environment: str | None,
    source_hash: str,
) -> Workflow:
    defaults = data.get("defaults") or {}
    agents = {name: _agent(name, raw) for name, raw in (data.get("agents") or {}).items()}
    pools = {name: _pool(name, raw) for name, raw in (data.get("pools") or {}).items()}
    steps = tuple(
        _step(sid, raw, agents, defaults, analysis)
        for sid, raw in (data.get("steps") or {}).items()
    )
    env = data.get("env") or []
    version = data.get("version")
    return Workflow(
        name=data["name"],
        path=path,
        api_version=data.get("apiVersion", "storyflow/v1"),
        version=None if version is None else str(version),
        description=data.get("description"),
        inputs=dict(data.get("inputs") or {}),
        config=dict(data.get("config") or {}),
        env=tuple(env),
        environments=tuple(data.get("environments") or {}),
        environment=environment,
        pools=pools,
        agents=agents,
        steps=steps,
        outputs=dict(data.get("outputs") or {}),
        artifacts=dict(data.get("artifacts") or {}),
        timeout_s=_dur(data.get("timeout")),
        budget=_budget(data.get("budget")),
        seed=data.get("seed"),
        executor=data.get("executor"),
        source_hash=source_hash,
    )


def _dur(value: Any) -> float | None:
    return None if value is None else duration_s(value)


def _budget(raw: Any) -> Budget | None:
    if not raw:
        return None
    return Budget(tokens=raw.get("tokens"), cost=raw.get("cost"))


def _agent(name: str, raw: dict[str, Any]) -> Agent:
    breaker = raw.get("breaker")
    return Agent(
        name=name,
        uses=raw["uses"],
        with_=dict(raw.get("with") or {}),
        pool=raw.get("pool"),
        secrets=tuple(raw.get("secrets") or ()),
        breaker=None if breaker is None else Breaker(
            failures=breaker.get("failures", 5),
            cooldown_s=duration_s(breaker.get("cooldown", 30)),
        ),
        fallback=raw.get("fallback"),
        retry=raw.get("retry"),
        timeout_s=_dur(raw.get("timeout")),
        description=raw.get("description"),
    )


def _pool(name: str, raw: dict[str, Any]) -> Pool:
    rate = raw.get("rate")
    return Pool(
        name=name,
        concurrency=raw.get("concurrency"),
        rate_per_s=None if rate is None else rate_per_s(rate),
        rate_text=rate,
        tokens_per_s=None if raw.get("tokens") is None else rate_per_s(raw["tokens"]),
    )


def retry_policy(*layers: Mapping[str, Any] | None) -> RetryPolicy:
    """Merge retry mappings, later layers winning key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged.update(layer)
    return RetryPolicy(
        attempts=int(merged.get("attempts", 1)),
        delay_s=duration_s(merged.get("delay", 1)),
        backoff=str(merged.get("backoff", "exponential")),
        max_delay_s=duration_s(merged.get("max_delay", 60)),
        jitter=bool(merged.get("jitter", True)),
        on=tuple(merged.get("on", DEFAULT_RETRY_ON)),
    )


def _fallbacks(
    raw: Mapping[str, Any],
    agent: Agent | None,
    agents: Mapping[str, Agent],
    defaults: Mapping[str, Any],
) -> tuple[Fallback, ...]:
    """The step's fallback chain: its own ``fallback`` (else its agent's), then each one's.

    A fallback gets its own ``with`` with the step's merged over it — except for a step
    with an inline ``uses:``, whose ``with`` configures that kind and is not passed on.
    The validator refuses loops among agents; a step-level fallback that leads back to
    an agent already in the chain (the step's own included) ends the chain there.
    """
    seen = {agent.name} if agent else set()
    chain: list[Fallback] = []
    name = raw.get("fallback") or (agent.fallback if agent else None)
    own_with = (raw.get("with") or {}) if agent is not None else {}
    while isinstance(name, str) and name in agents and name not in seen:
        seen.add(name)
        fb = agents[name]
        timeout = raw.get(
            "timeout", fb.timeout_s if fb.timeout_s is not None else defaults.get("timeout")
        )
        chain.append(
            Fallback(
                agent=name,
                uses=fb.uses,
                with_={**fb.with_, **own_with},
                retry=retry_policy(defaults.get("retry"), fb.retry, raw.get("retry")),
                timeout_s=_dur(timeout),
                pool=raw.get("pool") or fb.pool or defaults.get("pool"),
            )
        )
        name = fb.fallback
    return tuple(chain)


def _step(
    sid: str,
    raw: dict[str, Any],
    agents: Mapping[str, Agent],
    defaults: Mapping[str, Any],
    analysis: Analysis,
) -> Step:
    agent = agents.get(raw["agent"]) if "agent" in raw else None
    uses = raw.get("uses") or (agent.uses if agent else None)
    with_ = {**(agent.with_ if agent else {}), **(raw.get("with") or {})}
    needs = raw.get("needs") or ()
    loop_raw = raw.get("loop")
    loop = None
    if loop_raw is not None:
        loop = Loop(
            steps=tuple(
                _step(child_id, child, agents, defaults, analysis)
                for child_id, child in loop_raw["steps"].items()
            ),
            until=loop_raw.get("until"),
            max_iterations=int(loop_raw.get("max_iterations", 3)),
            best_by=loop_raw.get("best_by"),
            on_exhausted=loop_raw.get("on_exhausted", "succeed"),
        )
    timeout = raw.get("timeout", agent.timeout_s if agent and agent.timeout_s is not None
                      else defaults.get("timeout"))
    when = raw.get("when")
    return Step(
        id=sid,
        uses=uses,
        agent=raw.get("agent"),
        with_=with_,
        prompt=raw.get("prompt"),
        needs=(needs,) if isinstance(needs, str) else tuple(needs),
        deps=analysis.deps.get(sid, ()),
        sequential=sid in analysis.sequential,
        when=None if when is None else str(when).lower() if isinstance(when, bool) else when,
        join=raw.get("join", "all_succeeded"),
        for_each=raw.get("for_each"),
        as_=raw.get("as", "item"),
        max_parallel=raw.get("max_parallel"),
        loop=loop,
        output_schema=raw.get("output_schema"),
        timeout_s=_dur(timeout),
        retry=retry_policy(defaults.get("retry"), agent.retry if agent else None,
                           raw.get("retry")),
        pool=raw.get("pool") or (agent.pool if agent else None) or defaults.get("pool"),
        cache=bool(raw.get("cache", defaults.get("cache", False))),
        fallback=raw.get("fallback") or (agent.fallback if agent else None),
        fallbacks=_fallbacks(raw, agent, agents, defaults),
        allow_failure=bool(raw.get("allow_failure", defaults.get("allow_failure", False))),
        budget=_budget(raw.get("budget")),
        description=raw.get("description"),
    )
