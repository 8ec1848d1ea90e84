"""Promises kept (issue #12), each through the real command line.

`runs` lists top-level runs with their sub-workflow runs nested (``--all``: flat);
a killed run shows as ``interrupted (holder gone)`` in `runs` and `show` without the
listing writing to the store; the resume plan says what changed (settings, file,
steps) and which steps were removed, and nothing when nothing changed; a run's
duration is the time its processes ran; a retry never fires at once; a human step on
a terminal that gives no answer (input closed, answers that never fit) pauses the run.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import CLI_TIMEOUT_S, CliProject, cli_env

REPO = Path(__file__).resolve().parents[1]
RUNS = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas" / "runs.schema.json").read_text(encoding="utf-8"))
)

AGENTS = '''\
import os
import pathlib
import time


def step(me, text=""):
    log = os.environ.get("SF_EXEC_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(me + "\\n")
    if os.environ.get("SF_FAIL") == me:
        raise ValueError(f"{me} broke")
    gate = os.environ.get("SF_GATE")
    if gate and me == "gated":
        pathlib.Path(gate + ".waiting").touch()
        while not os.path.exists(gate):
            time.sleep(0.01)
    return f"{me}({text})"


def flaky(me, marker):
    """Fails with a transient error the first time, then succeeds."""
    if not os.path.exists(marker):
        pathlib.Path(marker).touch()
        raise TimeoutError(f"{me} timed out")
    return me
'''

CHAIN = """\
apiVersion: storyflow/v1
name: chain
steps:
  a: {uses: python, with: {callable: "pa:step", me: a}}
  gated: {uses: python, with: {callable: "pa:step", me: gated, text: "{{ steps.a.output }}"}}
  b: {uses: python, with: {callable: "pa:step", me: b, text: "{{ steps.gated.output }}"}}
outputs:
  out: "{{ steps.b.output }}"
"""

CHILD = """\
apiVersion: storyflow/v1
name: chapter
inputs:
  topic: {type: string}
steps:
  one: {uses: python, with: {callable: "pa:step", me: child, text: "{{ inputs.topic }}"}}
outputs:
  text: "{{ steps.one.output }}"
"""

BATCH = """\
apiVersion: storyflow/v1
name: batch
steps:
  stories:
    for_each: ["a", "b", "c"]
    as: topic
    uses: workflow
    with: {path: chapter.yaml, inputs: {topic: "{{ topic }}"}}
outputs:
  all: "{{ steps.stories.output }}"
"""


@pytest.fixture
def env(tmp_path: Path) -> CliProject:
    e = CliProject(tmp_path, "pa", AGENTS)
    e.write("chapter.yaml", CHILD)
    return e


def runs_json(env: CliProject, *args: str) -> list[dict[str, Any]]:
    result = env.cli("runs", *args, "--json")
    assert result.returncode == 0, result.stderr
    doc: list[dict[str, Any]] = json.loads(result.stdout)
    RUNS.validate(doc)
    return doc


def run_id_of(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.splitlines()[0].rsplit(" ", 1)[-1]


def events_of(env: CliProject, run_id: str) -> list[dict[str, Any]]:
    text = (env.state / "runs" / run_id / "events.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- 6. runs: top-level runs, children nested ---------------------------------------------


def test_runs_lists_top_level_runs_with_their_children_nested(env: CliProject) -> None:
    first = env.events("run", env.write("batch.yaml", BATCH))[0]["run_id"]
    second = env.events("run", env.write("batch.yaml", BATCH))[0]["run_id"]
    children = [f"{second}.stories-{i}" for i in range(3)]

    # `make demo`'s idiom: the newest top-level run, not one of its children.
    newest = runs_json(env, "--limit", "1")
    assert [r["run_id"] for r in newest] == [second]
    assert [c["run_id"] for c in newest[0]["children"]] == children
    assert all(c["parent_run"] == second and c["children"] == []
               for c in newest[0]["children"])
    assert [r["run_id"] for r in runs_json(env)] == [second, first]
    assert [r["run_id"] for r in runs_json(env, "--status", "succeeded", "--limit", "2")] == [
        second, first]
    assert runs_json(env, "--status", "failed") == []

    text = env.cli("runs").stdout.splitlines()
    assert text[0].split() == ["RUN", "WORKFLOW", "STATUS", "STARTED", "DURATION"]
    assert text[1].startswith(second + " ")
    assert [line.split()[:2] for line in text[2:5]] == [["└", c] for c in children]
    assert all(line.startswith("  └ ") for line in text[2:5])
    assert text[5].startswith(first + " ") and len(text) == 9

    flat = runs_json(env, "--all")
    assert len(flat) == 8 and all("children" not in r for r in flat)
    assert {r["run_id"]: r["parent_run"] for r in flat}[children[1]] == second
    assert len(runs_json(env, "--all", "--limit", "2")) == 2
    assert "PARENT" in env.cli("runs", "--all").stdout


# --- 9. a killed run's holder is gone -------------------------------------------------------


def test_a_killed_run_shows_interrupted_until_resumed(env: CliProject) -> None:
    wf = env.write("chain.yaml", CHAIN)
    run_id = env.kill_at_gate(wf, env.root / "gate")

    [row] = runs_json(env)
    assert (row["status"], row["holder_gone"]) == ("interrupted", True)
    assert "interrupted (holder gone)" in env.cli("runs").stdout
    assert runs_json(env, "--status", "interrupted") == [row]
    assert runs_json(env, "--status", "running") == []
    shown = env.show(run_id)
    assert shown["status"] == "interrupted"
    assert f"storyflow resume {run_id}" in shown["error"]["message"]
    text = env.cli("show", run_id).stdout
    assert "· interrupted" in text and "holder gone" in text

    from storyflow.store import Store

    with Store(env.state) as store:  # reading changed nothing in the store
        record = store.get_run(run_id)
        assert record is not None and record.status == "running"

    resumed = env.events("resume", run_id)
    assert resumed[-1]["status"] == "succeeded"
    [row] = runs_json(env)
    assert (row["status"], row["holder_gone"]) == ("succeeded", False)


def test_a_live_holder_is_running_and_a_stale_heartbeat_is_not(env: CliProject) -> None:
    from storyflow.store import Store
    from storyflow.store._store import lease_key

    wf = env.write("chain.yaml", CHAIN)
    run_id = env.events("run", wf)[0]["run_id"]
    with Store(env.state) as store:
        record = store.get_run(run_id)
        assert record is not None
        active = record.meta["active_s"]
        record.status = "running"
        store.put_run(record)
        now = time.time()
        lease = {"pid": os.getpid(), "host": socket.gethostname(), "token": "test",
                 "heartbeat": now, "since": now - 100}
        store._cache.set(lease_key(run_id), lease)  # this test's process: alive
    [row] = runs_json(env)
    assert (row["status"], row["holder_gone"]) == ("running", False)
    assert row["duration_s"] == pytest.approx(active + 100, abs=5)

    with Store(env.state) as store:  # alive, but silent for longer than the lease timeout
        store._cache.set(lease_key(run_id), {**lease, "heartbeat": now - 3600,
                                             "since": now - 3700})
    log = env.state / "runs" / run_id / "events.jsonl"
    os.utime(log, (now - 3650, now - 3650))
    [row] = runs_json(env)
    assert (row["status"], row["holder_gone"]) == ("interrupted", True)
    assert row["duration_s"] == pytest.approx(active + 100, abs=0.01)  # until its heartbeat
    os.utime(log, (now - 3550, now - 3550))
    [row] = runs_json(env)
    assert row["duration_s"] == pytest.approx(active + 150, abs=0.01)  # until its last event


def test_a_live_run_is_listed_as_running(env: CliProject) -> None:
    wf = env.write("chain.yaml", CHAIN)
    gate = env.root / "gate"
    proc = subprocess.Popen(
        [sys.executable, "-m", "storyflow", "run", str(wf), "--json"],
        cwd=env.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=cli_env(env.state, {"SF_GATE": str(gate)}),
    )
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not Path(str(gate) + ".waiting").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        [row] = runs_json(env)
        assert (row["status"], row["holder_gone"]) == ("running", False)
        gate.touch()
        assert proc.wait(timeout=CLI_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert runs_json(env)[0]["status"] == "succeeded"


# --- 10 and 12. the resume plan says what changed, and what was removed --------------------


def test_the_resume_plan_says_what_changed(env: CliProject) -> None:
    wf = env.write("chain.yaml", CHAIN)
    failed = env.cli("run", wf, "--no-progress", env={"SF_FAIL": "b"})
    assert failed.returncode == 1
    run_id = run_id_of(failed)

    same = env.cli("resume", run_id, "--no-progress", env={"SF_FAIL": "b"})
    assert same.returncode == 1
    assert "changed" not in same.stderr and "removed" not in same.stderr

    budget = env.cli("resume", run_id, "--set", "budget.tokens=500", "--no-progress",
                     env={"SF_FAIL": "b"})
    assert budget.returncode == 1
    assert "  settings changed: budget.tokens=500; no step changed\n" in budget.stderr
    assert "workflow file" not in budget.stderr
    again = env.cli("resume", run_id, "--set", "budget.tokens=500", "--no-progress",
                    env={"SF_FAIL": "b"})
    assert "changed" not in again.stderr  # the same setting again changes nothing

    wf.write_text(CHAIN + "# a comment\n", encoding="utf-8")
    comment = env.cli("resume", run_id, "--no-progress", env={"SF_FAIL": "b"})
    assert ("  the workflow file changed since the run started; no step changed\n"
            in comment.stderr)

    wf.write_text(CHAIN.replace("me: b,", "me: b2,"), encoding="utf-8")
    edited = env.cli("resume", run_id, "--set", "config.x=1", "--no-progress")
    assert edited.returncode == 0, edited.stderr
    assert ("  the workflow file changed since the run started; settings changed: config.x=1;"
            " changed steps: b\n") in edited.stderr


def test_the_resume_plan_lists_removed_steps(env: CliProject) -> None:
    wf = env.write("chain.yaml", CHAIN.replace(
        "outputs:", '  old_step: {uses: template, with: {template: "x"}}\noutputs:'))
    failed = env.cli("run", wf, "--no-progress", env={"SF_FAIL": "b"})
    assert failed.returncode == 1
    run_id = run_id_of(failed)
    wf.write_text(CHAIN, encoding="utf-8")
    resumed = env.cli("resume", run_id, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "  removed: old_step (no longer in the workflow file)\n" in resumed.stderr
    assert "the workflow file changed since the run started; no step changed" in resumed.stderr


# --- 11. the time a run ran; a retry never at once --------------------------------------


def _process_spans(events: list[dict[str, Any]]) -> float:
    """The time each process of a run ran, from its log: start to end event (or last)."""
    total, start, last = 0.0, None, None
    for e in events:
        if e["type"] in ("run.started", "run.resumed"):
            if start is not None and last is not None:
                total += last - start
            start = last = e["ts"]
        elif e["type"] in ("run.succeeded", "run.failed", "run.interrupted", "run.waiting"):
            total += e["duration_s"]
            start = last = None
        elif start is not None:
            last = e["ts"]
    return total


def test_duration_is_the_time_the_run_ran_not_the_idle_time(env: CliProject) -> None:
    wf = env.write("chain.yaml", CHAIN)
    failed = env.cli("run", wf, "--no-progress", env={"SF_FAIL": "b"})
    assert failed.returncode == 1
    run_id = run_id_of(failed)
    time.sleep(1.5)  # idle: not run time
    assert env.cli("resume", run_id, "--no-progress").returncode == 0
    [row] = runs_json(env)
    wall = row["ended_at"] - row["created_at"]
    assert row["duration_s"] < wall - 1.4
    assert row["duration_s"] == pytest.approx(_process_spans(events_of(env, run_id)), abs=0.01)


def test_a_killed_process_counts_until_its_last_event(env: CliProject) -> None:
    wf = env.write("chain.yaml", CHAIN)
    run_id = env.kill_at_gate(wf, env.root / "gate")
    time.sleep(1.0)
    assert env.events("resume", run_id)[-1]["status"] == "succeeded"
    events = events_of(env, run_id)
    killed = [e for e in events[: next(i for i, e in enumerate(events)
                                         if e["type"] == "run.resumed")]]
    assert killed[-1]["ts"] > killed[0]["ts"]  # the killed process did run
    [row] = runs_json(env)
    assert row["duration_s"] == pytest.approx(_process_spans(events), abs=0.01)
    assert row["duration_s"] < row["ended_at"] - row["created_at"] - 0.9


PINNED = ("import random, runpy; random.random = lambda: 0.0; "
          "runpy.run_module('storyflow', run_name='__main__')")
"""The real command with its random source pinned at 0: the worst case of jitter."""


def test_a_retry_never_fires_at_once(env: CliProject) -> None:
    wf = env.write("retry.yaml", f"""\
        apiVersion: storyflow/v1
        name: retry
        steps:
          call:
            uses: python
            with: {{callable: "pa:flaky", me: call, marker: "{env.root / 'm'}"}}
            retry: {{attempts: 2, delay: 1s}}
        """)
    result = subprocess.run(
        [sys.executable, "-c", PINNED, "run", str(wf), "--no-progress"],
        cwd=env.root, env=cli_env(env.state), capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "call retry in 0.5s" in result.stdout
    run_id = run_id_of(result)
    events = events_of(env, run_id)
    [retrying] = [e for e in events if e["type"] == "step.retrying"]
    assert retrying["delay_s"] == 0.5
    second = [e for e in events if e["type"] == "step.started"][1]
    assert second["ts"] - retrying["ts"] >= 0.49  # the event loop may wake a hair early


# --- 12. a terminal that gives no answer: the step waits ---------------------------------


TTY = """\
apiVersion: storyflow/v1
name: tty
steps:
  approve: {uses: human, with: {question: "Ship it?", schema: SCHEMA}}
outputs:
  shipped: "{{ steps.approve.output }}"
"""


def on_a_terminal(env: CliProject, wf: Path, typed: list[bytes]) -> tuple[int, str]:
    """``storyflow run WF --no-progress`` on a pseudo-terminal; at the first prompt each
    of ``typed`` is written; the exit code and everything shown."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "storyflow", "run", str(wf), "--no-progress"],
        cwd=env.root, stdin=slave, stdout=slave, stderr=slave,
        env=cli_env(env.state, {"TERM": "xterm", "COLUMNS": "100"}), close_fds=True,
    )
    os.close(slave)
    seen = b""

    def read(until: bytes | None) -> None:
        nonlocal seen
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while until is None or until not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    return
                if not chunk:
                    return
                seen += chunk
            elif until is None and proc.poll() is not None:
                return

    try:
        read(b"answer")
        for text in typed:
            os.write(master, text)
        read(None)
        code = proc.wait(timeout=CLI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, seen.decode("utf-8", "replace").replace("\r\n", "\n")


def terminal_run_id(shown: str) -> str:
    found = re.search(r"run (\d{8}-\d{6}-[0-9a-f]{6})", shown)
    assert found, shown
    return found.group(1)


def test_a_closed_terminal_input_pauses_the_human_step(env: CliProject) -> None:
    wf = env.write("tty.yaml", TTY.replace("SCHEMA", "{type: boolean}"))
    code, shown = on_a_terminal(env, wf, [b"\x04"])  # Ctrl-D: end of input
    assert code == 3, shown
    assert "the input is closed" in shown and "Traceback" not in shown
    run_id = terminal_run_id(shown)
    assert f"storyflow resume {run_id} --answer approve=true" in shown
    done = env.events("resume", run_id, "--answer", "approve=true")
    assert done[-1]["outputs"]["shipped"] is True


@pytest.mark.parametrize(("schema", "typed"), [
    ("{type: boolean}", b"maybe\r"),  # rich's own re-ask: not y/n
    ("{type: integer, minimum: 1}", b"0\r"),  # does not match the schema
])
def test_answers_that_never_fit_pause_the_human_step(env: CliProject, schema: str,
                                                     typed: bytes) -> None:
    wf = env.write("tty.yaml", TTY.replace("SCHEMA", schema))
    code, shown = on_a_terminal(env, wf, [typed] * 3)
    assert code == 3, shown
    assert "no valid answer after 3 tries" in shown and "Traceback" not in shown
    assert "--answer approve=" in shown
    assert env.show(terminal_run_id(shown))["status"] == "waiting"


def test_resume_goes_on_counting_a_steps_attempts(cli: Any, write_workflow: Any,
                                                   tmp_path: Path) -> None:
    flag = tmp_path / "fail.flag"
    flag.write_text("fail")
    wf = write_workflow(f"""\
        apiVersion: storyflow/v1
        name: counted
        steps:
          flaky:
            uses: command
            retry: {{attempts: 2, delay: 0s}}
            with: {{run: "test ! -e {flag} || exit 75"}}
    """)
    first = cli("run", wf, "--json")
    assert first.returncode == 1
    started = [json.loads(line) for line in first.stdout.splitlines()]
    assert [e["attempt"] for e in started if e["type"] == "step.started"] == [1, 2]
    flag.unlink()
    again = cli("resume", "--last", "--json")
    assert again.returncode == 0, again.stderr
    events = [json.loads(line) for line in again.stdout.splitlines()]
    assert [e["attempt"] for e in events if e["type"] == "step.started"] == [3]
    done = next(e for e in events if e["type"] == "step.succeeded")
    assert done["attempt"] == 3
