"""The ``llm`` agent against a real local HTTP server (tests/llm_server.py).

Every test talks HTTP to `FakeLLM` on 127.0.0.1 with a fresh agent that is closed
afterwards; the server's scripted replies stand in for OpenAI, Ollama or llama.cpp
quirks. The last test drives `storyflow run` in a subprocess end to end.
"""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from llm_server import FakeLLM, Reply, error, ok, raw
from storyflow.agents import registry
from storyflow.agents.base import Call
from storyflow.agents.llm_agent import BASE_URL_ENV, LlmAgent
from storyflow.errors import InvalidOutput, PermanentError, StepFailure, TransientError

KEY = "sk-test-0123456789abcdefSECRET"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title"],
    "properties": {"title": {"type": "string"}},
}


class DictCache:
    """A CallCache over a dict."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> tuple[bool, Any]:
        return (key in self.data, self.data.get(key))

    def put(self, key: str, value: Any) -> None:
        self.data[key] = json.loads(json.dumps(value))


@dataclass
class Outcome:
    """What one call did: its output or failure, its log lines and usage reports."""

    output: Any = None
    error: StepFailure | None = None
    logs: list[str] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shown(self) -> str:
        """Everything a user could see of the call, as one string."""
        err = self.error
        parts = [json.dumps(self.output), *self.logs]
        if err is not None:
            parts += [str(err), err.message, err.hint or ""]
        return "\n".join(parts)


def make_call(inputs: dict[str, Any], outcome: Outcome, *, schema: dict[str, Any] | None = None,
              secrets: dict[str, str] | None = None, timeout_s: float | None = None,
              cache: DictCache | None = None) -> Call:
    return Call(
        run_id="run-1", step_id="write", attempt=1, inputs=inputs,
        workflow_dir=Path("."), run_dir=Path("run"), secrets=secrets or {},
        timeout_s=timeout_s, output_schema=schema, log=outcome.logs.append,
        meter=outcome.usage.append, cache=cache,
    )


def ask_all(*calls: dict[str, Any], agent: LlmAgent | None = None) -> list[Outcome]:
    """Run calls (keyword arguments of `make_call`) in order on one fresh agent."""
    the_agent = agent or LlmAgent()

    async def go() -> list[Outcome]:
        outcomes = []
        try:
            for kw in calls:
                outcome = Outcome()
                try:
                    outcome.output = await the_agent.run(make_call(outcome=outcome, **kw))
                except StepFailure as exc:
                    outcome.error = exc
                outcomes.append(outcome)
        finally:
            await the_agent.aclose()
        return outcomes

    return asyncio.run(go())


def ask(inputs: dict[str, Any], **kw: Any) -> Outcome:
    agent = kw.pop("agent", None)
    return ask_all({"inputs": inputs, **kw}, agent=agent)[0]


@pytest.fixture
def server() -> Iterator[FakeLLM]:
    with FakeLLM() as s:
        yield s


def with_(server: FakeLLM, **extra: Any) -> dict[str, Any]:
    return {"base_url": server.url, "model": "m", "prompt": "Write a title", **extra}


# --- success ---------------------------------------------------------------------------------


def test_reply_text_is_the_output_and_usage_is_metered(server: FakeLLM) -> None:
    server.push(ok("Tide and Lamp", usage=(12, 4)))
    out = ask(with_(server, system="You are terse.", temperature=0.5, max_tokens=50,
                    params={"top_p": 0.9}))
    assert out.error is None and out.output == "Tide and Lamp"
    assert out.usage == [{"model": "m", "input_tokens": 12, "output_tokens": 4,
                          "cached": False, "truncated": False}]
    (req,) = server.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.body == {
        "model": "m", "temperature": 0.5, "max_tokens": 50, "top_p": 0.9,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Write a title"}],
        "stream": True, "stream_options": {"include_usage": True},
    }
    assert "authorization" not in req.headers  # no key, no header: local servers need none


def test_messages_come_after_system_and_before_the_prompt(server: FakeLLM) -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ask(with_(server, system="S", messages=history))
    assert server.requests[0].body["messages"] == [
        {"role": "system", "content": "S"}, *history,
        {"role": "user", "content": "Write a title"}]


def test_no_usage_block_reports_unknown_tokens(server: FakeLLM) -> None:
    server.push(ok("x", usage=None))
    out = ask(with_(server, stream=False))  # a stream without usage is estimated instead
    assert out.output == "x"
    assert out.usage == [{"model": "m", "input_tokens": None, "output_tokens": None,
                          "cached": False, "truncated": False}]


def test_truncated_reply_is_metered_and_warned(server: FakeLLM) -> None:
    server.push(ok("Once upon a", finish_reason="length"))
    out = ask(with_(server, max_tokens=3))
    assert out.output == "Once upon a"
    assert out.usage[0]["truncated"] is True
    assert any(line.startswith("warning: the reply was truncated at max_tokens (3)")
               for line in out.logs)


# --- the key ------------------------------------------------------------------------------------


def test_key_goes_in_the_header_and_nowhere_else(server: FakeLLM) -> None:
    server.push(ok("fine"), error(401, f"Incorrect API key provided: {KEY}."),
                ok("x", finish_reason="length"))
    secrets = {"OPENAI_API_KEY": KEY}
    good, bad, warned = ask_all(*({"inputs": with_(server), "secrets": secrets},) * 3)
    assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {KEY}"] * 3
    assert good.output == "fine"
    assert isinstance(bad.error, PermanentError)
    assert "HTTP 401" in bad.error.message and "Incorrect API key provided: ***" in str(bad.error)
    assert bad.error.hint == "check the API key in secret OPENAI_API_KEY"
    assert warned.logs
    for outcome in (good, bad, warned):
        assert KEY not in outcome.shown and KEY not in repr(outcome.error)


def test_key_from_a_named_secret(server: FakeLLM) -> None:
    ask(with_(server, api_key_secret="MY_KEY"), secrets={"MY_KEY": KEY})
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    out = ask(with_(server, api_key_secret="OTHER"), secrets={"MY_KEY": KEY})
    assert isinstance(out.error, PermanentError) and out.error.hint is not None
    assert "secrets: [OTHER]" in out.error.hint


def test_401_without_a_key_says_to_declare_the_secret(server: FakeLLM) -> None:
    server.push(error(401, "missing key"))
    out = ask(with_(server))
    assert isinstance(out.error, PermanentError)
    assert out.error.hint == "no API key was sent: declare `secrets: [OPENAI_API_KEY]` on the agent"


# --- failures ---------------------------------------------------------------------------------


def test_429_with_retry_after_seconds_is_transient(server: FakeLLM) -> None:
    server.push(error(429, "Rate limit reached", headers={"Retry-After": "7"}))
    out = ask(with_(server))
    assert isinstance(out.error, TransientError)
    assert out.error.retry_after_s == 7.0
    assert out.error.message == "the LLM server answered HTTP 429: Rate limit reached"
    assert out.usage == []


def test_retry_after_as_an_http_date(server: FakeLLM) -> None:
    now = 1_700_000_000.0
    server.push(error(503, "busy", headers={"Retry-After": formatdate(now + 30, usegmt=True)}),
                error(429, "slow", headers={"retry-after-ms": "1500", "Retry-After": "2"}))
    first, second = ask_all(*({"inputs": with_(server)},) * 2, agent=LlmAgent(clock=lambda: now))
    assert isinstance(first.error, TransientError) and first.error.retry_after_s == 30.0
    assert isinstance(second.error, TransientError) and second.error.retry_after_s == 1.5


@pytest.mark.parametrize("status", [408, 500, 502, 503])
def test_server_errors_are_transient(server: FakeLLM, status: int) -> None:
    server.push(error(status, "oops"))
    out = ask(with_(server))
    assert isinstance(out.error, TransientError) and out.error.retry_after_s is None
    assert f"HTTP {status}: oops" in out.error.message


def test_404_is_permanent_with_the_servers_words(server: FakeLLM) -> None:
    server.push(error(404, "The model `m` does not exist"))
    out = ask(with_(server))
    assert isinstance(out.error, PermanentError) and out.error.hint is not None
    assert out.error.message == "the LLM server answered HTTP 404: The model `m` does not exist"
    assert "base_url" in out.error.hint


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"object": "chat.completion"}', b'{"choices": []}'])
def test_malformed_envelope_is_transient(server: FakeLLM, body: bytes) -> None:
    server.push(raw(body))
    out = ask(with_(server))
    assert isinstance(out.error, TransientError)
    assert "not a chat completion" in out.error.message


def test_slow_reply_times_out_as_transient(server: FakeLLM) -> None:
    server.push(ok("late", delay_s=1.0))
    out = ask(with_(server, timeout=0.1))
    assert isinstance(out.error, TransientError)
    assert "within 0.1s" in out.error.message


def test_hang_up_and_refused_connection_are_transient(server: FakeLLM) -> None:
    server.push(Reply(hang_up=True))
    assert isinstance(ask(with_(server)).error, TransientError)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        out = ask(with_(server, base_url=f"http://127.0.0.1:{port}/v1"))
    assert isinstance(out.error, TransientError)
    assert "cannot reach the LLM server" in out.error.message


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("temprature", "did you mean 'temperature'? (other request fields go in `with.params`)"),
        ("top_p", "other request fields go in `with.params`"),
        ("api_key", "the key comes only from the agent's secrets: declare "
                    "`secrets: [OPENAI_API_KEY]`, or name another with api_key_secret"),
    ],
)
def test_unknown_key_is_an_error_with_a_hint(server: FakeLLM, key: str, hint: str) -> None:
    out = ask(with_(server, **{key: KEY}))
    assert isinstance(out.error, PermanentError)
    assert (out.error.message, out.error.hint) == (f"the llm agent has no `with.{key}`", hint)
    assert server.requests == []


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"prompt": "x"}, "the llm agent needs `with.model`"),
        ({"model": "m"}, "the llm agent needs a `prompt` or `with.messages`"),
        ({"model": "m", "prompt": "x", "temperature": "hot"}, "`with.temperature` must be"),
        ({"model": "m", "prompt": "x", "params": {"stream": True}}, "`with.params.stream`"),
        ({"model": "m", "prompt": "x", "base_url": "localhost:1"}, "`with.base_url` must be"),
    ],
)
def test_bad_settings_are_permanent(inputs: dict[str, Any], message: str) -> None:
    out = ask(inputs)
    assert isinstance(out.error, PermanentError) and out.error.message.startswith(message)


# --- structured output ----------------------------------------------------------------------


def test_schema_asks_for_json_and_parses_the_reply(server: FakeLLM) -> None:
    server.push(ok('```json\n{"title": "Tide"}\n```'))
    out = ask(with_(server, system="Be brief."), schema=SCHEMA)
    assert out.output == {"title": "Tide"}
    body = server.requests[0].body
    assert body["response_format"] == {"type": "json_object"}
    system = body["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\nReply with")
    assert json.dumps(SCHEMA) in system["content"]


def test_schema_instruction_joins_a_leading_system_message(server: FakeLLM) -> None:
    server.push(ok('{"title": "T"}'))
    given = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ask({"base_url": server.url, "model": "m", "messages": given}, schema=SCHEMA)
    system, user = server.requests[0].body["messages"]
    assert system["content"].startswith("S\n\nReply with one JSON object") and user == given[1]


def test_response_format_from_params_wins(server: FakeLLM) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    server.push(ok('{"title": "T"}'))
    ask(with_(server, params={"response_format": fmt}), schema=SCHEMA)
    assert server.requests[0].body["response_format"] == fmt


def test_schema_violation_is_repaired_with_the_error_fed_back(server: FakeLLM) -> None:
    server.push(ok('{"title": 3}', usage=(20, 5)), ok('{"title": "Tide"}', usage=(40, 6)))
    out = ask(with_(server), schema=SCHEMA)
    assert out.error is None and out.output == {"title": "Tide"}
    assert [u["input_tokens"] for u in out.usage] == [20, 40]
    first, second = (r.body["messages"] for r in server.requests)
    assert second[: len(first)] == first
    assert second[-2] == {"role": "assistant", "content": '{"title": 3}'}
    assert second[-1]["role"] == "user"
    assert "3 is not of type 'string' at $.title" in second[-1]["content"]
    assert any("asking for a correction (1/2)" in line for line in out.logs)


def test_repairs_exhausted_is_invalid_output(server: FakeLLM) -> None:
    server.push(ok("no json here"), ok("{}"))
    out = ask(with_(server, repair_attempts=1), schema=SCHEMA)
    assert isinstance(out.error, InvalidOutput)
    assert out.error.message == (
        "the reply does not match output_schema after 1 repair(s): "
        "'title' is a required property at $")
    assert len(server.requests) == 2
    assert "it is not valid JSON" in server.requests[1].body["messages"][-1]["content"]


def test_rejected_response_format_falls_back_and_is_remembered() -> None:
    with FakeLLM(ok('{"title": "T"}'), reject_response_format=True) as server:
        first, second = ask_all(*({"inputs": with_(server), "schema": SCHEMA},) * 2)
        assert first.output == second.output == {"title": "T"}
        sent = ["response_format" in r.body for r in server.requests]
    assert sent == [True, False, False]  # one 400, then never again for this base URL
    assert any("does not support response_format" in line for line in first.logs)
    assert len(first.usage) == 1  # the 400 was no completion


def test_json_mode_false_sends_no_response_format(server: FakeLLM) -> None:
    server.push(ok('{"title": "T"}'))
    assert ask(with_(server, json_mode=False), schema=SCHEMA).output == {"title": "T"}
    assert "response_format" not in server.requests[0].body


# --- the call cache ---------------------------------------------------------------------------


def test_cache_hit_skips_http_and_meters_cached_tokens(server: FakeLLM) -> None:
    cache = DictCache()
    server.push(ok('{"title": 3}', usage=(20, 5)), ok('{"title": "Tide"}', usage=(40, 6)))
    call = {"inputs": with_(server, temperature=0), "schema": SCHEMA, "cache": cache}
    first, second = ask_all(call, call)
    assert first.output == second.output == {"title": "Tide"}
    assert len(server.requests) == 2  # the first call and its repair; the second hit
    assert second.usage == [{"model": "m", "input_tokens": 60, "output_tokens": 11,
                             "cached": True, "truncated": False}]
    (stored,) = cache.data.values()
    assert stored["output"] == {"title": "Tide"}


def test_cache_key_covers_sample_and_settings(server: FakeLLM) -> None:
    cache = DictCache()
    base = with_(server, seed=1)
    calls = [base, base, {**base, "sample": 1}, {**base, "temperature": 0.2}, {**base, "seed": 2}]
    ask_all(*({"inputs": c, "cache": cache} for c in calls))
    assert len(server.requests) == 4 and len(cache.data) == 4


@pytest.mark.parametrize(
    ("extra", "cached"),
    [({"temperature": 0.7}, False), ({"temperature": 0, "cache": False}, False),
     ({"temperature": 0.7, "cache": True}, True), ({}, False)],
)
def test_cache_is_on_for_deterministic_calls_or_when_asked(
    server: FakeLLM, extra: dict[str, Any], cached: bool
) -> None:
    cache = DictCache()
    ask_all(*({"inputs": with_(server, **extra), "cache": cache},) * 2)
    assert len(server.requests) == (1 if cached else 2)
    assert bool(cache.data) is cached


def test_failed_calls_are_not_cached(server: FakeLLM) -> None:
    cache = DictCache()
    server.push(error(500, "down"))
    first, second = ask_all(*({"inputs": with_(server, temperature=0), "cache": cache},) * 2)
    assert isinstance(first.error, TransientError) and second.output == "hello"
    assert len(server.requests) == 2


# --- settings from the environment, clients -------------------------------------------------


def test_base_url_from_the_environment(server: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BASE_URL_ENV, server.url + "/")
    assert ask({"model": "m", "prompt": "hi"}).output == "hello"
    assert server.requests[0].path == "/v1/chat/completions"


def test_clients_close_when_the_loop_shuts_down(server: FakeLLM) -> None:
    agent = LlmAgent()

    async def go() -> Any:
        await agent.run(make_call(with_(server), Outcome()))
        return agent._loops[asyncio.get_running_loop()].pools[server.url].client()

    clients = [asyncio.run(go()) for _ in range(2)]  # no aclose(): asyncio.run closes them
    assert clients[0] is not clients[1] and all(c.is_closed for c in clients)


def test_registry_serves_the_llm_kind() -> None:
    registry.reset()
    try:
        assert isinstance(registry.get("llm"), LlmAgent)
    finally:
        registry.reset()


# --- end to end through the CLI ---------------------------------------------------------------


def test_storyflow_run_with_an_llm_step(server: FakeLLM, tmp_path: Path) -> None:
    server.push(ok("A lamp in the tide"))
    workflow = tmp_path / "llm.yaml"
    workflow.write_text(textwrap.dedent(f"""\
        apiVersion: storyflow/v1
        name: llm-e2e
        agents:
          writer:
            uses: llm
            with: {{base_url: "{server.url}", model: m}}
            secrets: [OPENAI_API_KEY]
        steps:
          title: {{agent: writer, prompt: "A title for {{{{ inputs.premise }}}}"}}
        inputs:
          premise: {{type: string, default: a lighthouse}}
        outputs:
          title: "{{{{ steps.title.output }}}}"
        """), encoding="utf-8")
    state = tmp_path / "state"
    result = run_cli("run", workflow, "--json", state_dir=state, cwd=tmp_path,
                     env={"OPENAI_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    assert summary["outputs"] == {"title": "A lamp in the tide"}
    (req,) = server.requests
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.body["messages"] == [{"role": "user", "content": "A title for a lighthouse"}]
    assert KEY not in result.stdout + result.stderr
    files = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name == "events.jsonl" for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    run_id = summary["run_id"]
    for fmt in ("json", "html", "junit", "table"):
        report = run_cli("report", run_id, "--format", fmt, state_dir=state, cwd=tmp_path)
        assert report.returncode == 0, report.stderr
        assert KEY not in report.stdout + report.stderr, fmt
    shown = run_cli("show", run_id, "--json", state_dir=state, cwd=tmp_path)
    assert KEY not in shown.stdout
