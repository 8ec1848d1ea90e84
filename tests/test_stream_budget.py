"""A stream cut short is paid for: its tokens count against the budgets.

A real provider bills the prompt and every token it streamed, whether or not the reply
reached its end. The ``llm`` agent counts what arrived of a stream that is cut (the
connection closed before ``[DONE]``), goes silent past ``idle_timeout`` or is stopped
by the step's timeout: the prompt and the received text at 4 UTF-8 bytes a token,
metered ``estimated``. So the retries of a stream that keeps failing stop at the budget
(``budget_exceeded``) instead of running on for free.

Each test drives ``storyflow run`` in a subprocess against the fake OpenAI-compatible
server of `llm_server`, which cuts (or stalls) every stream after a few chunks.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llm_server import FakeLLM, Reply, ok, pieces
from storyflow.agents.llm_agent._request import canonical, prompt_tokens, text_tokens

PROSE = "The keeper climbed the stairs and lit the lamp, and the sea answered."
MAX_TOKENS = 20
ATTEMPTS = 12
BUDGET = 100


def flow(*, budget: int = BUDGET, extra: str = "", step: str = "") -> str:
    return textwrap.dedent(f"""\
        apiVersion: storyflow/v1
        name: cut-budget
        agents:
          writer: {{uses: llm, with: {{model: m, max_tokens: {MAX_TOKENS}{extra}}}}}
        steps:
          title:
            agent: writer
            prompt: "A title for the lighthouse"
            budget: {{tokens: {budget}}}
            retry: {{attempts: {ATTEMPTS}, delay: 0}}
        """) + textwrap.indent(step, "    ")


def events_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def calls_allowed(per_attempt: int, reserve: int, budget: int) -> int:
    """How many attempts the budget lets through when each spends ``per_attempt`` and
    asks for ``reserve`` before it is sent."""
    spent = calls = 0
    while calls < ATTEMPTS and spent + reserve <= budget:
        spent += per_attempt
        calls += 1
    return calls


def run_flow(cli: Callable[..., Any], tmp_path: Path, server: FakeLLM,
             text: str) -> tuple[Any, list[dict[str, Any]]]:
    path = tmp_path / "flow.yaml"
    path.write_text(text, encoding="utf-8")
    result = cli("run", path, "--json", env={"STORYFLOW_LLM_BASE_URL": server.url})
    assert "Traceback" not in result.stderr, result.stderr
    return result, events_of(result.stdout)


@pytest.mark.parametrize(
    ("reply", "extra", "retried_as"),
    [
        (ok(PROSE, cut_after=3), "", "transient"),
        (ok(PROSE, idle_after=3), ", idle_timeout: 0.2", "timeout"),
    ],
    ids=["cut", "silent"],
)
def test_retries_of_a_failing_stream_stop_at_the_step_budget(
    cli: Callable[..., Any], tmp_path: Path, state_dir: Path, reply: Reply, extra: str,
    retried_as: str,
) -> None:
    with FakeLLM(reply) as server:
        result, events = run_flow(cli, tmp_path, server, flow(extra=extra))
        requests = list(server.requests)
    assert result.returncode == 1, result.stdout[-2000:]
    messages = requests[0].body["messages"]
    received = "".join(pieces(reply)[:3])
    per_attempt = text_tokens(canonical(messages)) + text_tokens(received)
    calls = calls_allowed(per_attempt, prompt_tokens(messages) + MAX_TOKENS, BUDGET)
    assert 1 < calls < ATTEMPTS  # the budget, not the retry policy, ends the step
    assert len(requests) == calls

    retrying = [e for e in events if e["type"] == "step.retrying"]
    assert [e["error"]["class"] for e in retrying] == [retried_as] * calls
    assert [e.get("tokens") for e in retrying] == [
        per_attempt * n for n in range(1, calls + 1)]  # each failed attempt is charged
    (failed,) = [e for e in events if e["type"] == "step.failed"]
    assert failed["error"]["class"] == "budget_exceeded"
    assert f"the step's budget of {BUDGET} tokens could be exceeded: " \
        f"{per_attempt * calls} used" in failed["error"]["message"]
    summary = events[-1]
    assert summary["status"] == "failed" and summary["tokens"] == per_attempt * calls

    show = json.loads(cli("show", summary["run_id"], "--json").stdout)
    (step,) = show["steps"]
    assert step["usage"] == {
        "input_tokens": text_tokens(canonical(messages)) * calls,
        "output_tokens": text_tokens(received) * calls,
        "tokens": per_attempt * calls, "cost": 0.0, "calls": calls, "cached_calls": 0,
        "priced": False, "estimated": True,
    }
    report = json.loads(cli("report", summary["run_id"], "--format", "json").stdout)
    assert report["budgets"] == [{"scope": "title", "tokens": BUDGET,
                                  "cost": None, "spent_tokens": per_attempt * calls,
                                  "spent_cost": 0.0, "priced": False}]
    assert report["totals"]["tokens"] == per_attempt * calls
    assert report["totals"]["model_calls"] == calls


def test_a_cut_stream_that_ends_well_on_retry_counts_both_attempts(
    cli: Callable[..., Any], tmp_path: Path,
) -> None:
    with FakeLLM() as server:
        server.push(ok(PROSE, cut_after=2), ok("A lamp in the tide", usage=(7, 5)))
        result, events = run_flow(cli, tmp_path, server, flow(budget=1000))
        messages = server.requests[0].body["messages"]
    assert result.returncode == 0, result.stdout[-2000:]
    cut = text_tokens(canonical(messages)) + text_tokens("The keeper ")
    summary = events[-1]
    assert summary["status"] == "succeeded" and summary["tokens"] == cut + 12
    (retrying,) = [e for e in events if e["type"] == "step.retrying"]
    assert retrying["tokens"] == cut
    step = json.loads(cli("show", summary["run_id"], "--json").stdout)["steps"][0]
    assert step["usage"]["calls"] == 2 and step["usage"]["estimated"] is True


def test_a_stream_stopped_by_the_step_timeout_is_charged_too(
    cli: Callable[..., Any], tmp_path: Path,
) -> None:
    slow = ok(PROSE, chunk_delay_s=0.15)
    with FakeLLM(slow) as server:
        result, events = run_flow(cli, tmp_path, server,
                                  flow(budget=120, step="timeout: 0.5s\n"))
        requests = len(server.requests)
    assert result.returncode == 1, result.stdout[-2000:]
    retrying = [e for e in events if e["type"] == "step.retrying"]
    assert retrying and {e["error"]["class"] for e in retrying} == {"timeout"}
    (failed,) = [e for e in events if e["type"] == "step.failed"]
    assert failed["error"]["class"] == "budget_exceeded"
    assert requests == len(retrying) < ATTEMPTS  # the next attempt was never sent
    spent = [e["tokens"] for e in retrying]
    assert spent == sorted(spent) and spent[0] > 0
