"""A stream cut after its text began, metered everywhere it must be — and only once.

The ``llm`` agent charges a stream that fails once its text has begun: the prompt and
the received text at 4 UTF-8 bytes a token, ``estimated: true``. These tests drive
``storyflow run``/``resume`` in subprocesses against the fake server of `llm_server`
and check the exact numbers in the events, ``show --json``, ``report --json`` and the
run's totals: a cut repair call, a cut then a good retry priced by ``config.prices``
(a ``cost`` budget too), cut streams in parallel under a run budget, a cut inside a
child run (the parent's budgets), a pool's ``tokens:`` per minute, the call cache after
a cut, Dask workers (``executor.llm: workers``), and resume after ``budget_exceeded``.

Every prompt here is one user message, so a cut call costs
``text_tokens(canonical(messages)) + text_tokens(received)`` and reserves
``prompt_tokens(messages) + max_tokens``.
"""

from __future__ import annotations

import collections
import json
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from llm_server import FakeLLM, Reply, Request, ok, pieces, sse
from storyflow.agents.llm_agent._request import canonical, prompt_tokens, text_tokens

PROSE = "The keeper climbed the stairs and lit the lamp, and the sea answered."
GOOD = "fine words here"
MAX = 20


def user(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


def cut_tokens(messages: list[dict[str, Any]], received: str) -> tuple[int, int]:
    """What a stream cut after ``received`` is charged: (prompt, reply) tokens."""
    return text_tokens(canonical(messages)), text_tokens(received)


def reserved(prompt: str) -> int:
    return prompt_tokens(user(prompt)) + MAX


def cut(n: int = 2, **kw: Any) -> Reply:
    return ok(PROSE, cut_after=n, **kw)


def received(n: int = 2) -> str:
    return "".join(pieces(ok(PROSE))[:n])


def usage(tin: int, tout: int, calls: int, *, cost: float = 0.0, priced: bool = False,
          estimated: bool = True, cached: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = {"input_tokens": tin, "output_tokens": tout, "tokens": tin + tout,
                           "cost": cost, "calls": calls, "cached_calls": cached,
                           "priced": priced}
    if estimated:
        doc["estimated"] = True
    return doc


class Project:
    """A folder, its state, and the CLI pointed at one fake server."""

    def __init__(self, root: Path, server: FakeLLM) -> None:
        self.root = root
        self.server = server

    def write(self, name: str, *parts: str) -> Path:
        """``parts`` dedented one by one and joined."""
        path = self.root / name
        path.write_text("".join(map(textwrap.dedent, parts)), encoding="utf-8")
        return path

    def cli(self, *args: str | Path) -> Any:
        return run_cli(*args, state_dir=self.root / "state", cwd=self.root,
                       env={"STORYFLOW_LLM_BASE_URL": self.server.url})

    def events(self, *args: str | Path, code: int) -> list[dict[str, Any]]:
        result = self.cli(*args, "--json")
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == code, (result.stdout[-3000:], result.stderr[-2000:])
        return [e for e in map(json.loads, result.stdout.splitlines()) if e["type"] != "step.delta"]

    def show(self, run_id: str) -> dict[str, dict[str, Any]]:
        doc = json.loads(self.cli("show", run_id, "--json").stdout)
        return {s["id"]: s for s in doc["steps"]}

    def report(self, run_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("report", run_id, "--format", "json").stdout)
        return doc


def of(events: list[dict[str, Any]], kind: str, step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind and (step is None or e.get("step") == step)]


def agent(extra: str = "") -> str:
    return f"agents:\n  w: {{uses: llm, with: {{model: m, max_tokens: {MAX}{extra}}}}}\n"


# -- a repair call cut short ---------------------------------------------------------------


def test_a_cut_repair_call_is_charged_once_beside_the_call_it_corrects(tmp_path: Path) -> None:
    title = '{"title": "A lamp in the tide"}'
    with FakeLLM() as server:
        server.push(ok("not JSON", usage=(30, 4)),  # parsed, invalid: a repair is asked
                    ok(title, chunk_unit="chars", chunk_size=4, cut_after=3),  # the repair, cut
                    ok('{"title": "ok"}', usage=(40, 6)))  # the retry's first call
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", "apiVersion: storyflow/v1\nname: rep\n"
                     "budget: {tokens: 5000}\n", agent(), """\
            steps:
              plot:
                agent: w
                prompt: plot
                output_schema: {type: object, required: [title]}
                retry: {attempts: 3, delay: 0}
            """)
        events = p.events("run", wf, code=0)
        requests = list(server.requests)
    assert [len(r.body["messages"]) for r in requests] == [2, 4, 2]  # system + user; + repair
    tin, tout = cut_tokens(requests[1].body["messages"], title[:12])
    cut_call = tin + tout
    (retrying,) = of(events, "step.retrying")
    assert retrying["error"]["class"] == "transient"
    assert retrying["tokens"] == 34 + cut_call  # the first call's usage and the cut repair
    (done,) = of(events, "step.succeeded", "plot")
    total = 34 + cut_call + 46
    assert done["tokens"] == total and events[-1]["tokens"] == total
    run_id = events[0]["run_id"]
    assert p.show(run_id)["plot"]["usage"] == usage(30 + tin + 40, 4 + tout + 6, 3)
    report = p.report(run_id)
    assert (report["totals"]["tokens"], report["totals"]["model_calls"]) == (total, 3)
    assert report["budgets"][0]["spent_tokens"] == total


# -- a cut then a good retry, priced; a cost budget ---------------------------------------

PRICES = "config: {prices: {m: {input: 1000, output: 2000}}}\n"  # $0.001 / $0.002 a token


def price(tin: int, tout: int) -> float:
    return round((tin * 1000 + tout * 2000) / 1e6, 10)


def test_a_cut_then_a_good_retry_are_both_priced_once(tmp_path: Path) -> None:
    with FakeLLM(ok(GOOD, usage=(20, 3))) as server:
        server.push(cut())
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", "apiVersion: storyflow/v1\nname: priced\n" + PRICES
                     + "budget: {cost: 1}\n", agent(), """\
            steps:
              line: {agent: w, prompt: "A line", retry: {attempts: 3, delay: 0}}
            """)
        events = p.events("run", wf, code=0)
        assert len(server.requests) == 2
    tin, tout = cut_tokens(user("A line"), received())
    (retrying,) = of(events, "step.retrying")
    assert (retrying["tokens"], retrying["cost"]) == (tin + tout, pytest.approx(price(tin, tout)))
    cost = round(price(tin, tout) + price(20, 3), 10)
    summary = events[-1]
    assert summary["tokens"] == tin + tout + 23 and summary["cost"] == pytest.approx(cost)
    run_id = summary["run_id"]
    shown = p.show(run_id)["line"]["usage"]
    assert shown == usage(tin + 20, tout + 3, 2, cost=shown["cost"], priced=True)
    assert shown["cost"] == pytest.approx(cost)
    report = p.report(run_id)
    assert report["totals"]["cost"] == pytest.approx(cost)
    (budget,) = report["budgets"]
    assert budget["spent_cost"] == pytest.approx(cost) and budget["priced"] is True


def test_a_cost_budget_stops_the_retries_of_a_cut_stream(tmp_path: Path) -> None:
    with FakeLLM(cut()) as server:
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", "apiVersion: storyflow/v1\nname: priced\n" + PRICES, agent(),
                     """\
            steps:
              line:
                agent: w
                prompt: "A line"
                budget: {cost: 0.1}
                retry: {attempts: 10, delay: 0}
            """)
        events = p.events("run", wf, code=1)
        sent = len(server.requests)
    tin, tout = cut_tokens(user("A line"), received())
    each = price(tin, tout)
    needs = price(prompt_tokens(user("A line")), MAX)  # the reservation, priced
    calls = 0
    while calls * each + needs <= 0.1 + 1e-9:
        calls += 1
    assert sent == calls == 4  # $0.015 a cut, $0.052 reserved: the fifth cannot fit
    (failed,) = of(events, "step.failed", "line")
    assert failed["error"]["class"] == "budget_exceeded"
    assert failed["error"]["message"] == (
        f"the step's budget of 0.1 could be exceeded: {calls * each:.4f} spent, "
        f"the next call needs up to {needs:.4f}")
    run_id = events[0]["run_id"]
    shown = p.show(run_id)["line"]["usage"]
    assert shown == usage(tin * calls, tout * calls, calls, cost=shown["cost"], priced=True)
    assert shown["cost"] == pytest.approx(each * calls)
    (budget,) = p.report(run_id)["budgets"]
    assert budget["spent_cost"] == pytest.approx(each * calls)
    assert each * calls <= 0.1


# -- cut streams in parallel under a run budget --------------------------------------------


def test_parallel_cut_streams_never_jointly_cross_the_run_budget(tmp_path: Path) -> None:
    seen: collections.Counter[str] = collections.Counter()

    def answer(request: Request) -> Reply:  # each item's first stream is cut
        prompt = request.body["messages"][-1]["content"]
        seen[prompt] += 1
        if seen[prompt] == 1:
            return cut(chunk_delay_s=0.05)
        return ok(GOOD, usage=(20, 3), chunk_delay_s=0.05)

    budget = 150
    with FakeLLM(answer) as server:
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", f"apiVersion: storyflow/v1\nname: par\n"
                     f"budget: {{tokens: {budget}}}\n", agent(), """\
            steps:
              draft:
                for_each: "[0, 1, 2, 3, 4, 5, 6, 7]"
                max_parallel: 8
                agent: w
                prompt: "Part {{ item }}"
                retry: {attempts: 3, delay: 0}
            """)
        events = p.events("run", wf, "--max-parallel", "4", code=1)
        sent = len(server.requests)
    tin, tout = cut_tokens(user("Part 0"), received())
    needs = reserved("Part 0")
    run_id = events[0]["run_id"]
    steps = p.show(run_id)
    items = {sid: s for sid, s in steps.items() if "[" in sid}
    spent = 0
    calls = 0
    for sid, step in items.items():
        prompt = f"Part {sid[6]}"
        cuts, goods = min(seen[prompt], 1), max(seen[prompt] - 1, 0)
        if step["status"] == "succeeded":
            assert (cuts, goods) == (1, 1)
            assert step["usage"] == usage(tin + 20, tout + 3, 2)
        elif cuts:  # cut, then its retry refused
            assert step["usage"] == usage(tin, tout, 1)
        else:  # refused before it was sent
            assert step.get("usage") is None
        spent += (step.get("usage") or {}).get("tokens", 0)
        calls += (step.get("usage") or {}).get("calls", 0)
    summary = events[-1]
    assert summary["tokens"] == spent <= budget  # the totals are the steps' usage
    assert calls == sent == sum(seen.values())
    refused = [e for e in of(events, "step.failed") if "[" in e["step"]]
    assert refused and {e["error"]["class"] for e in refused} == {"budget_exceeded"}
    for e in refused:  # refused only when what was spent left no room
        used = int(e["error"]["message"].split(" used,")[0].rsplit(" ", 1)[1])
        assert used + needs > budget
    assert spent + needs > budget
    report = p.report(run_id)
    assert report["totals"]["tokens"] == spent and report["totals"]["model_calls"] == calls
    assert report["budgets"] == [{"scope": "run", "tokens": budget, "cost": None,
                                  "spent_tokens": spent, "spent_cost": 0.0, "priced": False}]


# -- a streamed refusal ----------------------------------------------------------------------

REFUSAL = "I can't help with that."


@pytest.mark.parametrize("reported", [(9, 7), None], ids=["usage", "no-usage"])
def test_the_retries_of_a_streamed_refusal_are_charged_and_stop_at_the_budget(
    tmp_path: Path, reported: tuple[int, int] | None,
) -> None:
    # A refusal is a whole reply: the model wrote it and the provider bills it. It fails
    # the attempt as invalid_output, which the default retry.on retries.
    chunks: list[Any] = [{"choices": [{"delta": {"refusal": REFUSAL}, "finish_reason": None}]},
                         {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
    if reported is not None:
        chunks.append({"choices": [], "usage": {"prompt_tokens": reported[0],
                                                "completion_tokens": reported[1]}})
    tin, tout = reported or cut_tokens(user("A line"), REFUSAL)
    with FakeLLM(sse(*chunks, b"[DONE]")) as server:
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", "apiVersion: storyflow/v1\nname: refused\n", agent(), """\
            steps:
              line:
                agent: w
                prompt: "A line"
                budget: {tokens: 100}
                retry: {attempts: 12, delay: 0}
            """)
        events = p.events("run", wf, code=1)
        sent = len(server.requests)
    calls = 0
    while calls * (tin + tout) + reserved("A line") <= 100:
        calls += 1
    assert sent == calls < 12
    retrying = of(events, "step.retrying")
    assert [e["error"]["class"] for e in retrying] == ["invalid_output"] * calls
    assert [e["tokens"] for e in retrying] == [(tin + tout) * n for n in range(1, calls + 1)]
    (failed,) = of(events, "step.failed", "line")
    assert failed["error"]["class"] == "budget_exceeded"
    assert f"{(tin + tout) * calls} used" in failed["error"]["message"]
    assert p.show(events[0]["run_id"])["line"]["usage"] == usage(
        tin * calls, tout * calls, calls, estimated=reported is None)


# -- a cut stream in a child run -----------------------------------------------------------

CHILD = "apiVersion: storyflow/v1\nname: child\n" + agent() + """\
steps:
  line: {agent: w, prompt: "A line", retry: {attempts: 3, delay: 0}}
"""


def test_a_cut_stream_in_a_child_run_counts_against_the_parents_budgets(tmp_path: Path) -> None:
    with FakeLLM(ok(GOOD, usage=(20, 3))) as server:
        p = Project(tmp_path, server)
        p.write("child.yaml", CHILD)

        def parent(step_budget: int) -> Path:
            return p.write("parent.yaml", f"""\
                apiVersion: storyflow/v1
                name: parent
                budget: {{tokens: 1000}}
                steps:
                  story: {{uses: workflow, with: {{path: child.yaml}},
                           budget: {{tokens: {step_budget}}}}}
                """)

        tin, tout = cut_tokens(user("A line"), received())
        # Room for both calls: each counted once, in the child and through the parent.
        server.push(cut())
        events = p.events("run", parent(1000), code=0)
        run_id = events[0]["run_id"]
        both = usage(tin + 20, tout + 3, 2)
        assert p.show(run_id)["story"]["usage"] == both
        assert p.show(f"{run_id}.story")["line"]["usage"] == both
        assert events[-1]["tokens"] == both["tokens"]
        report = p.report(run_id)
        assert report["totals"]["tokens"] == both["tokens"]
        assert [b["spent_tokens"] for b in report["budgets"]] == [both["tokens"]] * 2

        # The parent's step budget has room for the first call only: after the cut, the
        # child's retry is refused through its parent, never sent.
        server.push(cut())
        before = len(server.requests)
        events = p.events("run", parent(reserved("A line") + tin + tout - 1), code=1)
        assert len(server.requests) - before == 1
    run_id = events[0]["run_id"]
    (failed,) = of(events, "step.failed", "story")
    assert failed["error"]["class"] == "budget_exceeded"
    assert f"{tin + tout} used" in failed["error"]["message"]
    assert "(in the parent run, through its step story)" in failed["error"]["message"]
    once = usage(tin, tout, 1)
    assert failed["tokens"] == events[-1]["tokens"] == tin + tout
    assert p.show(run_id)["story"]["usage"] == once
    assert p.show(f"{run_id}.story")["line"]["usage"] == once
    assert [b["spent_tokens"] for b in p.report(run_id)["budgets"]] == [tin + tout] * 2


# -- a pool's tokens per minute ------------------------------------------------------------


def test_a_pool_with_tokens_per_minute_sees_a_cut_streams_tokens(tmp_path: Path) -> None:
    arrived: list[float] = []
    first = [True]

    def answer(request: Request) -> Reply:
        arrived.append(time.monotonic())
        if first[0]:
            first[0] = False
            return cut()
        return ok(GOOD, usage=(20, 3))

    rate = 2.0  # tokens a second; the bucket holds a minute's worth
    capacity = rate * 60
    prompt = "Say it. " * 55
    tin, tout = cut_tokens(user(prompt), received())
    charged = tin + tout
    wait = (charged - capacity + 1) / rate  # until the bucket holds one token again
    assert wait == 1.0  # without the received text's 3 tokens, no wait at all
    with FakeLLM(answer) as server:
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", f"""\
            apiVersion: storyflow/v1
            name: pooled
            pools:
              llm: {{tokens: {int(rate * 60)}/min}}
            agents:
              w: {{uses: llm, pool: llm, with: {{model: m, max_tokens: {MAX}}}}}
            steps:
              line: {{agent: w, prompt: "{prompt}", retry: {{attempts: 2, delay: 0}}}}
            """)
        events = p.events("run", wf, code=0)
    (retrying,) = of(events, "step.retrying")
    assert retrying["tokens"] == charged
    assert len(arrived) == 2
    assert wait - 0.05 <= arrived[1] - arrived[0] < wait + 1.5  # the retry waited for them


# -- the call cache after a cut --------------------------------------------------------------


def test_a_cached_reply_after_a_cut_spends_nothing(tmp_path: Path) -> None:
    with FakeLLM(ok(GOOD, usage=(20, 3))) as server:
        server.push(cut())
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", "apiVersion: storyflow/v1\nname: cached\n" + PRICES
                     + "budget: {tokens: 1000, cost: 1}\n", agent(", temperature: 0"), """\
            steps:
              line: {agent: w, prompt: "A line", retry: {attempts: 3, delay: 0}}
            """)
        first = p.events("run", wf, code=0)
        second = p.events("run", wf, code=0)
        assert len(server.requests) == 2  # the cut and its retry; then the cache answered
    tin, tout = cut_tokens(user("A line"), received())
    assert first[-1]["tokens"] == tin + tout + 23
    (done,) = of(second, "step.succeeded", "line")
    assert (done["tokens"], done["cost"]) == (0, 0.0)
    run_id = second[0]["run_id"]
    assert p.show(run_id)["line"]["usage"] == usage(0, 0, 1, priced=True, estimated=False,
                                                    cached=1)
    report = p.report(run_id)
    assert (report["totals"]["tokens"], report["totals"]["cost"]) == (0, 0.0)
    assert [(b["spent_tokens"], b["spent_cost"]) for b in report["budgets"]] == [(0, 0.0)]


# -- Dask workers ----------------------------------------------------------------------------

DASK_FLOW = """\
apiVersion: storyflow/v1
name: on-workers
executor: {{dask: {{workers: 1, threads: 1}}, llm: workers}}
budget: {{tokens: {budget}}}
""" + agent().replace("{", "{{").replace("}", "}}") + """\
steps:
  line: {{agent: w, prompt: "A line", retry: {{attempts: 3, delay: 0}}{more}}}
"""


def test_a_cut_stream_on_a_dask_worker_is_charged_on_the_coordinator(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    tin, tout = cut_tokens(user("A line"), received())
    with FakeLLM(ok(GOOD, usage=(20, 3))) as server:
        server.push(cut())
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", DASK_FLOW.format(budget=reserved("A line") + tin + tout - 1,
                                                 more=""))
        events = p.events("run", wf, code=1)
        assert len(server.requests) == 1  # the retry's reservation no longer fits
    (retrying,) = of(events, "step.retrying")
    assert retrying["worker"].startswith("tcp://127.0.0.1:")  # the cut happened on a worker
    assert retrying["tokens"] == tin + tout
    (failed,) = of(events, "step.failed", "line")
    assert failed["error"]["class"] == "budget_exceeded"
    assert f"{tin + tout} used" in failed["error"]["message"]
    run_id = events[0]["run_id"]
    assert p.show(run_id)["line"]["usage"] == usage(tin, tout, 1)
    assert p.report(run_id)["budgets"][0]["spent_tokens"] == tin + tout


def test_a_stream_stopped_by_the_timeout_on_a_dask_worker_is_charged(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    with FakeLLM(ok(PROSE, chunk_delay_s=0.15)) as server:
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", DASK_FLOW.format(budget=1000, more=", timeout: 0.6s"))
        events = p.events("run", wf, code=1)
        assert len(server.requests) == 3
    (failed,) = of(events, "step.failed", "line")
    assert failed["error"]["class"] == "timeout"
    shown = p.show(events[0]["run_id"])["line"].get("usage") or {}
    assert shown.get("input_tokens") == 3 * cut_tokens(user("A line"), "")[0]
    assert shown.get("estimated") is True and shown.get("calls") == 3


# -- resume after budget_exceeded ------------------------------------------------------------


def resume_project(tmp_path: Path, server: FakeLLM) -> tuple[Project, Path]:
    p = Project(tmp_path, server)
    wf = p.write("wf.yaml", "apiVersion: storyflow/v1\nname: resumed\n"
                 "budget: {tokens: 160}\n", agent(), """\
        steps:
          first: {agent: w, prompt: "First line"}
          title:
            agent: w
            prompt: "A title for the lighthouse"
            needs: [first]
            budget: {tokens: 100}
            retry: {attempts: 12, delay: 0}
        """)
    return p, wf


def stories(good: list[bool]) -> Callable[[Request], Reply]:
    """``first`` answers well; ``title`` is cut while ``good[0]`` is false."""

    def answer(request: Request) -> Reply:
        if request.body["messages"][-1]["content"] == "First line":
            return ok(GOOD, usage=(20, 3))
        return ok(GOOD, usage=(30, 4)) if good[0] else ok(PROSE, cut_after=3)

    return answer


def test_budgets_hold_across_processes_after_budget_exceeded(tmp_path: Path) -> None:
    good = [False]
    title = "A title for the lighthouse"
    tin, tout = cut_tokens(user(title), received(3))
    each, needs = tin + tout, reserved(title)
    assert (each, needs) == (19, 39)
    with FakeLLM(stories(good)) as server:
        p, wf = resume_project(tmp_path, server)
        # 1st process: `first` spends 23; `title` is cut 4 times (76), the 5th call would
        # take the step's 100 over.
        events = p.events("run", wf, code=1)
        run_id = events[0]["run_id"]
        (failed,) = of(events, "step.failed", "title")
        assert failed["error"]["message"].startswith(
            f"the step's budget of 100 tokens could be exceeded: {4 * each} used")
        assert events[-1]["tokens"] == 23 + 4 * each
        assert len(server.requests) == 5

        # 2nd process, the step's budget raised: the run's 160 still counts the first
        # process's 99 — two more cuts fit, not a third. `first` is kept, not called.
        events = p.events("resume", run_id, "--set", "steps.title.budget.tokens=1000", code=1)
        (failed,) = of(events, "step.failed", "title")
        assert failed["error"]["message"].startswith(
            f"the run's budget of 160 tokens could be exceeded: {23 + 6 * each} used")
        assert events[-1]["tokens"] == 23 + 6 * each
        assert len(server.requests) == 7
        assert of(events, "step.kept", "first")

        # 3rd process: the title comes whole; nothing earlier is counted again.
        good[0] = True
        events = p.events("resume", run_id, "--set", "budget.tokens=1000", code=0)
        assert len(server.requests) == 8
    total = 23 + 6 * each + 34
    assert events[-1]["tokens"] == total
    (done,) = of(events, "step.succeeded", "title")
    assert done["attempt"] == 9
    report = p.report(run_id)
    assert [(b["scope"], b["tokens"], b["spent_tokens"]) for b in report["budgets"]] == [
        ("run", 1000, total), ("title", 1000, 6 * each + 34)]
    assert p.show(run_id)["first"]["usage"] == usage(20, 3, 1, estimated=False)


def test_a_step_rerun_by_resume_keeps_what_it_spent_before(tmp_path: Path) -> None:
    good = [False]
    tin, tout = cut_tokens(user("A title for the lighthouse"), received(3))
    with FakeLLM(stories(good)) as server:
        p, wf = resume_project(tmp_path, server)
        run_id = p.events("run", wf, code=1)[0]["run_id"]
        good[0] = True
        events = p.events("resume", run_id, "--set", "steps.title.budget.tokens=1000", code=0)
    total = 23 + 4 * (tin + tout) + 34
    assert events[-1]["tokens"] == total
    assert p.show(run_id)["title"]["usage"] == usage(4 * tin + 30, 4 * tout + 4, 5)
    assert p.report(run_id)["totals"]["tokens"] == total


@pytest.mark.parametrize("reported", [(9, 7), None], ids=["usage", "no-usage"])
def test_the_retries_of_a_whole_refusal_are_charged_as_the_server_counts_them(
    tmp_path: Path, reported: tuple[int, int] | None,
) -> None:
    # Not streamed: the server's usage is what a refusal costs, as for any whole reply;
    # without it the calls count no tokens (their cost unknown), and budgets cannot stop them.
    reply: dict[str, Any] = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": REFUSAL}}]}
    if reported is not None:
        reply["usage"] = {"prompt_tokens": reported[0], "completion_tokens": reported[1]}
    with FakeLLM(Reply(body=json.dumps(reply).encode())) as server:
        p = Project(tmp_path, server)
        wf = p.write("wf.yaml", "apiVersion: storyflow/v1\nname: refused\n",
                     agent(", stream: false"), """\
            steps:
              line:
                agent: w
                prompt: "A line"
                budget: {tokens: 100}
                retry: {attempts: 12, delay: 0}
            """)
        events = p.events("run", wf, code=1)
        sent = len(server.requests)
    (failed,) = of(events, "step.failed", "line")
    step_usage = p.show(events[0]["run_id"])["line"]["usage"]
    if reported is None:
        assert sent == 12 and failed["error"]["class"] == "invalid_output"
        assert step_usage["calls"] == 12 and step_usage["tokens"] == 0
        assert step_usage["priced"] is False
        return
    tin, tout = reported
    calls = 0
    while calls * (tin + tout) + reserved("A line") <= 100:
        calls += 1
    assert sent == calls < 12
    assert failed["error"]["class"] == "budget_exceeded"
    assert f"{(tin + tout) * calls} used" in failed["error"]["message"]
    assert step_usage == usage(tin * calls, tout * calls, calls, estimated=False)
