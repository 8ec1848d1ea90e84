"""Resilience: backoff, circuit breakers, fallbacks, pools and the run's timeout.

Unit tests drive `Breaker` and `TokenBucket` with a hand-moved clock; in-process tests
run the real `Runner` and `Store` on workflows whose python agents live in a module
made for the test (``MOD`` in the YAML), with a fake monotonic clock and a fake sleep
where time matters and small real delays where the event loop's timers do (pool
rates, the run's timeout). The last tests drive the real CLI in subprocesses through
run → SIGINT → resume. Every event any of them emits is validated against
``schemas/events.schema.json``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import textwrap
import time
import types
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from conftest import new_run_record
from storyflow import TransientError
from storyflow.agents.registry import kinds
from storyflow.engine import retry
from storyflow.engine.breaker import Admission, Breaker
from storyflow.engine.lifecycle import IllegalTransition, fire
from storyflow.engine.plan import plan
from storyflow.engine.pools import TokenBucket
from storyflow.engine.runner import Options, Result, Runner
from storyflow.events import RunStatus
from storyflow.spec import load_workflow
from storyflow.spec.model import Breaker as BreakerSpec
from storyflow.spec.model import RetryPolicy
from storyflow.spec.params import resolve_inputs
from storyflow.store import StepRecord, Store
from storyflow.ui.progress import LiveSink, PlainSink

REPO = Path(__file__).resolve().parents[1]
EVENTS = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas" / "events.schema.json").read_text(encoding="utf-8"))
)
SHOW = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas" / "show.schema.json").read_text(encoding="utf-8"))
)


def valid(validator: jsonschema.Draft202012Validator, doc: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, f"{errors[:3]} in {json.dumps(doc)[:400]}"


def of_type(events: list[dict[str, Any]], type_: str, step: str | None = None
            ) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_ and (step is None or e.get("step") == step)]


# --- backoff (hypothesis) -----------------------------------------------------------------

policies = st.builds(
    RetryPolicy,
    attempts=st.integers(1, 20),
    delay_s=st.floats(0, 100, allow_nan=False),
    backoff=st.sampled_from(["fixed", "linear", "exponential"]),
    max_delay_s=st.floats(0, 1000, allow_nan=False),
    jitter=st.booleans(),
)


@given(policy=policies, attempt=st.integers(1, 500), r=st.floats(0, 1, exclude_max=True))
def test_a_delay_never_exceeds_max_delay(policy: RetryPolicy, attempt: int, r: float) -> None:
    assert 0 <= retry.base_delay_s(policy, attempt) <= policy.max_delay_s
    assert 0 <= retry.delay_s(policy, attempt, rand=lambda: r) <= policy.max_delay_s


@given(policy=policies, attempts=st.integers(2, 80))
def test_without_jitter_delays_grow_monotonically(policy: RetryPolicy, attempts: int) -> None:
    fixed = RetryPolicy(policy.attempts, policy.delay_s, policy.backoff, policy.max_delay_s,
                        jitter=False)
    delays = [retry.delay_s(fixed, n) for n in range(1, attempts + 1)]
    assert delays == sorted(delays)
    assert delays == [retry.base_delay_s(fixed, n) for n in range(1, attempts + 1)]


@given(policy=policies, attempt=st.integers(1, 100), r=st.floats(0, 1, exclude_max=True))
def test_equal_jitter_stays_within_half_the_base_and_the_base(policy: RetryPolicy,
                                                             attempt: int, r: float) -> None:
    jittered = RetryPolicy(policy.attempts, policy.delay_s, policy.backoff, policy.max_delay_s,
                           jitter=True)
    base = retry.base_delay_s(jittered, attempt)
    assert base / 2 <= retry.delay_s(jittered, attempt, rand=lambda: r) <= base


@given(policy=policies, attempt=st.integers(1, 100), r=st.floats(0, 1, exclude_max=True),
       retry_after=st.floats(0, 10_000, allow_nan=False))
def test_retry_after_is_a_floor_capped_by_max_delay(policy: RetryPolicy, attempt: int, r: float,
                                                    retry_after: float) -> None:
    delay = retry.delay_s(policy, attempt, retry_after_s=retry_after, rand=lambda: r)
    floor = min(retry_after, policy.max_delay_s)
    assert floor <= delay <= max(retry.base_delay_s(policy, attempt), floor)
    assert delay <= policy.max_delay_s


def test_backoff_schedules_by_hand() -> None:
    exp = RetryPolicy(attempts=6, delay_s=1, backoff="exponential", max_delay_s=10, jitter=False)
    assert [retry.delay_s(exp, n) for n in range(1, 6)] == [1, 2, 4, 8, 10]
    lin = RetryPolicy(attempts=6, delay_s=2, backoff="linear", max_delay_s=7, jitter=False)
    assert [retry.delay_s(lin, n) for n in range(1, 6)] == [2, 4, 6, 7, 7]
    assert retry.delay_s(exp, 2, rand=lambda: 0.25) == 2  # jitter off: rand unused
    jit = RetryPolicy(attempts=6, delay_s=1, backoff="exponential", max_delay_s=10, jitter=True)
    assert retry.delay_s(jit, 3, rand=lambda: 0.25) == 2.5  # base 4: 2 + 2 * 0.25
    assert retry.delay_s(jit, 1, rand=lambda: 0.0) == 0.5  # never at once
    assert not retry.should_retry(jit, "circuit_open", 1)  # not retried by default
    assert retry.should_retry(jit, "transient", 5) and not retry.should_retry(jit, "transient", 6)


# --- the breaker (fake clock) ---------------------------------------------------------------


def test_breaker_opens_after_n_consecutive_failures_and_a_success_resets_the_count() -> None:
    b = Breaker("writer", BreakerSpec(failures=3, cooldown_s=30))
    assert b.state == "closed"
    assert not b.failed(b.admit(0), 0) and not b.failed(b.admit(1), 1)
    assert not b.succeeded(b.admit(2))  # resets the count; stays closed
    assert b.failures == 0
    assert not b.failed(b.admit(3), 3) and not b.failed(b.admit(4), 4)
    assert b.failed(b.admit(5), 5)  # the third in a row
    assert b.state == "open" and b.opened_at == 5


def test_an_open_breaker_fails_fast_until_its_cooldown_then_lets_one_trial_through() -> None:
    b = Breaker("writer", BreakerSpec(failures=1, cooldown_s=30))
    assert b.failed(b.admit(100), 100)
    for now in (100, 110, 129.99):
        assert not b.allows(now)
        assert b.admit(now) is Admission.REFUSED
    assert b.retry_in_s(110) == 20
    assert b.allows(130)
    assert b.admit(130) is Admission.TRIAL
    assert b.state == "half_open"
    # while the trial is in flight every other call fails fast
    assert not b.allows(131)
    assert b.admit(131) is Admission.REFUSED


def test_a_successful_trial_closes_the_breaker() -> None:
    b = Breaker("writer", BreakerSpec(failures=2, cooldown_s=10))
    b.failed(b.admit(0), 0)
    assert b.failed(b.admit(0), 0)
    trial = b.admit(10)
    assert trial is Admission.TRIAL
    assert b.succeeded(trial)
    assert b.state == "closed" and b.failures == 0
    assert b.admit(10) is Admission.CALL
    assert not b.failed(Admission.CALL, 11)  # a fresh count: one failure is not two


def test_a_failed_trial_opens_the_breaker_again_for_a_whole_cooldown() -> None:
    b = Breaker("writer", BreakerSpec(failures=1, cooldown_s=10))
    b.failed(b.admit(0), 0)
    trial = b.admit(12)
    assert b.failed(trial, 15)
    assert b.state == "open" and b.opened_at == 15
    assert b.admit(24) is Admission.REFUSED
    assert b.admit(25) is Admission.TRIAL


def test_only_the_trial_decides_and_a_cancelled_trial_decides_nothing() -> None:
    b = Breaker("writer", BreakerSpec(failures=1, cooldown_s=10))
    early = b.admit(0)  # admitted while closed, still in flight when the breaker opens
    b.failed(b.admit(0), 0)
    assert not b.succeeded(early) and b.state == "open"  # stale: changes nothing
    trial = b.admit(10)
    assert not b.failed(early, 11) and b.state == "half_open"
    b.abandoned(trial, 12)  # e.g. Ctrl-C during the trial
    assert b.state == "open"
    assert b.admit(12) is Admission.TRIAL  # the next call is a new trial at once


def test_the_breaker_is_a_lifecycle_machine() -> None:
    b = Breaker("writer", BreakerSpec(failures=1, cooldown_s=1))
    with pytest.raises(IllegalTransition):
        fire("breaker", b, "close")  # closed → closed is not a transition
    fire("breaker", b, "trip")
    assert b.state == "open"
    with pytest.raises(IllegalTransition):
        fire("breaker", b, "trip")


# --- the token bucket (fake clock) -----------------------------------------------------------


def test_token_bucket_starts_full_with_one_seconds_worth_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    assert bucket.capacity == 10
    for _ in range(10):
        assert bucket.available(0.0)
        bucket.take(0.0)
    assert not bucket.available(0.0)
    assert bucket.wait_s(0.0) == pytest.approx(0.1)
    assert not bucket.available(0.05)
    assert bucket.wait_s(0.05) == pytest.approx(0.05)
    assert bucket.available(0.1)
    bucket.take(0.1)
    assert bucket.wait_s(0.1) == pytest.approx(0.1)
    assert bucket.available(100.0) and bucket.tokens == 10  # never banks more than capacity


def test_token_bucket_slow_rates_hold_a_single_token() -> None:
    per_minute = TokenBucket(60 / 60, now=0.0)  # 60/min
    assert per_minute.capacity == 1
    per_minute.take(0.0)
    assert per_minute.wait_s(0.0) == pytest.approx(1.0)
    hourly = TokenBucket(2 / 3600, now=0.0)  # 2/h
    assert hourly.capacity == 1
    hourly.take(0.0)
    assert hourly.wait_s(0.0) == pytest.approx(1800.0)
    assert not hourly.available(1799.0) and hourly.available(1800.0)


# --- in-process runs -------------------------------------------------------------------------


class FakeTime:
    """A monotonic clock that only moves when the run sleeps or a test agent moves it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Outcome:
    result: Result
    events: list[dict[str, Any]]
    steps: dict[str, StepRecord]

    def of(self, type_: str, step: str | None = None) -> list[dict[str, Any]]:
        return of_type(self.events, type_, step)


class Harness:
    """Agents as test functions in a fresh module ``MOD``; runs on the real Runner."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.name = f"sf_resilience_{uuid.uuid4().hex[:12]}"
        self.module = types.ModuleType(self.name)
        monkeypatch.setitem(sys.modules, self.name, self.module)
        self.time = FakeTime()

    def agent(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(self.module, fn.__name__, fn)
        return fn

    def run(self, text: str, *, max_parallel: int = 8, fake_time: bool = True) -> Outcome:
        path = self.tmp / "wf.yaml"
        path.write_text(textwrap.dedent(text).lstrip().replace("MOD", self.name),
                        encoding="utf-8")
        wf = load_workflow(path, kinds=kinds())
        compiled = plan(wf)
        with Store(self.tmp / "state") as store:
            record = new_run_record(store, wf, compiled, inputs=resolve_inputs(wf, [], None))
            options = Options(max_parallel=max_parallel)
            if fake_time:
                options = Options(max_parallel=max_parallel, monotonic=self.time.monotonic,
                                  sleep=self.time.sleep)
            events: list[dict[str, Any]] = []
            runner = Runner(wf, compiled, store, record, events.append, options)
            result = asyncio.run(runner.execute())
            steps = store.get_steps(record.run_id, compiled.order)
        for event in events:
            valid(EVENTS, event)
        return Outcome(result, events, steps)


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(tmp_path, monkeypatch)


BREAKER_WORKFLOW = """
apiVersion: storyflow/v1
name: breakers
agents:
  writer:
    uses: python
    with: {callable: "MOD:writer"}
    breaker: {failures: 2, cooldown: 30s}
    fallback: offline
  offline: {uses: python, with: {callable: "MOD:offline", tone: plain}}
steps:
  a: {agent: writer, with: {me: a}}
  b: {agent: writer, with: {me: b}, needs: a}
  c: {agent: writer, with: {me: c}, needs: b}
  wait: {uses: python, with: {callable: "MOD:tick", seconds: 31}, needs: c}
  d: {agent: writer, with: {me: d}, needs: wait}
  e: {agent: writer, with: {me: e}, needs: d}
"""


def writer_agents(h: Harness, *, recovers: bool) -> list[str]:
    """A writer that is down until `tick` moves the clock (and, if it recovers, brings it up)."""
    calls: list[str] = []
    up = {"writer": False}

    async def writer(me: str) -> str:
        calls.append(me)
        if not up["writer"]:
            raise TransientError(f"writer service unavailable for {me}")
        return f"{me} by writer"

    async def offline(me: str, tone: str) -> str:
        return f"{me} offline ({tone})"

    async def tick(seconds: float) -> float:
        h.time.now += seconds
        up["writer"] = recovers
        return seconds

    for fn in (writer, offline, tick):
        h.agent(fn)
    return calls


def test_breaker_opens_fallback_serves_then_a_trial_closes_it(harness: Harness) -> None:
    calls = writer_agents(harness, recovers=True)
    out = harness.run(BREAKER_WORKFLOW)
    assert out.result.status is RunStatus.SUCCEEDED
    assert calls == ["a", "b", "d", "e"]  # c failed fast: the writer was not called
    s = out.steps
    for sid in "abc":
        assert (s[sid].status, s[sid].agent, s[sid].degraded) == ("succeeded", "offline", True)
        assert s[sid].output == f"{sid} offline (plain)"  # its own `with` under the step's
        assert s[sid].attempts == 2
    for sid in "de":
        assert (s[sid].status, s[sid].agent, s[sid].degraded) == ("succeeded", "writer", False)
        assert s[sid].output == f"{sid} by writer" and s[sid].attempts == 1

    (opened,) = out.of("breaker.opened")
    assert opened == {**opened, "agent": "writer", "step": "b", "failures": 2, "trial": False,
                      "cooldown_s": 30.0}
    (closed,) = out.of("breaker.closed")
    assert closed["agent"] == "writer" and closed["step"] == "d"
    fell = {e["step"]: e for e in out.of("step.fallback")}
    assert set(fell) == {"a", "b", "c"}
    assert fell["a"]["error"]["class"] == "transient"
    assert fell["c"]["error"]["class"] == "circuit_open"
    assert "breaker is open" in fell["c"]["error"]["message"]
    assert fell["c"]["agent"] == "writer" and fell["c"]["fallback"] == "offline"
    # a fail-fast is an attempt that never started: no step.started for it
    assert [e["attempt"] for e in out.of("step.started", "c")] == [2]
    (done_c,) = out.of("step.succeeded", "c")
    assert done_c["degraded"] is True and done_c["agent"] == "offline"
    assert "degraded" not in out.of("step.succeeded", "d")[0]
    types_ = [e["type"] for e in out.events]
    assert types_.index("breaker.opened") < types_.index("breaker.closed")


def test_a_failed_trial_opens_the_breaker_again_and_the_fallback_keeps_serving(
        harness: Harness) -> None:
    calls = writer_agents(harness, recovers=False)
    out = harness.run(BREAKER_WORKFLOW)
    assert out.result.status is RunStatus.SUCCEEDED
    assert calls == ["a", "b", "d"]  # d was the trial; e failed fast again
    opened = out.of("breaker.opened")
    assert [(e["step"], e["trial"]) for e in opened] == [("b", False), ("d", True)]
    assert not out.of("breaker.closed")
    assert all(out.steps[sid].degraded for sid in "abcde")


def test_half_open_lets_one_trial_through_others_fail_fast(harness: Harness) -> None:
    calls: list[str] = []
    gate: dict[str, asyncio.Event] = {}

    async def writer(me: str) -> str:
        calls.append(me)
        if me == "first":
            raise TransientError("down")
        gate.setdefault("trial", asyncio.Event())
        await gate["trial"].wait()  # the trial waits until the other step has been served
        return f"{me} by writer"

    async def offline(me: str) -> str:
        if me == "other":
            gate.setdefault("trial", asyncio.Event()).set()
        return f"{me} offline"

    async def tick(seconds: float) -> float:
        harness.time.now += seconds
        return seconds

    for fn in (writer, offline, tick):
        harness.agent(fn)
    out = harness.run("""
        apiVersion: storyflow/v1
        name: half-open
        agents:
          writer:
            uses: python
            with: {callable: "MOD:writer"}
            breaker: {failures: 1, cooldown: 10s}
            fallback: offline
          offline: {uses: python, with: {callable: "MOD:offline"}}
        steps:
          first: {agent: writer, with: {me: first}}
          wait: {uses: python, with: {callable: "MOD:tick", seconds: 11}, needs: first}
          trial: {agent: writer, with: {me: trial}, needs: wait}
          other: {agent: writer, with: {me: other}, needs: wait}
        """)
    assert out.result.status is RunStatus.SUCCEEDED
    assert calls == ["first", "trial"]
    assert (out.steps["trial"].agent, out.steps["trial"].degraded) == ("writer", False)
    assert (out.steps["other"].agent, out.steps["other"].degraded) == ("offline", True)
    (fell,) = out.of("step.fallback", "other")
    assert "a trial call is under way" in fell["error"]["message"]
    assert len(out.of("breaker.closed")) == 1


def test_circuit_open_is_not_retried_by_default_but_can_be(harness: Harness) -> None:
    calls: list[str] = []

    async def down(me: str) -> str:
        calls.append(me)
        raise TransientError(f"{me}: 503")

    harness.agent(down)
    out = harness.run("""
        apiVersion: storyflow/v1
        name: no-fallback
        agents:
          writer: {uses: python, with: {callable: "MOD:down"}, breaker: {failures: 1, cooldown: 1h}}
        steps:
          a: {agent: writer, with: {me: a}, allow_failure: true}
          b: {agent: writer, with: {me: b}, needs: a, join: all_done, allow_failure: true,
              retry: {attempts: 3, delay: 1s}}
          c:
            agent: writer
            with: {me: c}
            needs: b
            join: all_done
            retry: {attempts: 2, delay: 1s, max_delay: 2h, jitter: false, on: [circuit_open]}
        """)
    assert out.result.status is RunStatus.FAILED
    s = out.steps
    assert s["a"].error is not None and s["a"].error["class"] == "transient"
    assert s["b"].error is not None and s["b"].error["class"] == "circuit_open"
    assert s["b"].attempts == 1 and not out.of("step.retrying", "b")
    # c retries a circuit_open: the delay waits out the cooldown (a Retry-After floor),
    # the second attempt is the trial, which fails and opens the breaker again.
    (waited,) = out.of("step.retrying", "c")
    assert waited["error"]["class"] == "circuit_open"
    assert waited["delay_s"] == pytest.approx(3600, abs=1)
    assert s["c"].attempts == 2 and s["c"].error is not None
    assert s["c"].error["class"] == "transient"
    assert calls == ["a", "c"]
    assert [e["trial"] for e in out.of("breaker.opened")] == [False, True]
    assert out.result.error is not None and "step c failed" in out.result.error["message"]


def test_an_open_breaker_cuts_retries_short_when_a_fallback_remains(harness: Harness) -> None:
    calls: list[str] = []

    async def down(me: str) -> str:
        calls.append(me)
        raise TransientError("503")

    async def offline(me: str) -> str:
        return f"{me} offline"

    harness.agent(down)
    harness.agent(offline)
    out = harness.run("""
        apiVersion: storyflow/v1
        name: cut-short
        agents:
          writer:
            uses: python
            with: {callable: "MOD:down"}
            breaker: {failures: 2, cooldown: 1m}
            retry: {attempts: 5, delay: 1s, jitter: false}
            fallback: offline
          offline: {uses: python, with: {callable: "MOD:offline"}}
        steps:
          a: {agent: writer, with: {me: a}}
        """)
    assert out.result.status is RunStatus.SUCCEEDED
    assert calls == ["a", "a"]
    assert len(out.of("step.retrying", "a")) == 1
    assert harness.time.slept == [1.0]
    assert out.steps["a"].attempts == 3 and out.steps["a"].agent == "offline"


def test_step_fallback_overrides_the_agents_and_chains_continue(harness: Harness) -> None:
    async def down(me: str) -> str:
        raise TransientError("503")

    async def broken(me: str) -> str:
        raise ValueError(f"boom for {me}")

    async def offline(me: str, tone: str) -> str:
        return f"{me}/{tone}"

    for fn in (down, broken, offline):
        harness.agent(fn)
    out = harness.run("""
        apiVersion: storyflow/v1
        name: chain
        inputs:
          who: {type: string, default: hero}
        agents:
          writer: {uses: python, with: {callable: "MOD:down"}, fallback: offline}
          backup: {uses: python, with: {callable: "MOD:broken"}, fallback: offline}
          offline: {uses: python, with: {callable: "MOD:offline", tone: plain}}
        steps:
          a: {agent: writer, with: {me: "{{ inputs.who }}"}, fallback: backup}
          b: {agent: writer, with: {me: b, tone: grim}}
          c: {uses: python, with: {callable: "MOD:down", me: c}, fallback: offline}
        """)
    fell = sorted((e["step"], e["agent"], e["fallback"]) for e in out.of("step.fallback"))
    assert fell == [("a", "backup", "offline"), ("a", "writer", "backup"),
                    ("b", "writer", "offline"), ("c", "python", "offline")]
    s = out.steps
    assert (s["a"].output, s["a"].agent, s["a"].attempts) == ("hero/plain", "offline", 3)
    assert s["b"].output == "b/grim"  # the step's own `with` wins over the fallback's
    # an inline step's `with` configures its own kind: the fallback gets none of it
    assert s["c"].output is None and s["c"].status == "failed"
    assert s["c"].error is not None and "missing the argument" in s["c"].error["message"]
    assert s["c"].agent == "offline" and not s["c"].degraded


def test_a_fallback_that_cannot_be_rendered_passes_to_the_next(harness: Harness) -> None:
    async def down(me: str) -> str:
        raise TransientError("503")

    async def offline(me: str) -> str:
        return f"{me} offline"

    harness.agent(down)
    harness.agent(offline)
    out = harness.run("""
        apiVersion: storyflow/v1
        name: secretless
        agents:
          writer: {uses: python, with: {callable: "MOD:down"}, fallback: paid}
          paid:
            uses: python
            with: {callable: "MOD:offline"}
            secrets: [SF_TEST_NEVER_SET_KEY]
            fallback: offline
          offline: {uses: python, with: {callable: "MOD:offline"}}
        steps:
          a: {agent: writer, with: {me: a}}
        """)
    assert out.result.status is RunStatus.SUCCEEDED
    fell = out.of("step.fallback", "a")
    assert [e["fallback"] for e in fell] == ["paid", "offline"]
    assert "SF_TEST_NEVER_SET_KEY is not set" in fell[1]["error"]["message"]
    assert out.steps["a"].agent == "offline" and out.steps["a"].attempts == 3


# --- pools (in-process, small real delays) ----------------------------------------------------


class Tracker:
    """Records starts and how many calls ran at once, per pool and overall."""

    def __init__(self) -> None:
        self.starts: list[str] = []
        self.at: dict[str, float] = {}
        self.now: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    def install(self, h: Harness) -> None:
        async def work(me: str, pool: str = "-", seconds: float = 0.0) -> str:
            self.starts.append(me)
            self.at[me] = time.monotonic()
            for key in (pool, "*"):
                self.now[key] += 1
                self.peak[key] = max(self.peak[key], self.now[key])
            await asyncio.sleep(seconds)
            for key in (pool, "*"):
                self.now[key] -= 1
            return me

        h.agent(work)


def work_step(me: str, pool: str | None, seconds: float, extra: str = "") -> str:
    in_pool = f", pool: {pool}" if pool else ""
    return (f'  {me}: {{uses: python, with: {{callable: "MOD:work", me: {me}, '
            f'pool: "{pool or "-"}", seconds: {seconds}}}{in_pool}{extra}}}\n')


def test_pool_concurrency_fifo_within_a_pool_and_no_head_of_line_blocking(
        harness: Harness) -> None:
    tracker = Tracker()
    tracker.install(harness)
    steps = "".join(work_step(f"s{i}", "slow", 0.05) for i in range(1, 4))
    steps += "".join(work_step(f"f{i}", "fast", 0.01) for i in range(1, 5))
    out = harness.run(
        "apiVersion: storyflow/v1\nname: pools\n"
        "pools:\n  slow: {concurrency: 1}\n  fast: {concurrency: 2}\n"
        "steps:\n" + steps,
        max_parallel=3, fake_time=False,
    )
    assert out.result.status is RunStatus.SUCCEEDED
    assert tracker.peak["slow"] == 1 and tracker.peak["fast"] == 2 and tracker.peak["*"] <= 3
    order = [e["step"] for e in out.of("step.started")]
    assert [s for s in order if s.startswith("s")] == ["s1", "s2", "s3"]
    assert [s for s in order if s.startswith("f")] == ["f1", "f2", "f3", "f4"]
    # s2 and s3 waited for their pool without holding up the other pool's steps
    assert order.index("f4") < order.index("s2")


def test_ready_steps_start_in_the_order_they_became_ready_across_pools(
        harness: Harness) -> None:
    tracker = Tracker()
    tracker.install(harness)
    steps = (work_step("a1", "one", 0.01) + work_step("a2", "one", 0.01)
             + work_step("n1", None, 0.08) + work_step("n2", None, 0.01)
             + work_step("n3", None, 0.01))
    out = harness.run(
        "apiVersion: storyflow/v1\nname: order\npools:\n  one: {concurrency: 1}\n"
        "steps:\n" + steps,
        max_parallel=2, fake_time=False,
    )
    assert out.result.status is RunStatus.SUCCEEDED
    # a2 (parked with pool `one`) became ready before n2 and n3: it goes first
    assert [e["step"] for e in out.of("step.started")] == ["a1", "n1", "a2", "n2", "n3"]


def test_a_step_waiting_out_a_retry_delay_gives_its_pool_slot_to_the_next(
        harness: Harness) -> None:
    starts: list[str] = []
    seen: Counter[str] = Counter()

    async def once_flaky(me: str) -> str:
        seen[me] += 1
        starts.append(f"{me}#{seen[me]}")
        if len(starts) == 1:
            raise TransientError("busy")
        return me

    harness.agent(once_flaky)
    out = harness.run("""
        apiVersion: storyflow/v1
        name: polite
        pools:
          one: {concurrency: 1}
        steps:
          r:
            uses: python
            with: {callable: "MOD:once_flaky", me: r}
            pool: one
            retry: {attempts: 2, delay: 200ms, jitter: false}
          p: {uses: python, with: {callable: "MOD:once_flaky", me: p}, pool: one}
        """, fake_time=False)
    assert out.result.status is RunStatus.SUCCEEDED
    assert starts == ["r#1", "p#1", "r#2"]  # p ran during r's delay, not after it


def test_pool_rate_is_a_token_bucket_with_timed_wake_ups(harness: Harness) -> None:
    tracker = Tracker()
    tracker.install(harness)
    steps = "".join(work_step(f"r{i:02d}", "api", 0.0) for i in range(12))
    started = time.monotonic()
    out = harness.run(
        "apiVersion: storyflow/v1\nname: rates\npools:\n  api: {rate: 10/s}\n"
        "steps:\n" + steps,
        max_parallel=50, fake_time=False,
    )
    assert out.result.status is RunStatus.SUCCEEDED
    offsets = sorted(tracker.at[s] - started for s in tracker.at)
    assert offsets[9] < offsets[10]
    assert offsets[10] - offsets[0] >= 0.08  # the 11th waited for a token (0.1 s)
    assert offsets[11] - offsets[0] >= 0.18
    assert offsets[11] - offsets[0] < 2.0
    order = [e["step"] for e in out.of("step.started")]
    assert order == sorted(order)  # FIFO


def test_a_fallback_in_another_pool_takes_that_pools_slot(harness: Harness) -> None:
    tracker = Tracker()
    tracker.install(harness)

    async def down(me: str) -> str:
        raise ValueError("no")

    harness.agent(down)
    steps = "".join(f"  w{i}: {{agent: writer, with: {{me: w{i}}}}}\n" for i in range(4))
    out = harness.run(
        "apiVersion: storyflow/v1\nname: switch\n"
        "pools:\n  llm: {concurrency: 1, rate: 100/s}\n  local: {concurrency: 1}\n"
        "agents:\n"
        '  writer: {uses: python, with: {callable: "MOD:down"}, pool: llm, fallback: offline}\n'
        '  offline: {uses: python, with: {callable: "MOD:work", pool: local, seconds: 0.01},'
        " pool: local}\n"
        "steps:\n" + steps,
        max_parallel=4, fake_time=False,
    )
    assert out.result.status is RunStatus.SUCCEEDED
    assert tracker.peak["local"] == 1
    assert all(out.steps[f"w{i}"].agent == "offline" for i in range(4))


def test_a_pool_rate_of_zero_is_refused_at_validation(tmp_path: Path) -> None:
    from storyflow.errors import WorkflowError

    path = tmp_path / "zero.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: zero
        pools:
          llm: {rate: 0/min}
        steps:
          a: {uses: template, with: {template: x}, pool: llm}
        """), encoding="utf-8")
    with pytest.raises(WorkflowError) as caught:
        load_workflow(path, kinds=kinds())
    (problem,) = caught.value.problems
    assert "rate of zero" in problem.message and problem.path == "$.pools.llm.rate"
    assert problem.line == 4


# --- the run's timeout ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_timeout_cancels_attempts_kills_commands_and_fails_the_run(harness: Harness) -> None:
    async def quick() -> str:
        return "quick"

    async def sleepy() -> str:
        await asyncio.sleep(30)
        return "never"

    async def flaky() -> str:
        raise TransientError("later")

    for fn in (quick, sleepy, flaky):
        harness.agent(fn)
    pid_file = harness.tmp / "child.pid"
    started = time.monotonic()
    out = harness.run(f"""
        apiVersion: storyflow/v1
        name: timed
        timeout: 300ms
        steps:
          quick: {{uses: python, with: {{callable: "MOD:quick"}}}}
          sleepy: {{uses: python, with: {{callable: "MOD:sleepy"}}}}
          flaky:
            uses: python
            with: {{callable: "MOD:flaky"}}
            retry: {{attempts: 3, delay: 30s}}
          nap: {{uses: command, with: {{run: "echo $$ > {pid_file}; exec sleep 30"}}}}
          later: {{uses: python, with: {{callable: "MOD:quick"}}, needs: sleepy}}
        """, fake_time=False)
    elapsed = time.monotonic() - started
    assert elapsed < 5
    assert out.result.status is RunStatus.FAILED
    assert out.result.error == {"class": "timeout", "message": "run timed out after 0.3s"}
    s = out.steps
    assert s["quick"].status == "succeeded"
    for sid in ("sleepy", "flaky", "nap"):
        assert s[sid].status == "cancelled", sid
        assert s[sid].error is not None and s[sid].error["class"] == "timeout"
        assert "timeout (0.3s) elapsed" in s[sid].error["message"]
    assert "later" not in s  # never ready: still pending, for resume
    assert {e["reason"] for e in out.of("step.cancelled")} == {"run timed out"}
    pid = int(pid_file.read_text().strip())
    assert not _alive(pid), "the command outlived the run's timeout"


# --- what the display says ---------------------------------------------------------------------

RUN = "20261123-101500-ab12cd"


def ev(type_: str, at: float = 0.0, **fields: Any) -> dict[str, Any]:
    event = {"type": type_, "run_id": RUN, "ts": 1_795_000_000.0 + at, **fields}
    valid(EVENTS, event)
    return event


OPEN_ERROR = {"class": "circuit_open", "message": "agent writer's circuit breaker is open"}
RESILIENCE_EVENTS = [
    ev("breaker.opened", agent="writer", step="b", failures=2, trial=False, cooldown_s=30.0),
    ev("step.fallback", 0.1, step="c", attempt=1, agent="writer", fallback="offline",
       error=OPEN_ERROR),
    ev("step.started", 0.1, step="c", attempt=2, agent="offline", degraded=True),
    ev("step.succeeded", 0.2, step="c", attempt=2, duration_s=0.1, agent="offline",
       degraded=True),
    ev("breaker.opened", 0.3, agent="writer", step="d", failures=2, trial=True, cooldown_s=30.0),
    ev("breaker.closed", 0.4, agent="writer", step="e"),
]


def test_plain_lines_for_breakers_fallbacks_and_degraded_steps() -> None:
    out = io.StringIO()
    sink = PlainSink(out)
    for event in RESILIENCE_EVENTS:
        sink(event)
    assert out.getvalue().splitlines() == [
        "00:00.0 ◆ breaker writer opened after 2 failures in a row; calls fail fast, "
        "trial in 30.0s",
        "00:00.1 ↪ c falls back to offline (writer: circuit_open: agent writer's circuit "
        "breaker is open)",
        "00:00.1 ▶ c attempt 2 (fallback offline)",
        "00:00.2 ✓ c 0.1s · degraded (served by offline)",
        "00:00.3 ◆ breaker writer opened again: its trial call failed; next trial in 30.0s",
        "00:00.4 ◆ breaker writer closed: its trial call succeeded",
    ]


def test_live_view_shows_open_breakers_and_degraded_steps() -> None:
    clock = [100.0]
    console = Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)
    sink = LiveSink(console, clock=lambda: clock[0], refresh_per_second=0.01)
    try:
        sink(ev("run.started", workflow="w", steps=3, inputs={}, workflow_version=None))
        sink(RESILIENCE_EVENTS[0])
        sink(ev("step.started", step="c", attempt=1))
        sink(RESILIENCE_EVENTS[1])
        view = Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)
        clock[0] += 12
        view.print(sink.render())
        text = view.file.getvalue()  # type: ignore[attr-defined]
        assert "◆ breaker writer open · trial in 18.0s" in text
        assert "falling back to offline" in text
        sink(RESILIENCE_EVENTS[2])
        sink(RESILIENCE_EVENTS[3])
        view = Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)
        view.print(sink.render())
        text = view.file.getvalue()  # type: ignore[attr-defined]
        assert "↪ c degraded (served by offline)" in text
        assert "degraded 1" in text
        sink(RESILIENCE_EVENTS[5])
        view = Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)
        view.print(sink.render())
        text = view.file.getvalue()  # type: ignore[attr-defined]
        assert "breaker writer open ·" not in text
        assert "◆ breaker writer closed: its trial call succeeded" in text
    finally:
        sink.close()


# --- through the CLI: fault injection, SIGINT, resume ---------------------------------------------

FAULT_AGENTS = '''\
"""Agents for the fault-injection test; each execution appends a line to SF_EXEC_LOG."""
import asyncio
import os

from storyflow import TransientError


def _log(line):
    with open(os.environ["SF_EXEC_LOG"], "a", encoding="utf-8") as f:
        f.write(line + "\\n")


def _count(line):
    try:
        with open(os.environ["SF_EXEC_LOG"], encoding="utf-8") as f:
            return sum(1 for x in f if x.rstrip("\\n") == line)
    except FileNotFoundError:
        return 0


def flaky(me, failures=2):
    _log(me)
    if _count(me) <= failures:
        raise TransientError(f"{me} is not ready yet")
    return f"{me} ok"


def down(me):
    _log("writer:" + me)
    raise TransientError(f"writer service unavailable for {me}")


def offline(me):
    _log("offline:" + me)
    return f"{me} (offline draft)"


def broken(me):
    _log(me)
    raise ValueError(f"boom in {me}")


async def slow(me):
    _log(me)
    if os.environ.get("SF_SLOW"):
        for _ in range(1200):  # at most about a minute
            await asyncio.sleep(0.05)
    return f"{me} done"
'''

FAULT_WORKFLOW = """\
apiVersion: storyflow/v1
name: faults
defaults:
  retry: {attempts: 1}
agents:
  writer:
    uses: python
    with: {callable: "faults:down"}
    breaker: {failures: 2, cooldown: 1h}
    fallback: offline
  offline: {uses: python, with: {callable: "faults:offline"}}
steps:
  flaky:
    uses: python
    with: {callable: "faults:flaky", me: flaky}
    retry: {attempts: 3, delay: 10ms, backoff: fixed}
  broken: {uses: python, with: {callable: "faults:broken", me: broken}, allow_failure: true}
  w1: {agent: writer, with: {me: w1}}
  w2: {agent: writer, with: {me: w2}, needs: w1}
  w3: {agent: writer, with: {me: w3}, needs: w2}
  nap:
    uses: command
    with: {run: "echo $$ > nap.pid; exec sleep 30"}
    timeout: 300ms
    allow_failure: true
  slow:
    uses: python
    with: {callable: "faults:slow", me: slow}
    needs: [w3, flaky, nap, broken]
    join: all_done
  final:
    uses: template
    with: {template: "{{ steps.flaky.output }} | {{ steps.w3.output }} | {{ steps.slow.output }}"}
outputs:
  final: "{{ steps.final.output }}"
"""


@pytest.fixture
def fault_project(tmp_path: Path) -> Iterator[Any]:
    from test_engine_cli import Project

    project = Project(tmp_path)
    (tmp_path / "faults.py").write_text(FAULT_AGENTS, encoding="utf-8")
    yield project
    project.close()


def steps_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in doc["steps"]}


@pytest.mark.slow
def test_fault_injection_run_interrupt_resume(fault_project: Any) -> None:
    project = fault_project
    wf = project.workflow(FAULT_WORKFLOW)
    live = project.live("run", wf, "--json", env={"SF_SLOW": "1"})
    run_id = live.wait_for(lambda e: e["type"] == "run.started")["run_id"]
    live.wait_for(lambda e: e["type"] == "step.started" and e["step"] == "slow")
    live.proc.send_signal(signal.SIGINT)
    assert live.finish() == 130, live.stderr()
    assert "Traceback" not in live.stderr()
    first = live.events  # each one validated against the schema as it was read
    for event in first:
        valid(EVENTS, event)

    # the first run: every kind of fault, as it happened
    assert [e["attempt"] for e in of_type(first, "step.retrying", "flaky")] == [1, 2]
    assert of_type(first, "step.succeeded", "flaky")[0]["attempt"] == 3
    (broken,) = of_type(first, "step.failed", "broken")
    assert broken["error"]["class"] == "permanent"
    (opened,) = of_type(first, "breaker.opened")
    assert (opened["agent"], opened["step"], opened["failures"]) == ("writer", "w2", 2)
    fell = {e["step"]: e["error"]["class"] for e in of_type(first, "step.fallback")}
    assert fell == {"w1": "transient", "w2": "transient", "w3": "circuit_open"}
    for sid in ("w1", "w2", "w3"):
        (done,) = of_type(first, "step.succeeded", sid)
        assert done["degraded"] is True and done["agent"] == "offline"
    (nap,) = of_type(first, "step.failed", "nap")
    assert nap["error"]["class"] == "timeout"
    pid = int((project.root / "nap.pid").read_text().strip())
    assert not _alive(pid), "the timed-out command outlived its step"
    assert of_type(first, "step.cancelled", "slow")
    assert first[-1]["type"] == "run.summary" and first[-1]["status"] == "interrupted"

    doc = project.show(run_id)
    assert doc["status"] == "interrupted"
    steps = steps_of(doc)
    assert steps["slow"]["status"] == "cancelled"
    assert steps["final"]["status"] == "pending"

    # resume: the kept steps stay kept (degraded ones included), the rest finishes
    resumed = project.run_json("resume", run_id)
    assert resumed[-1]["status"] == "succeeded"
    kept = {e["step"] for e in of_type(resumed, "step.kept")}
    assert kept == {"flaky", "w1", "w2", "w3"}
    assert not of_type(resumed, "breaker.opened")  # the writer was not called again

    doc = project.show(run_id)
    valid(SHOW, doc)
    assert doc["status"] == "succeeded"
    steps = steps_of(doc)
    expected = {
        # id: (status, attempts, error class, agent, degraded); a step run again by the
        # resume goes on counting its attempts from the first process's
        "flaky": ("succeeded", 3, None, None, False),
        "broken": ("failed", 2, "permanent", None, False),
        "w1": ("succeeded", 2, None, "offline", True),
        "w2": ("succeeded", 2, None, "offline", True),
        "w3": ("succeeded", 2, None, "offline", True),
        "nap": ("failed", 2, "timeout", None, False),
        "slow": ("succeeded", 2, None, None, False),
        "final": ("succeeded", 1, None, None, False),
    }
    got = {
        sid: (s["status"], s["attempts"], (s["error"] or {}).get("class"), s["agent"],
              s["degraded"])
        for sid, s in steps.items()
    }
    assert got == expected
    assert doc["outputs"]["final"] == "flaky ok | w3 (offline draft) | slow done"

    counts = project.executions()
    assert counts["flaky"] == 3
    assert (counts["writer:w1"], counts["writer:w2"], counts["writer:w3"]) == (1, 1, 0)
    assert (counts["offline:w1"], counts["offline:w2"], counts["offline:w3"]) == (1, 1, 1)
    assert counts["broken"] == 2  # failed steps run again on resume
    assert 1 <= counts["slow"] <= 2

    shown = project.cli("show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert "degraded (served by offline)" in shown.stdout
    logs = project.cli("logs", run_id)
    assert logs.returncode == 0, logs.stderr
    assert "◆ breaker writer opened after 2 failures in a row" in logs.stdout
    assert "↪ w3 falls back to offline (writer: circuit_open:" in logs.stdout
    assert "✓ w3 " in logs.stdout and "degraded (served by offline)" in logs.stdout


TIMED_WORKFLOW = """\
apiVersion: storyflow/v1
name: timed
timeout: 1s
steps:
  first: {uses: template, with: {template: "ready"}}
  nap:
    uses: command
    with: {run: "if [ -f slow.flag ]; then echo $$ > nap.pid; exec sleep 30; fi; echo rested"}
    needs: first
outputs:
  nap: "{{ steps.nap.output }}"
"""


@pytest.mark.slow
def test_run_timeout_through_the_cli_then_resume_with_a_fresh_budget(
        fault_project: Any) -> None:
    project = fault_project
    wf = project.workflow(TIMED_WORKFLOW)
    (project.root / "slow.flag").write_text("x")
    started = time.monotonic()
    result = project.cli("run", wf, "--json")
    assert time.monotonic() - started < 20
    assert result.returncode == 1, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    for event in events:
        valid(EVENTS, event)
    run_id = events[0]["run_id"]
    (failed,) = of_type(events, "run.failed")
    assert failed["error"] == {"class": "timeout", "message": "run timed out after 1s"}
    (cancelled,) = of_type(events, "step.cancelled", "nap")
    assert cancelled["reason"] == "run timed out"
    pid = int((project.root / "nap.pid").read_text().strip())
    assert not _alive(pid), "the command outlived the run's timeout"
    plain = project.cli("logs", run_id)
    assert "run.failed in" in plain.stdout and "timeout: run timed out after 1s" in plain.stdout

    (project.root / "slow.flag").unlink()
    resumed = project.run_json("resume", run_id)
    assert resumed[-1]["status"] == "succeeded"
    assert resumed[-1]["outputs"] == {"nap": "rested"}
