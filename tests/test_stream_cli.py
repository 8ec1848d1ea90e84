"""Watching an `llm` step write, through the real command line.

The fake OpenAI-compatible server streams its reply slowly (Server-Sent Events, one
word every 40 ms): the followed text shows on `run --follow`'s output and on `logs
--follow` from a second process while the step is still running; `step.delta` events
are in the event log, coalesced, and in `--json` output only with `--stream-events`;
`cancel` from another process stops a streaming run (130) and `resume` re-runs only
what was cut short. A secret the model echoes never reaches the text or the log, however
the deltas cut it; `logs --follow` ends when the run's process is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CLI_TIMEOUT_S, CliProject, cli_env
from llm_server import FakeLLM, Reply, Request, ok
from storyflow.engine import deltas as deltas_module
from storyflow.engine.commit import Journal
from storyflow.store import redact

WORDS = " ".join(f"w{i}" for i in range(60))
FLOW = """\
apiVersion: storyflow/v1
name: streamy
agents:
  model: {uses: llm, with: {model: m}}
steps:
  intro:
    uses: template
    with: {template: "Once"}
  write:
    agent: model
    prompt: "{{ steps.intro.output }} upon a time"
outputs:
  text: "{{ steps.write.output }}"
"""


@pytest.fixture
def server() -> Iterator[FakeLLM]:
    with FakeLLM(ok(WORDS, chunk_delay_s=0.04)) as s:
        yield s


@pytest.fixture
def project(tmp_path: Path, server: FakeLLM) -> CliProject:
    p = CliProject(tmp_path, "unused", "")
    p.write("flow.yaml", FLOW)
    return p


def env_for(p: CliProject, server: FakeLLM) -> dict[str, str]:
    return cli_env(p.state, {"STORYFLOW_LLM_BASE_URL": server.url})


def start(p: CliProject, server: FakeLLM, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "storyflow", *args], cwd=p.root, env=env_for(p, server),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def read_until(proc: subprocess.Popen[bytes], marker: bytes) -> bytes:
    """What ``proc`` wrote to stdout up to and including ``marker`` (fails on timeout)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = b""
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while marker not in got:
        assert time.monotonic() < deadline, got
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, (got, proc.stderr.read() if proc.stderr else b"")
            got += chunk
    return got


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    return proc.returncode, out, err


def test_follow_shows_the_text_while_the_step_runs(project: CliProject, server: FakeLLM) -> None:
    proc = start(project, server, "run", "flow.yaml", "--no-progress", "--follow", "write")
    try:
        seen = read_until(proc, b"w5 ")
        # Text is on screen, the step has not ended, the server is still sending.
        assert proc.poll() is None
        assert b"write writes:" in seen and b"w0 w1" in seen
        assert b"\xe2\x9c\x93 write" not in seen and b"w59" not in seen
    finally:
        code, out, err = finish(proc)
    assert code == 0, err
    text = (seen + out).decode()
    assert WORDS in text.replace("\n", "")  # the whole reply, in order
    assert text.index("w59") < text.index("\u2713 write")  # the text before the step's end


def test_logs_follow_from_another_process_prints_the_text_as_written(
    project: CliProject, server: FakeLLM
) -> None:
    run = start(project, server, "run", "flow.yaml", "--no-progress", "--run-id", "live1")
    try:
        read_until(run, b"run.started")
        logs = start(project, server, "logs", "live1", "--step", "write", "--follow")
        try:
            seen = read_until(logs, b"w5 ")
            assert run.poll() is None  # the run is still writing
            assert b"w59" not in seen
        finally:
            code, out, _ = finish(logs)
        assert code == 0
        assert WORDS in (seen + out).decode().replace("\n", "")
    finally:
        assert finish(run)[0] == 0


def test_deltas_are_logged_coalesced_and_in_json_only_when_asked(
    project: CliProject, server: FakeLLM
) -> None:
    env = {"STORYFLOW_LLM_BASE_URL": server.url}
    events = project.events("run", "flow.yaml", env=env)
    assert not [e for e in events if e["type"] == "step.delta"]
    run_id = events[0]["run_id"]
    logged = [json.loads(line) for line in
              (project.state / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    deltas = [e for e in logged if e["type"] == "step.delta"]
    assert deltas and all(e["step"] == "write" and e["attempt"] == 1 for e in deltas)
    assert "".join(e["text"] for e in deltas) == WORDS
    assert len(deltas) < 60  # coalesced: 60 chunks over ~2.4 s, at most ~10 events a second
    assert deltas[-1]["tokens"] == 60
    done = next(i for i, e in enumerate(logged) if e["type"] == "step.succeeded"
                and e["step"] == "write")
    assert all(logged.index(d) < done for d in deltas)

    streamed = project.events("run", "flow.yaml", "--stream-events", env=env)
    assert "".join(e["text"] for e in streamed if e["type"] == "step.delta") == WORDS


def test_cancel_stops_a_streaming_run_and_resume_reruns_only_it(
    project: CliProject, server: FakeLLM
) -> None:
    run = start(project, server, "run", "flow.yaml", "--no-progress", "--follow", "write",
                "--run-id", "cut1")
    try:
        read_until(run, b"w3 ")
        asked = len(server.requests)
        cancel = project.cli("cancel", "cut1", "--reason", "wrong prompt")
        assert cancel.returncode == 0, cancel.stderr
    finally:
        code, _, err = finish(run)
    assert code == 130, err
    doc = project.show("cut1")
    assert doc["status"] == "interrupted"
    assert "wrong prompt" in doc["error"]["message"]
    server.default = ok(WORDS)  # no more waiting
    events = project.events("resume", "cut1", env={"STORYFLOW_LLM_BASE_URL": server.url})
    assert {e["step"] for e in events if e["type"] == "step.kept"} == {"intro"}
    assert [e["step"] for e in events if e["type"] == "step.started"] == ["write"]
    assert len(server.requests) == asked + 1
    assert events[-1]["outputs"]["text"] == WORDS


def test_logs_follow_ends_when_the_runs_process_is_gone(
    project: CliProject, server: FakeLLM
) -> None:
    run = start(project, server, "run", "flow.yaml", "--no-progress", "--follow", "write",
                "--run-id", "gone1")
    read_until(run, b"w3 ")
    run.send_signal(signal.SIGKILL)  # no chance to close its record: it still says running
    finish(run)
    logs = start(project, server, "logs", "gone1", "--step", "write", "--follow")
    try:
        out, err = logs.communicate(timeout=15)  # it used to wait for ever
    finally:
        logs.kill()
        logs.communicate()
    assert logs.returncode == 0, err
    assert b"w0 w1 w2 w3 " in out and out.endswith(b"\n")  # the cut text's line is ended
    assert b"the process running it is gone" in err and b"storyflow resume gone1" in err


def test_logs_step_names_a_step_of_the_run(project: CliProject, server: FakeLLM) -> None:
    assert project.cli("run", "flow.yaml", "--run-id", "r1", env=env_for(project, server)
                       ).returncode == 0
    result = project.cli("logs", "r1", "--step", "wrte")
    assert result.returncode == 2 and result.stdout == ""
    assert "run r1 has no step 'wrte'" in result.stderr and "'write'" in result.stderr


def test_follow_names_a_step_of_the_workflow(project: CliProject, server: FakeLLM) -> None:
    result = project.cli("run", "flow.yaml", "--follow", "wrte",
                         env={"STORYFLOW_LLM_BASE_URL": server.url})
    assert result.returncode == 2
    assert "--follow: unknown step 'wrte'" in result.stderr and "write" in result.stderr
    assert json.loads(project.cli("runs", "--json").stdout) == []  # nothing was started


def test_stream_events_without_json_is_a_usage_error_for_every_command(
    project: CliProject, server: FakeLLM
) -> None:
    env = env_for(project, server)
    assert project.cli("run", "flow.yaml", "--run-id", "base1", env=env).returncode == 0
    log = project.state / "runs" / "base1" / "events.jsonl"
    logged, asked = log.read_bytes(), len(server.requests)
    for args in (["run", "flow.yaml"], ["resume", "base1"], ["fork", "base1"],
                 ["replay", "base1"], ["run", "flow.yaml", "--follow", "write"]):
        result = project.cli(*args, "--stream-events", env=env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("error: --stream-events needs --json"), result.stderr
        assert "hint: add --json" in result.stderr
    # Nothing ran: no new run, no request, the run named untouched.
    assert [r["run_id"] for r in json.loads(project.cli("runs", "--json").stdout)] == ["base1"]
    assert len(server.requests) == asked and log.read_bytes() == logged
    # With --json, before or after it, the flag does what it says.
    for args in (["fork", "base1", "--from", "write", "--stream-events"],
                 ["run", "--stream-events", "flow.yaml"]):
        events = project.events(*args, env=env)
        assert "".join(e["text"] for e in events if e["type"] == "step.delta") == WORDS


# -- secrets in streamed text ------------------------------------------------------------------

KEY = "sk-test-SECRET-abc123"
OTHER = "tok_ABCDEFGH"
PIECES = ["sk-", "sk-test-", "SECRET", "-abc", "123", "tok_", "ABCD", "EFGH", "s", "t", " ",
          "\u00e9", "\U0001f600", "x"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.lists(st.sampled_from(PIECES), max_size=4).map("".join),
                          st.booleans()), max_size=25))
def test_deltas_never_split_a_secret_between_events(chunks: list[tuple[str, bool]]) -> None:
    """Whatever the chunks and wherever the coalescing timer fires, the events' text is
    the whole text redacted: no secret passes in pieces, and the held end comes out last."""
    texts: list[str] = []
    journal = Journal(None, "r", lambda e: texts.append(e["text"]),  # type: ignore[arg-type]
                      lambda: 0.0, [KEY, OTHER])

    async def stream() -> None:
        deltas = deltas_module.Deltas(journal, "write", 1)
        for text, timer_fires in chunks:
            deltas(text)
            if timer_fires:
                deltas.flush()  # as the timer would, EVERY_S later
        deltas.close()

    asyncio.run(stream())
    whole = "".join(text for text, _ in chunks)
    assert "".join(texts) == redact(whole, [KEY, OTHER])
    assert all(texts) and KEY not in "".join(texts) and OTHER not in "".join(texts)


def test_a_secret_the_model_echoes_is_redacted_from_the_streamed_text(
    project: CliProject, server: FakeLLM
) -> None:
    def echo(request: Request) -> Reply:  # the key it was sent, a few characters a chunk
        key = request.headers["authorization"].removeprefix("Bearer ")
        return ok(f"key {key}, " * 12, chunk_unit="chars", chunk_size=3, chunk_delay_s=0.01)

    server.default = echo
    project.write("flow.yaml", FLOW.replace("{model: m}", "{model: m}, secrets: [OPENAI_API_KEY]"))
    env = {**env_for(project, server), "OPENAI_API_KEY": KEY}
    result = project.cli("run", "flow.yaml", "--no-progress", "--follow", "write",
                         "--run-id", "sec1", env=env)
    assert result.returncode == 0, result.stderr
    assert "key ***, " * 12 in result.stdout
    log = (project.state / "runs" / "sec1" / "events.jsonl").read_text()
    deltas = [e for e in map(json.loads, log.splitlines()) if e["type"] == "step.delta"]
    assert len(deltas) > 1
    assert "".join(e["text"] for e in deltas) == "key ***, " * 12
    assert "SECRET" not in log and "SECRET" not in result.stdout
