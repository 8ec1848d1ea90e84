"""Tokens, cost, budgets, the call cache and token-limited pools, end to end.

`llm` steps run against the fake OpenAI-compatible server of `llm_server` on
127.0.0.1; it reports 10 input and 5 output tokens per call.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import run_cli
from llm_server import FakeLLM
from storyflow.engine.pools import Pools
from storyflow.spec.model import Pool as PoolSpec

REPO = Path(__file__).resolve().parents[1]
EVENTS = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas" / "events.schema.json").read_text(encoding="utf-8"))
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLM]:
    with FakeLLM() as s:
        yield s


def workflow(url: str, *, budget: str = "", temperature: float = 0.7, items: int = 3,
             max_tokens: int | None = None) -> str:
    reply = f", max_tokens: {max_tokens}" if max_tokens is not None else ""
    return textwrap.dedent(f"""\
        apiVersion: storyflow/v1
        name: metered
        config:
          prices: {{m: {{input: 2.0, output: 4.0}}}}
        {budget}
        agents:
          writer:
            uses: llm
            with: {{base_url: "{url}", model: m, temperature: {temperature}{reply}}}
        steps:
          chapters:
            for_each: "{list(range(items))}"
            agent: writer
            prompt: "Write chapter {{{{ item }}}} after {{{{ previous }}}}"
        outputs:
          all: "{{{{ steps.chapters.output }}}}"
        """)


def run_json(tmp: Path, *args: str | Path, code: int = 0) -> list[dict[str, Any]]:
    result: subprocess.CompletedProcess[str] = run_cli(
        *args, "--json", state_dir=tmp / "state", cwd=tmp
    )
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    for event in events:
        EVENTS.validate(event)
    return events


def test_tokens_and_cost_per_step_and_per_run(tmp_path: Path, server: FakeLLM) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(workflow(server.url), encoding="utf-8")
    events = run_json(tmp_path, "run", wf)
    done = [e for e in events if e["type"] == "step.succeeded" and "[" in e["step"]]
    assert [e["tokens"] for e in done] == [15, 15, 15]
    assert done[0]["cost"] == pytest.approx((10 * 2.0 + 5 * 4.0) / 1e6)
    summary = events[-1]
    assert summary["tokens"] == 45
    assert summary["cost"] == pytest.approx(3 * 40 / 1e6)
    shown = run_cli("show", summary["run_id"], "--json", state_dir=tmp_path / "state")
    item = next(s for s in json.loads(shown.stdout)["steps"] if s["id"] == "chapters[0]")
    assert (item["usage"]["tokens"], item["usage"]["calls"]) == (15, 1)


def test_a_run_budget_stops_the_run_and_a_raised_one_resumes_it(
    tmp_path: Path, server: FakeLLM
) -> None:
    wf = tmp_path / "wf.yaml"
    # Each call reserves its prompt (19 tokens) and its max_tokens (5) and uses 15:
    # after two calls, 30 + 24 would cross 45.
    wf.write_text(workflow(server.url, budget="budget: {tokens: 45}", max_tokens=5),
                  encoding="utf-8")
    before = len(server.requests)
    events = run_json(tmp_path, "run", wf, code=1)
    run_id = events[0]["run_id"]
    failed = [e for e in events if e["type"] == "step.failed"]
    assert failed[0]["step"] == "chapters[2]"
    assert failed[0]["error"]["class"] == "budget_exceeded"
    assert "budget of 45 tokens" in failed[0]["error"]["message"]
    assert not any(e["type"] == "step.retrying" for e in events)  # not retried
    assert len(server.requests) - before == 2  # the third call was never made

    resumed = run_json(tmp_path, "resume", run_id, "--set", "budget.tokens=100")
    assert resumed[-1]["status"] == "succeeded"
    assert len(server.requests) - before == 3  # only the missing chapter was called
    assert resumed[-1]["tokens"] == 45  # the run's total, both processes


def test_a_step_budget(tmp_path: Path, server: FakeLLM) -> None:
    text = workflow(server.url).replace(
        "    agent: writer\n", "    agent: writer\n    budget: {tokens: 1}\n"
    )
    wf = tmp_path / "wf.yaml"
    wf.write_text(text, encoding="utf-8")
    events = run_json(tmp_path, "run", wf, code=1)
    failed = [e for e in events if e["type"] == "step.failed" and "[" in e["step"]]
    assert {e["error"]["class"] for e in failed} == {"budget_exceeded"}
    assert "step's budget of 1 tokens" in failed[0]["error"]["message"]


def test_identical_calls_are_served_from_the_cache(tmp_path: Path, server: FakeLLM) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(workflow(server.url, temperature=0, items=2), encoding="utf-8")
    run_json(tmp_path, "run", wf)
    before = len(server.requests)
    events = run_json(tmp_path, "run", wf)
    assert len(server.requests) == before  # every call was a cache hit
    assert events[-1]["status"] == "succeeded"
    run_json(tmp_path, "run", wf, "--no-cache")
    assert len(server.requests) == before + 2


def test_a_pool_with_a_token_limit_waits_for_the_minute_to_refill() -> None:
    now = [0.0]
    ready: list[int] = []
    pools = Pools(
        {"llm": PoolSpec(name="llm", tokens_per_s=60 / 60)},  # 60 tokens a minute
        monotonic=lambda: now[0],
        on_ready=lambda: ready.append(1),
    )
    pool = pools.get("llm")
    assert pool is not None
    assert pools.admits_now(pool)
    pools.spend(pool, 90)  # one call reported 90 tokens: 30 over the minute's 60
    assert not pools.admits_now(pool)
    assert pool.wait_s(now[0], True) == pytest.approx(31.0)  # back to one token
    now[0] = 31.0
    assert pools.admits_now(pool)
