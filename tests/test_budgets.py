"""Budgets are ceilings; `--set` reaches child runs; an unknown cost is never zero.

`llm` steps run against the fake OpenAI-compatible server of `llm_server`. Most tests
use an *honest* server: it counts a prompt at 4 characters a token (fewer tokens
than the agent's estimate) and never writes more than the request's ``max_tokens``;
the words ``reply N`` in the prompt ask it for an N-token reply.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from llm_server import FakeLLM, Reply, Request, error, ok
from storyflow.agents.base import Call
from storyflow.agents.llm_agent import DEFAULT_REPLY_TOKENS, LlmAgent
from storyflow.engine.usage import Usage
from storyflow.errors import BudgetExceeded, StepFailure
from storyflow.spec.model import Budget
from storyflow.store import Store

REPO = Path(__file__).resolve().parents[1]
EVENTS = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas" / "events.schema.json").read_text(encoding="utf-8"))
)
REPORT = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas" / "report.schema.json").read_text(encoding="utf-8"))
)
FILLER = "The keeper climbs the stairs of the lighthouse every night. " * 6
"""About 90 tokens of prompt to the honest server."""
_REPLY = re.compile(r"reply (\d+)")
_MODE = re.compile(r"mode (\w+)")


def prompt_of(request: Request) -> tuple[list[Any], str]:
    body = request.body if isinstance(request.body, dict) else {}
    messages = body.get("messages") or []
    return messages, " ".join(str(m.get("content", "")) for m in messages)


def honest(*, ignores_max_tokens: bool = False, delay_s: float = 0.0,
           content: str = "A reply.") -> Callable[[Request], Reply]:
    """Usage as a real server reports it: the prompt at ~4 characters a token, the reply
    as long as asked (``reply N``, else 50) but never over ``max_tokens`` — unless it
    ``ignores_max_tokens``. ``mode error`` answers 500, ``mode slow`` waits 1 s."""

    def answer(request: Request) -> Reply:
        messages, text = prompt_of(request)
        body = request.body if isinstance(request.body, dict) else {}
        prompt = math.ceil(len(json.dumps(messages, sort_keys=True, separators=(",", ":"),
                                          ensure_ascii=False)) / 4)
        found = _REPLY.search(text)
        reply = int(found.group(1)) if found else 50
        limit = body.get("max_tokens")
        if isinstance(limit, int) and not ignores_max_tokens:
            reply = min(reply, limit)
        mode = _MODE.search(text)
        if mode and mode.group(1) == "error":
            return error(500, "the model is overloaded")
        wait = 1.0 if mode and mode.group(1) == "slow" else delay_s
        return ok(content, usage=(prompt, reply), delay_s=wait)

    return answer


@pytest.fixture
def server() -> Iterator[FakeLLM]:
    with FakeLLM(honest()) as s:
        yield s


def workflow(url: str, *, top: str = "", steps: str, max_tokens: int | None = 50,
             model: str = "m") -> str:
    reply = f", max_tokens: {max_tokens}" if max_tokens is not None else ""
    return "apiVersion: storyflow/v1\nname: budgeted\n" + (top + "\n" if top else "") + \
        textwrap.dedent(f"""\
        agents:
          writer:
            uses: llm
            with: {{base_url: "{url}", model: {model}, temperature: 0.7{reply}}}
        steps:
        """) + textwrap.indent(textwrap.dedent(steps), "  ")


TWO_CALLS = f"""\
first: {{agent: writer, prompt: "{FILLER}"}}
second: {{agent: writer, prompt: "{FILLER} again", needs: [first]}}
"""


def run_json(tmp: Path, *args: str | Path, code: int = 0) -> list[dict[str, Any]]:
    result = run_cli(*args, "--json", state_dir=tmp / "state", cwd=tmp)
    assert result.returncode == code, (result.stdout[-3000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    for event in events:
        EVENTS.validate(event)
    return events


def write(tmp: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def budget_failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events
            if e["type"] == "step.failed" and e["error"]["class"] == "budget_exceeded"]


def show(tmp: Path, run_id: str) -> dict[str, Any]:
    result = run_cli("show", run_id, "--json", state_dir=tmp / "state")
    assert result.returncode in (0, 1), result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


# --- the run's budget ---------------------------------------------------------------------


def test_two_calls_of_150_tokens_cannot_pass_a_budget_of_200(
    tmp_path: Path, server: FakeLLM
) -> None:
    # No max_tokens: each call reserves its prompt (~130) and the default reply (1024).
    wf = write(tmp_path, workflow(server.url, top="budget: {tokens: 200}", max_tokens=None,
                                  steps=TWO_CALLS))
    events = run_json(tmp_path, "run", wf, code=1)
    run_id = events[0]["run_id"]
    assert events[-1]["status"] == "failed"
    assert server.requests == []  # a call that could cross the budget is never sent
    (failed,) = budget_failures(events)
    assert failed["step"] == "first"
    assert "the run's budget of 200 tokens could be exceeded" in failed["error"]["message"]
    assert f"default of {DEFAULT_REPLY_TOKENS} tokens" in failed["error"]["hint"]
    assert "with.max_tokens" in failed["error"]["hint"]
    assert not any(e["type"] == "step.retrying" for e in events)

    # As the hint says: with max_tokens 50 one call of ~150 fits, a second cannot.
    events = run_json(tmp_path, "resume", run_id,
                      "--set", "agents.writer.with.max_tokens=50", code=1)
    summary = events[-1]
    assert 130 <= summary["tokens"] <= 200
    assert len(server.requests) == 1
    (failed,) = budget_failures(events)
    assert failed["step"] == "second"
    assert "--set budget.tokens=N" in failed["error"]["hint"]

    # `report` shows the budget against what was spent.
    doc = json.loads(run_cli("report", run_id, "--format", "json",
                             state_dir=tmp_path / "state").stdout)
    REPORT.validate(doc)
    assert doc["budgets"] == [{"scope": "run", "tokens": 200, "cost": None,
                               "spent_tokens": summary["tokens"], "spent_cost": 0.0,
                               "priced": False}]
    table = run_cli("report", run_id, state_dir=tmp_path / "state").stdout
    assert f"budget: run {summary['tokens']} of 200 tokens" in table

    resumed = run_json(tmp_path, "resume", run_id, "--set", "budget.tokens=400")
    assert resumed[-1]["status"] == "succeeded"
    assert len(server.requests) == 2
    assert resumed[-1]["tokens"] <= 400


def test_a_cost_budget_is_a_ceiling_too(tmp_path: Path, server: FakeLLM) -> None:
    # Replies cost 50 times what prompts do: a call of ~100 + 50 tokens costs ~$0.26,
    # nearly all of it its reply, which the estimate prices at the output rate.
    priced = "config: {prices: {m: {input: 100, output: 5000}}}\nbudget: {cost: 0.4}"
    wf = write(tmp_path, workflow(server.url, top=priced, steps=TWO_CALLS))
    events = run_json(tmp_path, "run", wf, code=1)
    summary = events[-1]
    assert 0.25 <= summary["cost"] <= 0.4
    assert len(server.requests) == 1
    (failed,) = budget_failures(events)
    assert failed["step"] == "second"
    assert "the run's budget of 0.4 could be exceeded" in failed["error"]["message"]
    assert "--set budget.cost=X" in failed["error"]["hint"]


def test_a_cost_budget_refuses_a_model_it_cannot_price(tmp_path: Path, server: FakeLLM) -> None:
    top = "config: {prices: {other: {input: 1, output: 1}}}\nbudget: {cost: 5}"
    wf = write(tmp_path, workflow(server.url, top=top, steps=TWO_CALLS))
    events = run_json(tmp_path, "run", wf, code=1)
    (failed,) = budget_failures(events)
    assert "m has no price in config.prices" in failed["error"]["message"]
    assert "config.prices.m" in failed["error"]["hint"]
    assert server.requests == []


# --- a step's budget ----------------------------------------------------------------------


def test_a_step_budget_covers_all_its_items(tmp_path: Path, server: FakeLLM) -> None:
    steps = f"""\
draft:
  for_each: "[1, 2, 3]"
  max_parallel: 3
  agent: writer
  budget: {{tokens: 400}}
  prompt: "Part {{{{ item }}}}. {FILLER}"
"""
    wf = write(tmp_path, workflow(server.url, steps=steps))
    events = run_json(tmp_path, "run", wf, code=1)
    items = [e for e in events if e["type"] == "step.failed" and "[" in e["step"]]
    assert len(items) == 1  # two calls of ~150 fit in 400; a third could not
    assert items[0]["error"]["class"] == "budget_exceeded"
    assert "the step's budget of 400 tokens" in items[0]["error"]["message"]
    assert "steps.draft.budget.tokens" in items[0]["error"]["hint"]
    assert len(server.requests) == 2
    assert events[-1]["tokens"] <= 400


def test_every_repair_call_asks_the_budget(tmp_path: Path) -> None:
    # The first reply is not JSON: the agent asks again within the same attempt. That
    # repair call would take the step over its budget, so it is never sent.
    with FakeLLM(honest(content="no JSON here")) as server:
        steps = f"""\
plot:
  agent: writer
  budget: {{tokens: 500}}
  prompt: "{FILLER} reply 150"
  output_schema: {{type: object, required: [title]}}
"""
        wf = write(tmp_path, workflow(server.url, steps=steps, max_tokens=150))
        events = run_json(tmp_path, "run", wf, code=1)
        assert len(server.requests) == 1
    (failed,) = budget_failures(events)
    assert failed["step"] == "plot"
    assert "the step's budget of 500 tokens could be exceeded" in failed["error"]["message"]
    assert events[-1]["tokens"] <= 500


# --- a server that ignores max_tokens -----------------------------------------------------


def test_a_reply_that_lands_over_fails_the_step_with_its_usage_recorded(tmp_path: Path) -> None:
    with FakeLLM(honest(ignores_max_tokens=True)) as server:
        steps = f"""\
first: {{agent: writer, prompt: "{FILLER} reply 300"}}
"""
        wf = write(tmp_path, workflow(server.url, top="budget: {tokens: 200}", steps=steps,
                                      max_tokens=20))
        events = run_json(tmp_path, "run", wf, code=1)
        assert len(server.requests) == 1
    summary = events[-1]
    (failed,) = budget_failures(events)
    assert "the run's budget of 200 tokens was exceeded" in failed["error"]["message"]
    assert "max_tokens" in failed["error"]["message"]
    assert failed["tokens"] == summary["tokens"] > 300  # recorded: ~90 prompt + 300 reply
    step = next(s for s in show(tmp_path, summary["run_id"])["steps"] if s["id"] == "first")
    assert step["status"] == "failed"
    assert step["usage"]["tokens"] == summary["tokens"]
    assert not any(e["type"] == "step.retrying" for e in events)


# --- calls in parallel --------------------------------------------------------------------


def test_eight_parallel_calls_cannot_jointly_cross_the_budget(tmp_path: Path) -> None:
    with FakeLLM(honest(delay_s=0.3)) as server:
        steps = """\
draft:
  for_each: "[0, 1, 2, 3, 4, 5, 6, 7]"
  max_parallel: 8
  agent: writer
  prompt: "Part {{ item }}, reply 40"
"""
        wf = write(tmp_path, workflow(server.url, top="budget: {tokens: 300}", steps=steps,
                                      max_tokens=40))
        events = run_json(tmp_path, "run", wf, code=1)
        sent = len(server.requests)
    spent = events[-1]["tokens"]
    refused = [e for e in events if e["type"] == "step.failed" and "[" in e["step"]]
    assert spent <= 300
    assert refused and all(e["error"]["class"] == "budget_exceeded" for e in refused)
    assert sent + len(refused) == 8
    # Calls waited for those in flight rather than fail while room might remain: the
    # ones refused were refused only when what was spent left no room for them.
    found = re.search(r"needs up to (\d+) tokens", refused[0]["error"]["message"])
    assert found is not None
    needs = int(found[1])
    assert spent + needs > 300
    assert sent >= 5


# --- the property -------------------------------------------------------------------------


def _inst() -> Any:
    return SimpleNamespace(usage=None, node=SimpleNamespace(step=SimpleNamespace(id="draft")))


async def _calls(url: str, plan: list[tuple[int, int, str]], parallel: int,
                 usage: Usage, step_budget: Budget | None) -> list[tuple[str, int]]:
    """Each call of ``plan`` (max_tokens, reply asked, mode) as an attempt of its own,
    ``parallel`` at a time, the way the engine makes them: (outcome, its estimate)."""
    agent = LlmAgent()
    gate = asyncio.Semaphore(parallel)

    async def one(i: int, max_tokens: int, reply: int, mode: str) -> tuple[str, int]:
        async with gate:
            metering = usage.attempt(_inst(), step_budget, None)
            asked: list[int] = []

            async def reserve(est: dict[str, Any]) -> Callable[[], None]:
                asked.append(est["input_tokens"] + est["output_tokens"])
                release: Callable[[], None] = await metering.reserve(est)
                return release

            call = Call(
                run_id="r", step_id=f"draft[{i}]", attempt=1,
                inputs={"base_url": url, "model": "m", "max_tokens": max_tokens,
                        "prompt": f"call {i} reply {reply} mode {mode}"},
                workflow_dir=Path("."), run_dir=Path("."), secrets={}, timeout_s=None,
                meter=metering.meter, reserve=reserve,
            )
            try:
                await asyncio.wait_for(agent.run(call), 0.2 if mode == "slow" else None)
                outcome = "ok"
            except BudgetExceeded:
                outcome = "refused"
            except (StepFailure, TimeoutError):
                outcome = "failed"
            finally:
                metering.close()
            assert metering.over is None  # an honest server never lands a call over
            return outcome, asked[-1] if asked else 0

    try:
        return await asyncio.gather(*(one(i, *c) for i, c in enumerate(plan)))
    finally:
        await agent.aclose()


def test_spent_never_passes_a_budget_when_the_server_honours_max_tokens() -> None:
    with FakeLLM(honest(), record=False) as server:

        @settings(max_examples=25, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(
            plan=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 100),
                                    st.sampled_from(["ok", "ok", "ok", "error", "slow"])),
                          min_size=1, max_size=10),
            parallel=st.integers(1, 8),
            budget=st.integers(0, 500),
            step_budget=st.none() | st.integers(0, 400),
        )
        def check(plan: list[tuple[int, int, str]], parallel: int, budget: int,
                  step_budget: int | None) -> None:
            usage = Usage({}, Budget(tokens=budget))
            step = Budget(tokens=step_budget) if step_budget is not None else None
            outcomes = asyncio.run(_calls(server.url, plan, parallel, usage, step))
            spent = usage.totals["tokens"]
            step_spent = usage.totals.get("steps", {}).get("draft", {}).get("tokens", 0)
            assert spent <= budget
            assert step_budget is None or step_spent <= step_budget
            assert usage.holding() == 0  # nothing leaks: failed and cancelled calls too
            for outcome, needs in outcomes:
                if outcome == "refused":  # refused only when what was spent left no room
                    assert spent + needs > budget or (
                        step_budget is not None and step_spent + needs > step_budget)

        check()


# --- an attempt on a Dask worker ------------------------------------------------------------


class _Submitted:
    """What `Client.submit` gives back: awaited for the worker's outcome."""

    def __init__(self, out: dict[str, Any]) -> None:
        self.out = out

    def __await__(self) -> Any:
        async def outcome() -> dict[str, Any]:
            return self.out

        return outcome().__await__()

    def release(self) -> None:
        pass


class _Cluster:
    """Just enough of `DaskExecutor` for `RemoteAgent.run`: one worker that used 15
    tokens and answered ``{"title": "x"}``."""

    lost = None

    def __init__(self) -> None:
        self.submitted = 0
        self.client = self

    def submit(self, *args: Any, **kw: Any) -> _Submitted:
        self.submitted += 1
        usage = {"model": "m", "input_tokens": 10, "output_tokens": 5, "cached": False,
                 "truncated": False}
        return _Submitted({"worker": "tcp://w:1", "logs": [], "usage": [usage], "puts": [],
                           "output": json.dumps({"title": "x"})})

    def check_alive(self) -> None:
        pass

    async def folder(self, workflow_dir: Path) -> str:
        return "digest"


@pytest.mark.parametrize("budget", [300, 3000])
def test_an_attempt_on_a_worker_reserves_all_its_calls_up_front(budget: int) -> None:
    pytest.importorskip("distributed")
    from storyflow.engine.executors._dask import RemoteAgent

    cluster = _Cluster()
    remote = RemoteAgent(cluster, "llm", LlmAgent())  # type: ignore[arg-type,unused-ignore]
    usage = Usage({}, Budget(tokens=budget))
    metering = usage.attempt(_inst(), None, None)
    call = Call(
        run_id="r", step_id="plot", attempt=1, workflow_dir=Path("."), run_dir=Path("."),
        inputs={"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_tokens": 50,
                "prompt": FILLER},
        secrets={}, timeout_s=None, output_schema={"type": "object"},
        meter=metering.meter, reserve=metering.reserve,
    )

    async def attempt() -> Any:
        try:
            return await remote.run(call)
        finally:
            assert usage.holding() == 0  # settled once the usage came back
            metering.close()

    if budget == 300:  # the first call and its 2 repairs, ~1,000 tokens, cannot fit
        with pytest.raises(BudgetExceeded, match=r"the attempt's 3 calls \(its repairs"):
            asyncio.run(attempt())
        assert cluster.submitted == 0  # refused on the coordinator, never dispatched
        assert usage.totals["tokens"] == 0
    else:
        assert asyncio.run(attempt()) == {"title": "x"}
        assert cluster.submitted == 1
        assert usage.totals["tokens"] == 15


# --- --set reaches child runs; an unknown cost is unknown -----------------------------------


def family(tmp: Path, url: str) -> Path:
    write(tmp, textwrap.dedent(f"""\
        apiVersion: storyflow/v1
        name: child
        agents:
          writer:
            uses: llm
            with: {{base_url: "{url}", model: m, max_tokens: 20}}
        steps:
          write: {{agent: writer, prompt: "Write a line"}}
        outputs:
          tokens: "{{{{ run.usage.tokens }}}}"
          cost: "{{{{ run.usage.cost if run.usage.priced else none }}}}"
        """), "child.yaml")
    return write(tmp, textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: parent
        steps:
          story: {uses: workflow, with: {path: child.yaml}}
          note: {uses: template, with: {template: "done"}, needs: [story]}
        outputs:
          cost: "{{ steps.story.output.cost }}"
        """), "parent.yaml")


def child_record(tmp: Path, run_id: str) -> Any:
    with Store(tmp / "state") as store:
        record = store.get_run(f"{run_id}.story")
    assert record is not None
    return record


def test_set_reaches_a_child_run_and_an_unknown_cost_is_null(
    tmp_path: Path, server: FakeLLM
) -> None:
    wf = family(tmp_path, server.url)
    unpriced = run_json(tmp_path, "run", wf)[-1]
    assert unpriced["outputs"]["cost"] is None  # no price: unknown, not 0

    prices = "config.prices={m: {input: 1000, output: 1000}}"
    events = run_json(tmp_path, "run", wf, "--set", prices,
                      "--set", "steps.note.description=the parent's own")
    summary = events[-1]
    assert summary["outputs"]["cost"] == pytest.approx(summary["tokens"] * 0.001)
    assert summary["cost"] == pytest.approx(summary["outputs"]["cost"])
    # A child takes config/budget/defaults/seed; a step path stays the parent's.
    assert child_record(tmp_path, summary["run_id"]).sets == [prices]


def test_a_resumed_parent_passes_its_child_the_same_settings(
    tmp_path: Path, server: FakeLLM
) -> None:
    wf = family(tmp_path, server.url)
    prices = "config.prices={m: {input: 1000, output: 1000}}"
    events = run_json(tmp_path, "run", wf, "--set", prices, "--set", "budget.tokens=5", code=1)
    run_id = events[0]["run_id"]
    failed = [e for e in events if e["type"] == "step.failed"]
    assert failed[0]["step"] == "story"
    assert failed[0]["error"]["class"] == "budget_exceeded"  # the child's, passed up
    assert child_record(tmp_path, run_id).sets == [prices, "budget.tokens=5"]
    assert server.requests == []

    resumed = run_json(tmp_path, "resume", run_id, "--set", "budget.tokens=1000")
    assert resumed[-1]["status"] == "succeeded"
    assert resumed[-1]["outputs"]["cost"] == pytest.approx(resumed[-1]["tokens"] * 0.001)
    assert child_record(tmp_path, run_id).sets == [prices, "budget.tokens=5",
                                                   "budget.tokens=1000"]


def test_a_parent_budget_holds_over_its_children(tmp_path: Path, server: FakeLLM) -> None:
    wf = family(tmp_path, server.url)
    text = wf.read_text(encoding="utf-8").replace(
        "story: {uses: workflow, with: {path: child.yaml}}",
        'story: {uses: workflow, with: {path: child.yaml}, for_each: "[1, 2, 3, 4]"}',
    ).replace("steps.story.output.cost", "steps.story.output | length")
    write(tmp_path, text + "budget: {tokens: 80}\n", "parent.yaml")
    # Each child call reserves ~12 prompt + 20 reply tokens and uses ~22: the parent's
    # budget, not any child's, stops the fourth child. The parent's own budget only:
    # nothing is passed on with --set.
    events = run_json(tmp_path, "run", wf, code=1)
    assert events[-1]["tokens"] <= 80
    refused = [e for e in events if e["type"] == "step.failed" and "[" in e["step"]]
    assert refused and all(e["error"]["class"] == "budget_exceeded" for e in refused)
    assert "in the parent run" in json.dumps(refused)


def test_the_batch_example_prices_its_stories_from_the_command_line(tmp_path: Path) -> None:
    from test_llm_env import answer

    for item in ("short-story.yaml", "batch.yaml", "storylib.py", "grammars"):
        src, dst = REPO / "workflows" / item, tmp_path / item
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
    premises = write(tmp_path, '{"id": "a", "premise": "A storm at sea"}\n'
                     '{"id": "b", "premise": ""}\n', "premises.jsonl")

    def batch(*args: str) -> list[list[str]]:
        result = run_cli(
            "run", tmp_path / "batch.yaml", "--env", "llm", "-i", f"premises={premises}",
            "--json", *args, state_dir=tmp_path / "state", cwd=tmp_path,
            env={"STORYFLOW_LLM_BASE_URL": model.url, "OPENAI_API_KEY": "sk-budget-test"},
        )
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
        summary = json.loads(result.stdout.splitlines()[-1])
        text = (Path(summary["run_dir"]) / "summary.md").read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
        return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]

    with FakeLLM(answer) as model:
        rows = batch()
        assert [(r[3], r[6] != "?", r[7]) for r in rows] == [
            ("succeeded", True, "?"),  # no price: the cost is unknown, not 0.0000
            ("failed", False, "?"),    # a failed row's usage is not known here
        ]
        rows = batch("--set", "config.prices={gpt-4o-mini: {input: 1000000, output: 1000000}}")
        assert rows[0][3] == "succeeded"
        assert float(rows[0][7]) == pytest.approx(int(rows[0][6]))  # $1 a token
