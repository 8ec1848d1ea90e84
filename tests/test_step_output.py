"""What a step's code says, kept with its run: the traceback of a python step that raised,
the lines a step prints or logs (``step.log`` events, streamed by ``logs --follow``),
bounded per attempt, and ``context.logger``.

Everything goes through the real CLI in subprocesses (`CliProject`), which also checks
that no traceback reaches the terminal's stderr.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI_TIMEOUT_S, CliProject, cli_env

AGENTS = '''
import asyncio
import logging
import os
import sys
import time


def _parse(text):
    return int(text)


def count(text):
    """A user's function that fails two calls deep, with a chained cause."""
    try:
        return _parse(text)
    except ValueError as exc:
        raise RuntimeError(f"cannot count {text!r}") from exc


async def acount(text):
    await asyncio.sleep(0)
    return count(text)


def leak(context):
    raise ValueError("the key is " + context.secrets["SF_TEST_KEY"])


def chatty(name, n=3, pause=0.01):
    for i in range(n):
        print(f"{name} out {i}")
        print(f"{name} err {i}", file=sys.stderr)
        logging.warning("%s warns %d", name, i)
        time.sleep(pause)
    return name


async def achatty(name, n=3, pause=0.01):
    for i in range(n):
        print(f"{name} out {i}")
        logging.warning("%s warns %d", name, i)
        await asyncio.sleep(pause)
    return name


def flood(n):
    for i in range(n):
        print(f"line {i}")
    print("x" * 20_000)
    return n


def gated(gate):
    print("tick 1", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    print("tick 2")
    return "done"


def with_context(context):
    context.logger.info("hello %s", context.step_id)
    context.logger.debug("details")
    context.log("plain line")
    return {
        "logger": type(context.logger).__name__,
        "name": context.logger.name,
        "fields": sorted(
            n for n in dir(context) if not n.startswith("_") and n != "of"
        ),
    }
'''


@pytest.fixture
def project(tmp_path: Path) -> CliProject:
    return CliProject(tmp_path, "agents", AGENTS)


def step_logs(events: list[dict[str, Any]], step: str) -> list[str]:
    return [e["message"] for e in events if e["type"] == "step.log" and e["step"] == step]


def one(events: list[dict[str, Any]], type_: str, step: str) -> dict[str, Any]:
    found = [e for e in events if e["type"] == type_ and e.get("step") == step]
    assert len(found) == 1, found
    return found[0]


# -- 3. the traceback of a python step that raised ---------------------------------------------


@pytest.mark.parametrize("fn", ["count", "acount"])
def test_a_python_steps_traceback_is_recorded_shown_and_logged(
    project: CliProject, fn: str
) -> None:
    wf = project.write("wf.yaml", f"""\
        apiVersion: storyflow/v1
        name: tb
        steps:
          parse: {{uses: python, with: {{callable: "agents:{fn}", text: "seven"}},
                   retry: {{attempts: 2, delay: 0s, on: [permanent]}}}}
    """)
    events = project.events("run", wf, code=1)
    run_id = events[0]["run_id"]
    retried = one(events, "step.retrying", "parse")["error"]
    failed = one(events, "step.failed", "parse")["error"]
    for error in (retried, failed):
        tb = error["traceback"]
        assert tb.startswith("Traceback (most recent call last):\n")
        assert tb.endswith("RuntimeError: cannot count 'seven'")
        assert str(project.root / "agents.py") in tb
        assert "in _parse\n    return int(text)" in tb
        assert "ValueError: invalid literal for int() with base 10: 'seven'" in tb
        assert "The above exception was the direct cause" in tb
        assert "storyflow" not in tb, "storyflow's own frames are left out"
        assert "concurrent/futures" not in tb and "/asyncio/" not in tb, (
            "so is the machinery that called the user's code"
        )

    doc = project.show(run_id)  # checked against show.schema.json
    assert doc["steps"][0]["error"]["traceback"] == failed["traceback"]

    shown = project.cli("show", run_id, "--step", "parse")
    assert shown.returncode == 0
    assert "error: permanent: RuntimeError: cannot count 'seven'" in shown.stdout
    assert "  Traceback (most recent call last):" in shown.stdout
    assert "      return int(text)" in shown.stdout

    logged = project.cli("logs", run_id).stdout.splitlines()
    at = next(i for i, line in enumerate(logged) if "✗ parse attempt 2" in line)
    assert "see: storyflow show" not in logged[at], "logs shows the rest itself"
    assert logged[at + 1] == "          Traceback (most recent call last):"
    assert logged[at + 1 :].index("          RuntimeError: cannot count 'seven'") > 2
    retry_at = next(i for i, line in enumerate(logged) if "↻ parse retry" in line)
    assert logged[retry_at + 1] == "          Traceback (most recent call last):"


def test_the_run_display_shows_the_error_and_where_its_traceback_is(
    project: CliProject,
) -> None:
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: tb
        defaults: {retry: {attempts: 1}}
        steps:
          parse: {uses: python, with: {callable: "agents:count", text: "seven"}}
          each:
            for_each: ["x"]
            uses: python
            with: {callable: "agents:count", text: "{{ item }}"}
          cmd: {uses: command, with: {run: "echo one >&2; echo two >&2; echo 3 >&2; exit 2"}}
          short: {uses: command, with: {run: "echo nope >&2; exit 2"}}
    """)
    result = project.cli("run", wf, "--no-progress")
    assert result.returncode == 1
    run_id = result.stdout.split(" run ", 1)[1].split()[0]
    lines = result.stdout.splitlines()
    for failure in (
        "✗ parse attempt 1: permanent: RuntimeError: cannot count 'seven' "
        f"(see: storyflow show {run_id} --step parse)",
        "✗ each[0] attempt 1: permanent: RuntimeError: cannot count 'x' "
        f"(see: storyflow show {run_id} --step 'each[0]')",
        "✗ cmd attempt 1: permanent: command exited with status 2: one … 3 "
        f"(see: storyflow show {run_id} --step cmd)",
        "✗ short attempt 1: permanent: command exited with status 2: nope",
    ):
        assert any(line.endswith(failure) for line in lines), (failure, lines)
    assert "Traceback" not in result.stdout + result.stderr
    shown = project.cli("show", run_id, "--step", "cmd").stdout
    assert "error: permanent: command exited with status 2: one\ntwo\n3\n" in shown


def test_a_module_that_fails_on_import_has_its_traceback(project: CliProject) -> None:
    project.write("broken.py", "X = 1\nY = X / 0\n")
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: tb
        steps:
          a: {uses: python, with: {callable: "broken:f"}}
          b: {uses: python, with: {callable: "missing_module_sf:f"}}
    """)
    events = project.events("run", wf, code=1)
    tb = one(events, "step.failed", "a")["error"]["traceback"]
    assert 'broken.py", line 2, in <module>\n    Y = X / 0' in tb
    assert tb.endswith("ZeroDivisionError: division by zero")
    assert "importlib" not in tb and "storyflow" not in tb
    assert "traceback" not in one(events, "step.failed", "b")["error"], (
        "a module that does not exist ran no code of the user's"
    )


def test_secrets_are_redacted_from_tracebacks(project: CliProject) -> None:
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: tb
        agents:
          keyed: {uses: python, secrets: [SF_TEST_KEY]}
        steps:
          leak: {agent: keyed, with: {callable: "agents:leak"}, retry: {attempts: 1}}
    """)
    secret = "sk-very-secret-value-42"
    events = project.events("run", wf, code=1, env={"SF_TEST_KEY": secret})
    error = one(events, "step.failed", "leak")["error"]
    assert error["traceback"].endswith("ValueError: the key is ***")
    run_dir = next((project.state / "runs").iterdir())
    assert secret not in (run_dir / "events.jsonl").read_text()
    shown = project.cli("show", events[0]["run_id"], "--step", "leak")
    assert "ValueError: the key is ***" in shown.stdout and secret not in shown.stdout


# -- 4. what a step prints and logs --------------------------------------------------------------


def test_print_stderr_and_logging_of_concurrent_steps_go_to_their_own_logs(
    project: CliProject,
) -> None:
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: out
        steps:
          sync:
            for_each: [a, b, c, d]
            uses: python
            with: {callable: "agents:chatty", name: "{{ item }}"}
          async:
            for_each: [e, f, g]
            uses: python
            with: {callable: "agents:achatty", name: "{{ item }}"}
          cmd:
            uses: command
            with: {run: "echo result; echo one >&2; echo two >&2"}
          noisy: {uses: python, with: {callable: "noisy:quiet"}}
    """)
    project.write("noisy.py", """\
        print("noisy module imported")


        def quiet():
            return 1
    """)
    result = project.cli("run", wf, "--json", "--max-parallel", "8")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for i, name in enumerate("abcd"):
        assert step_logs(events, f"sync[{i}]") == [
            line
            for k in range(3)
            for line in (f"{name} out {k}", f"{name} err {k}", f"WARNING:root:{name} warns {k}")
        ]
    for i, name in enumerate("efg"):
        assert step_logs(events, f"async[{i}]") == [
            line for k in range(3) for line in (f"{name} out {k}", f"WARNING:root:{name} warns {k}")
        ]
    assert step_logs(events, "cmd") == ["one", "two"]
    # Nothing of the steps' own reached the terminal; a module's import-time print did.
    assert "noisy module imported" in result.stdout.splitlines()
    assert "warns" not in result.stderr and "err 0" not in result.stderr
    assert not any(line.startswith(("a out", "e out")) for line in result.stdout.splitlines())


def test_a_steps_output_is_bounded_and_says_what_was_cut(project: CliProject) -> None:
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: flood
        steps:
          flood: {uses: python, with: {callable: "agents:flood", n: 5000}}
          errs:
            uses: command
            with: {run: "for i in $(seq 1 1200); do echo e$i >&2; done; exit 3"}
            retry: {attempts: 1}
    """)
    events = project.events("run", wf, code=1)
    lines = step_logs(events, "flood")
    assert lines[:2] == ["line 0", "line 1"] and lines[499] == "line 499"
    assert lines[500] == "… 4,001 more lines not logged; the last 500 follow"
    assert lines[501] == "line 4501" and lines[-2] == "line 4999"
    assert lines[-1] == "x" * 8192 + " … (11,808 more characters)"
    assert len(lines) == 1001
    errs = step_logs(events, "errs")
    assert len(errs) == 1001 and errs[0] == "e1" and errs[-1] == "e1200"
    assert errs[500] == "… 200 more lines not logged; the last 500 follow"
    message = one(events, "step.failed", "errs")["error"]["message"]
    assert message.startswith("command exited with status 3: e1181\n")
    assert message.endswith("e1200")


def _lines_of(proc: subprocess.Popen[str]) -> tuple[queue.Queue[str | None], threading.Thread]:
    """Each line the process prints, as it prints it (None at the end), and the thread
    that reads them."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return lines, reader


def _wait_for(lines: queue.Queue[str | None], text: str) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, f"ended before {text!r}: {seen}"
        seen.append(line)
        if text in line:
            return seen


@pytest.mark.parametrize("kind", ["python", "command"])
def test_logs_follow_streams_a_steps_lines_while_it_runs(
    project: CliProject, tmp_path: Path, kind: str
) -> None:
    gate = tmp_path / "gate"
    step = (
        f'{{uses: python, with: {{callable: "agents:gated", gate: "{gate}"}}}}'
        if kind == "python"
        else '{uses: command, with: {run: "echo tick 1 >&2; '
        f'while [ ! -e {gate} ]; do sleep 0.02; done; echo tick 2 >&2"}}}}'
    )
    wf = project.write("wf.yaml", f"""\
        apiVersion: storyflow/v1
        name: live
        steps:
          slow: {step}
    """)
    env = cli_env(project.state)
    run = subprocess.Popen(
        [sys.executable, "-m", "storyflow", "run", str(wf), "--json"],
        cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    follow: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    try:
        assert run.stdout is not None
        run_id = json.loads(run.stdout.readline())["run_id"]
        follow = subprocess.Popen(
            [sys.executable, "-m", "storyflow", "logs", run_id, "--step", "slow", "--follow"],
            cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env,
        )
        lines, reader = _lines_of(follow)
        _wait_for(lines, "slow: tick 1")
        assert run.poll() is None, "the line was streamed while the step still ran"
        gate.write_text("open")
        rest = _wait_for(lines, "slow: tick 2")
        assert not any("✓ slow" in line for line in rest)
        _wait_for(lines, "✓ slow")
        assert follow.wait(timeout=CLI_TIMEOUT_S) == 0
        run.communicate(timeout=CLI_TIMEOUT_S)
        assert run.returncode == 0
    finally:
        for proc in (run, follow):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if reader is not None:
            reader.join(timeout=CLI_TIMEOUT_S)
        for proc in (run, follow):
            for pipe in (proc.stdout, proc.stderr) if proc is not None else ():
                if pipe is not None:
                    pipe.close()


# -- 5. context.logger ---------------------------------------------------------------------------


def test_context_has_a_logger_writing_to_the_steps_log(project: CliProject) -> None:
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: ctx
        steps:
          greet: {uses: python, with: {callable: "agents:with_context"}}
    """)
    events = project.events("run", wf)
    assert step_logs(events, "greet") == ["INFO: hello greet", "DEBUG: details", "plain line"]
    assert project.show(events[0]["run_id"])["steps"][0]["output"] == {
        "logger": "Logger",
        "name": "storyflow.step.greet",
        "fields": [
            "attempt", "log", "logger", "run_dir", "run_id", "secrets", "step_id",
            "workflow_dir",
        ],
    }


# -- the same on a Dask worker -------------------------------------------------------------------


def test_on_a_dask_worker_the_traceback_and_the_printed_lines_come_back(
    project: CliProject,
) -> None:
    pytest.importorskip("distributed")
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: remote
        executor: {dask: {workers: 1}}
        steps:
          talk: {uses: python, with: {callable: "agents:chatty", name: w, n: 2}}
          parse:
            needs: [talk]
            uses: python
            with: {callable: "agents:count", text: "seven"}
            retry: {attempts: 1}
    """)
    events = project.events("run", wf, code=1)
    assert one(events, "step.succeeded", "talk")["worker"].startswith("tcp://127.0.0.1:")
    assert step_logs(events, "talk") == [
        "w out 0", "w err 0", "WARNING:root:w warns 0", "w out 1", "w err 1",
        "WARNING:root:w warns 1",
    ]
    failed = one(events, "step.failed", "parse")
    assert failed["worker"].startswith("tcp://127.0.0.1:")
    tb = failed["error"]["traceback"]
    assert tb.startswith("Traceback (most recent call last):\n")
    assert 'agents.py", line' in tb and "in _parse\n    return int(text)" in tb
    assert tb.endswith("RuntimeError: cannot count 'seven'")
    assert "storyflow" not in tb.replace("storyflow-folders", "")
    shown = project.cli("show", events[0]["run_id"], "--step", "parse")
    assert "    return int(text)" in shown.stdout
