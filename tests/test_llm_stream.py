"""The ``llm`` agent's streamed replies, against the real fake server (tests/llm_server.py).

Each test talks HTTP to `FakeLLM` on 127.0.0.1: Server-Sent Events in pieces, servers
that do not stream (or reject ``stream_options``), streams cut half way or gone silent.
The event reader is also tested on its own (`Events`), fed bytes split anywhere. The last
test drives ``storyflow run`` and its retry policy through the CLI.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llm_server import FakeLLM, Reply, StreamMode, error, ok, sse
from storyflow.agents.base import Call
from storyflow.agents.llm_agent import LlmAgent
from storyflow.agents.llm_agent._request import canonical, text_tokens
from storyflow.agents.llm_agent._stream import Events
from storyflow.errors import (
    BudgetExceeded,
    InvalidOutput,
    PermanentError,
    StepFailure,
    StepTimeout,
    TransientError,
)
from storyflow.events import ErrorClass

SCHEMA: dict[str, Any] = {"type": "object", "required": ["title"],
                          "properties": {"title": {"type": "string"}}}
PROSE = "The keeper climbed the stairs and lit the lamp, and the sea answered."


class DictCache:
    """A CallCache over a dict (values copied through JSON, as a store would)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> tuple[bool, Any]:
        return (key in self.data, self.data.get(key))

    def put(self, key: str, value: Any) -> None:
        self.data[key] = json.loads(json.dumps(value))


@dataclass
class Outcome:
    """What one call did, and when: its output or failure, logs, usage and deltas."""

    output: Any = None
    error: StepFailure | None = None
    logs: list[str] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)
    deltas: list[tuple[float, str]] = field(default_factory=list)
    """(monotonic time, text) of each `Call.delta`."""
    returned: float = 0.0
    """Monotonic time the call returned (or failed)."""
    steps: list[str] = field(default_factory=list)
    """``reserve``, ``meter`` and ``release``, in the order the agent called them."""

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.deltas)

    def delta(self, text: str) -> None:
        asyncio.get_running_loop()  # on the event loop, or this raises
        self.deltas.append((time.monotonic(), text))

    def meter(self, usage: dict[str, Any]) -> None:
        self.steps.append("meter")
        self.usage.append(usage)


def make_call(inputs: dict[str, Any], outcome: Outcome, *, schema: dict[str, Any] | None = None,
              cache: DictCache | None = None, refuse: bool = False) -> Call:
    async def reserve(estimate: dict[str, Any]) -> Callable[[], None]:
        outcome.steps.append("reserve")
        if refuse:
            raise BudgetExceeded("the run's budget of 10 tokens could be exceeded")
        return lambda: outcome.steps.append("release")

    return Call(
        run_id="run-1", step_id="write", attempt=1, inputs=inputs, workflow_dir=Path("."),
        run_dir=Path("run"), secrets={}, timeout_s=None, output_schema=schema,
        log=outcome.logs.append, meter=outcome.meter, cache=cache, delta=outcome.delta,
        reserve=reserve,
    )


def ask_all(*calls: dict[str, Any], step_timeout_s: float | None = None) -> list[Outcome]:
    """Run calls (keyword arguments of `make_call`) in order on one agent, each within
    ``step_timeout_s`` as the engine would (`asyncio.wait_for`)."""
    the_agent = LlmAgent()

    async def go() -> list[Outcome]:
        outcomes = []
        try:
            for kw in calls:
                outcome = Outcome()
                try:
                    outcome.output = await asyncio.wait_for(
                        the_agent.run(make_call(outcome=outcome, **kw)), step_timeout_s)
                except StepFailure as exc:
                    outcome.error = exc
                outcome.returned = time.monotonic()
                outcomes.append(outcome)
        finally:
            await the_agent.aclose()
        return outcomes

    return asyncio.run(go())


def ask(inputs: dict[str, Any], **kw: Any) -> Outcome:
    return ask_all({"inputs": inputs, **kw})[0]


@pytest.fixture
def server() -> Iterator[FakeLLM]:
    with FakeLLM() as s:
        yield s


def with_(server: FakeLLM, **extra: Any) -> dict[str, Any]:
    return {"base_url": server.url, "model": "m", "prompt": "Write a title", **extra}


def streamed(server: FakeLLM) -> list[Any]:
    """What each request asked: True (stream, with usage), "no usage" or False."""
    return [r.body.get("stream") is True and (
        r.body.get("stream_options") == {"include_usage": True} or "no usage")
        for r in server.requests]


def _body(*texts: str, usage: tuple[int, int] = (9, 4)) -> bytes:
    """An OpenAI-style event stream of ``texts``."""
    lines: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
        for t in texts]
    lines.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    lines.append({"choices": [], "usage": {"prompt_tokens": usage[0],
                                           "completion_tokens": usage[1]}})
    return b"".join(b"data: " + json.dumps(x).encode() + b"\n\n" for x in lines) + \
        b"data: [DONE]\n\n"


# --- text as it arrives, usage --------------------------------------------------------------


def test_text_arrives_through_delta_before_the_reply_ends(server: FakeLLM) -> None:
    server.push(ok(PROSE, chunk_size=2, chunk_delay_s=0.02, usage=(12, 15)))
    out = ask(with_(server))
    assert out.error is None and out.output == PROSE
    assert out.text == PROSE and len(out.deltas) == 7  # 13 words, 2 a chunk
    times = [t for t, _ in out.deltas]
    assert times == sorted(times) and times[0] < times[-1] < out.returned
    assert out.usage == [{"model": "m", "input_tokens": 12, "output_tokens": 15,
                          "cached": False, "truncated": False}]
    (req,) = server.requests
    assert req.body["stream"] is True and req.body["stream_options"] == {"include_usage": True}


def test_stream_false_asks_for_one_body_and_sends_no_delta(server: FakeLLM) -> None:
    out = ask(with_(server, stream=False))
    assert out.output == "hello" and out.deltas == [] and streamed(server) == [False]
    assert "stream_options" not in server.requests[0].body


def test_a_stream_without_usage_is_metered_as_estimated(server: FakeLLM) -> None:
    server.push(ok(PROSE, usage=None))
    out = ask(with_(server, system="Be brief."))
    messages = server.requests[0].body["messages"]
    assert out.output == PROSE
    assert out.usage == [{"model": "m", "input_tokens": text_tokens(canonical(messages)),
                          "output_tokens": text_tokens(PROSE), "cached": False,
                          "truncated": False, "estimated": True}]
    assert text_tokens(PROSE) == 18  # 69 bytes at 4 a token


def test_finish_reason_comes_from_the_last_choice_chunk(server: FakeLLM) -> None:
    server.push(ok("Once upon a", finish_reason="length"))
    out = ask(with_(server, max_tokens=3))
    assert out.output == "Once upon a" and out.usage[0]["truncated"] is True
    assert any(line.startswith("warning: the reply was truncated at max_tokens (3)")
               for line in out.logs)


def test_a_raw_stream_with_comments_and_crlf(server: FakeLLM) -> None:
    body = b": keep-alive\n\nevent: message\n" + _body("Tide", usage=(3, 1))
    server.push(Reply(body=body.replace(b"\n", b"\r\n"), content_type="text/event-stream"))
    out = ask(with_(server))
    assert out.output == "Tide" and out.text == "Tide"
    assert (out.usage[0]["input_tokens"], out.usage[0]["output_tokens"]) == (3, 1)


# --- servers that do not stream ---------------------------------------------------------------


def test_a_server_that_ignores_stream_is_taken_at_its_word_and_remembered() -> None:
    with FakeLLM(ok("hello", usage=(10, 5)), stream_mode="ignore") as server:
        first, second = ask_all(*({"inputs": with_(server)},) * 2)
        assert streamed(server) == [True, False]  # the second call asks for one body at once
    assert first.output == second.output == "hello"
    assert first.deltas == second.deltas == []
    assert first.usage == second.usage == [{"model": "m", "input_tokens": 10,
                                            "output_tokens": 5, "cached": False,
                                            "truncated": False}]
    assert any("answered without streaming" in line for line in first.logs)
    assert second.logs == []


def test_a_server_that_rejects_stream_is_asked_again_and_remembered() -> None:
    with FakeLLM(stream_mode="reject") as server:
        first, second = ask_all(*({"inputs": with_(server)},) * 2)
        assert streamed(server) == [True, False, False]  # one 400, then never again
    assert first.output == second.output == "hello"
    assert len(first.usage) == 1 and first.steps == ["reserve", "meter", "release"]
    assert any("does not support streaming" in line for line in first.logs)


def test_a_server_that_rejects_stream_options_streams_without_them() -> None:
    with FakeLLM(ok(PROSE, usage=(10, 5)), stream_mode="reject_options") as server:
        first, second = ask_all(*({"inputs": with_(server)},) * 2)
        assert streamed(server) == [True, "no usage", "no usage"]
    assert first.output == second.output == PROSE and second.text == PROSE
    assert second.usage[0]["estimated"] is True  # no include_usage: no usage chunk
    assert any("does not support stream_options" in line for line in first.logs)


def test_quirks_are_remembered_per_base_url() -> None:
    with FakeLLM(stream_mode="reject") as plain, FakeLLM() as streaming:
        ask_all({"inputs": with_(plain)}, {"inputs": with_(streaming)})
        assert streamed(plain) == [True, False] and streamed(streaming) == [True]


@pytest.mark.parametrize(("no_json_mode", "mode"),
                         [(True, "sse"), (False, "reject"), (False, "reject_options")])
def test_calls_in_flight_when_a_quirk_is_found_all_succeed(no_json_mode: bool,
                                                           mode: StreamMode) -> None:
    """Each call retries without what *it* asked for, though a call beside it already
    found the feature missing (and the agent's record says so)."""
    reply = ok('{"title": "T"}', delay_s=0.05)
    with FakeLLM(reply, reject_response_format=no_json_mode, stream_mode=mode) as server:
        agent = LlmAgent()

        async def go() -> list[Any]:
            try:
                return await asyncio.gather(*(
                    agent.run(make_call(with_(server), Outcome(), schema=SCHEMA))
                    for _ in range(20)), return_exceptions=True)
            finally:
                await agent.aclose()

        outputs = asyncio.run(go())
    assert outputs == [{"title": "T"}] * 20
    assert len(server.requests) == 40  # each rejected once, then sent without


def test_a_400_about_something_else_is_permanent(server: FakeLLM) -> None:
    server.push(error(400, "Invalid 'messages': the upstream rejected it"))
    out = ask(with_(server))
    assert isinstance(out.error, PermanentError) and len(server.requests) == 1


# --- failures -------------------------------------------------------------------------------


def test_errors_before_the_stream_begins_are_classified_as_before(server: FakeLLM) -> None:
    server.push(error(429, "Rate limit reached", headers={"Retry-After": "7"}),
                error(404, "no such model"), ok("late", delay_s=1.0))
    rate, missing, late = ask_all({"inputs": with_(server)}, {"inputs": with_(server)},
                                  {"inputs": with_(server, timeout=0.1)})
    assert isinstance(rate.error, TransientError) and rate.error.retry_after_s == 7.0
    assert rate.error.message == "the LLM server answered HTTP 429: Rate limit reached"
    assert isinstance(missing.error, PermanentError)
    assert isinstance(late.error, TransientError) and "within 0.1s" in late.error.message
    assert rate.usage == missing.usage == late.usage == []


def test_a_stream_cut_half_way_is_transient(server: FakeLLM) -> None:
    server.push(ok(PROSE, cut_after=3))
    out = ask(with_(server))
    assert isinstance(out.error, TransientError)
    assert out.error.error_class is ErrorClass.TRANSIENT
    assert out.error.message.startswith(
        f"the stream from the LLM server at {server.url} was cut after 19 characters")
    assert out.text == "The keeper climbed "
    # No reply, but the prompt and the text that arrived were generated: they are billed.
    messages = server.requests[0].body["messages"]
    assert out.usage == [{"model": "m", "input_tokens": text_tokens(canonical(messages)),
                          "output_tokens": text_tokens("The keeper climbed "),
                          "cached": False, "truncated": False, "estimated": True}]
    assert out.steps == ["reserve", "meter", "release"]


def test_a_stream_that_fails_before_any_text_meters_nothing(server: FakeLLM) -> None:
    server.push(sse({"choices": [{"delta": {"role": "assistant"}}]}),  # cut: no text yet
                sse({"error": {"message": "overloaded"}}))
    cut, failed = ask_all({"inputs": with_(server)}, {"inputs": with_(server)})
    assert isinstance(cut.error, TransientError) and isinstance(failed.error, TransientError)
    assert cut.usage == failed.usage == []
    assert cut.steps == failed.steps == ["reserve", "release"]


@pytest.mark.parametrize(
    ("events", "message"),
    [
        (({"choices": [{"delta": {"content": "half"}}]},),
         "ended before the reply was complete (after 4 characters)"),
        (({"choices": [{"delta": {"content": "x"}}]}, b"{not json", b"[DONE]"),
         "sent a stream chunk that is not a chat completion chunk: {not json"),
        (({"choices": [{"delta": {"content": 3}}]}, b"[DONE]"),
         "not a chat completion chunk"),
        (({"error": {"message": "The server had an error while processing your request."}},),
         "failed mid-stream: The server had an error while processing your request."),
    ],
)
def test_broken_streams_are_transient(server: FakeLLM, events: tuple[Any, ...],
                                      message: str) -> None:
    server.push(sse(*events))
    out = ask(with_(server))
    assert isinstance(out.error, TransientError), out.error
    assert message in out.error.message


def test_a_refusal_in_a_stream_is_invalid_output(server: FakeLLM) -> None:
    server.push(sse({"choices": [{"delta": {"refusal": "I can't help with that."},
                                  "finish_reason": "stop"}]}, b"[DONE]"))
    out = ask(with_(server))
    assert isinstance(out.error, InvalidOutput)
    assert out.error.message == "the model refused: I can't help with that."


def test_a_silent_stream_is_a_timeout(server: FakeLLM) -> None:
    server.push(ok(PROSE, idle_after=2), ok("again"))
    silent, after = ask_all({"inputs": with_(server, idle_timeout=0.2)},
                            {"inputs": with_(server)},
                            step_timeout_s=10)  # not the idle watch: TimeoutError, no outcome
    assert isinstance(silent.error, StepTimeout)
    assert silent.error.error_class is ErrorClass.TIMEOUT
    assert silent.error.message == (f"the stream from the LLM server at {server.url} went "
                                    "silent for 0.2s after 11 characters")
    assert silent.error.hint is not None and "with.idle_timeout" in silent.error.hint
    assert silent.text == "The keeper "
    assert [(u["output_tokens"], u.get("estimated")) for u in silent.usage] == [
        (text_tokens("The keeper "), True)]  # what arrived before the silence is billed
    assert after.output == "again"  # the agent and its pool are fine afterwards


def test_the_idle_watch_is_per_chunk_not_per_reply(server: FakeLLM) -> None:
    server.push(ok(PROSE, chunk_size=1, chunk_delay_s=0.05))
    out = ask(with_(server, idle_timeout=0.3))  # 13 chunks over ~0.65 s, none 0.3 s apart
    assert out.error is None and out.output == PROSE


def test_the_step_timeout_still_cancels_a_stream(server: FakeLLM) -> None:
    server.push(ok(PROSE, idle_after=1))
    with pytest.raises(TimeoutError):  # the engine's wait_for, untouched by the idle watch
        ask_all({"inputs": with_(server)}, step_timeout_s=0.2)


def test_a_stream_the_step_timeout_stops_is_metered_for_what_arrived(server: FakeLLM) -> None:
    server.push(ok(PROSE, idle_after=2))
    outcome = Outcome()
    agent = LlmAgent()

    async def go() -> None:
        try:
            await asyncio.wait_for(agent.run(make_call(with_(server), outcome)), 0.3)
        finally:
            await agent.aclose()

    with pytest.raises(TimeoutError):
        asyncio.run(go())
    assert outcome.text == "The keeper "
    messages = server.requests[0].body["messages"]
    assert outcome.usage == [{"model": "m", "input_tokens": text_tokens(canonical(messages)),
                              "output_tokens": text_tokens("The keeper "), "cached": False,
                              "truncated": False, "estimated": True}]
    assert outcome.steps == ["reserve", "meter", "release"]


# --- structured output, the cache, budgets ----------------------------------------------------


@pytest.mark.parametrize("wrong", ['{"title": 3}', '{"title": 3}\n'])
def test_structured_output_is_repaired_over_a_stream(server: FakeLLM, wrong: str) -> None:
    server.push(ok(wrong, usage=(20, 5)), ok('{"title": "Tide"}', usage=(40, 6)))
    out = ask(with_(server), schema=SCHEMA)
    assert out.error is None and out.output == {"title": "Tide"}
    # The repair streams too, after a blank line: not glued to the reply it corrects.
    assert out.text == '{"title": 3}\n\n{"title": "Tide"}'
    assert [u["input_tokens"] for u in out.usage] == [20, 40]
    assert out.steps == ["reserve", "meter", "release"] * 2
    first, second = (r.body for r in server.requests)
    assert first["response_format"] == {"type": "json_object"} and second["stream"] is True
    assert second["messages"][-2] == {"role": "assistant", "content": wrong}


@pytest.mark.parametrize("first_streams", [True, False])
def test_a_cached_answer_is_the_same_streamed_or_not(server: FakeLLM,
                                                     first_streams: bool) -> None:
    cache = DictCache()
    server.push(ok('{"title": "Tide"}', usage=(20, 5)))
    calls = [{"inputs": with_(server, temperature=0, stream=s), "schema": SCHEMA,
              "cache": cache} for s in (first_streams, not first_streams)]
    sent, served = ask_all(*calls)
    assert len(server.requests) == 1 and len(cache.data) == 1
    assert sent.output == served.output == {"title": "Tide"}
    assert served.deltas == []  # a cached answer arrives whole, without HTTP
    assert served.usage == [{"model": "m", "input_tokens": 20, "output_tokens": 5,
                             "cached": True, "truncated": False}]
    assert served.steps == ["meter"]  # nothing reserved for it


def test_a_refused_reservation_sends_nothing(server: FakeLLM) -> None:
    out = ask(with_(server), refuse=True)
    assert isinstance(out.error, BudgetExceeded)
    assert server.requests == [] and out.usage == [] and out.deltas == []


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stream": "maybe"}, "`with.stream` must be true or false"),
        ({"idle_timeout": 0}, "`with.idle_timeout` must be a number"),
        ({"idle_timeout": float("nan")}, "`with.idle_timeout` must be a number"),
        ({"timeout": "nan"}, "`with.timeout` must be a number"),
        ({"params": {"stream_options": {"include_usage": False}}},
         "`with.params.stream_options` is not allowed"),
    ],
)
def test_bad_stream_settings_are_permanent(extra: dict[str, Any], message: str) -> None:
    out = ask({"model": "m", "prompt": "x", **extra})
    assert isinstance(out.error, PermanentError) and out.error.message.startswith(message)


# --- the event reader on its own -------------------------------------------------------------


@pytest.mark.parametrize("form", ["lf", "crlf", "cr", "bom, comments, data: alone"])
def test_events_read_the_same_however_the_bytes_are_split(form: str) -> None:
    """Split anywhere — a UTF-8 character, a CRLF — with any of SSE's line ends, a byte
    order mark, comments and empty events (keep-alives)."""
    body = _body("Tide ", "and ", "lamp — ", "ünïcode 🌊")
    if form.startswith("bom"):
        body = b"\xef\xbb\xbf: ok\n\ndata:\n\n" + body.replace(b"\n\ndata: [DONE]",
                                                               b"\n\ndata: \n\ndata: [DONE]")
    body = body.replace(b"\n", {"crlf": b"\r\n", "cr": b"\r"}.get(form, b"\n"))
    for size in (1, 2, 3, 7, 64, len(body)):
        texts: list[str] = []
        events = Events(texts.append, "http://x")
        for i in range(0, len(body), size):
            events.feed(body[i : i + size])
        assert events.result() == ("Tide and lamp — ünïcode 🌊", "stop",
                                   {"prompt_tokens": 9, "completion_tokens": 4})
        assert texts == ["Tide ", "and ", "lamp — ", "ünïcode 🌊"]


def test_an_event_of_several_data_lines_is_one_chunk() -> None:
    texts: list[str] = []
    events = Events(texts.append, "http://x")
    events.feed(b'data: {"choices": [{"delta":\ndata: {"content": "a"},\n'
                b'data: "finish_reason": "stop"}]}\n\n')
    assert events.result() == ("a", "stop", {}) and texts == ["a"]


def test_a_last_event_without_its_blank_line_still_counts() -> None:
    events = Events(lambda text: None, "http://x")
    events.feed(b'data: {"choices": [{"delta": {"content": "a"}, "finish_reason": "stop"}]}')
    assert events.result() == ("a", "stop", {})


# --- through the CLI: the engine retries a cut stream ----------------------------------------


def test_storyflow_retries_a_cut_stream(
    cli: Callable[..., Any], tmp_path: Path, server: FakeLLM
) -> None:
    server.push(ok(PROSE, cut_after=2), ok("A lamp in the tide", usage=(7, 5)))
    workflow = tmp_path / "cut.yaml"
    workflow.write_text(textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: cut-stream
        agents:
          writer: {uses: llm, with: {model: m}}
        steps:
          title:
            agent: writer
            prompt: "A title"
            retry: {attempts: 2, delay: 0}
        outputs:
          title: "{{ steps.title.output }}"
        """), encoding="utf-8")
    result = cli("run", workflow, "--json", env={"STORYFLOW_LLM_BASE_URL": server.url})
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    retrying = [e for e in events if e["type"] == "step.retrying"]
    assert [e["error"]["class"] for e in retrying] == ["transient"]
    assert "was cut after" in retrying[0]["error"]["message"]
    summary = events[-1]
    assert summary["status"] == "succeeded"
    assert summary["outputs"] == {"title": "A lamp in the tide"}
    messages = server.requests[0].body["messages"]
    cut = text_tokens(canonical(messages)) + text_tokens("The keeper ")
    assert retrying[0]["tokens"] == cut  # the cut attempt is charged what arrived
    assert summary["tokens"] == cut + 12
    assert streamed(server) == [True, True]


def test_the_note_of_a_refused_stream_shows_the_base_url_masked() -> None:
    with FakeLLM(stream_mode="reject") as server:
        inputs = {**with_(server), "base_url": server.url.replace("http://", "http://u:s3cret@")}
        (out,) = ask_all({"inputs": inputs})
    notes = [line for line in out.logs if "does not support streaming" in line]
    assert notes and all("u:***@" in line and "s3cret" not in line for line in notes)
