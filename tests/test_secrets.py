"""Secrets through the real command line: python steps cannot read what they do not
declare, values named like secrets are redacted everywhere, and ``isolate: process``
runs a python call in a subprocess of its own."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI_TIMEOUT_S, cli_env

DECLARED = "declared-api-key-value-1234"
UNDECLARED = "undeclared-service-token-5678"

AGENTS = '''\
import hashlib
import os
import subprocess
import sys
import time


def _sha(value):
    return hashlib.sha256(value.encode()).hexdigest() if value is not None else None


def probe(context, me="probe"):
    print(f"{me} running in", os.getpid())
    return {
        "pid": os.getpid(),
        "names": sorted(os.environ),
        "api_key_env": _sha(os.environ.get("SF_TEST_API_KEY")),
        "token_env": os.environ.get("SOME_SERVICE_TOKEN", "absent"),
        "api_key_ctx": _sha(context.secrets.get("SF_TEST_API_KEY")),
        "ctx_names": sorted(context.secrets),
    }


def echo(value):
    print("the value is", value)
    return {"value": value}


def boom():
    raise ValueError("isolated failure")


def slow(pidfile):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    print("started", flush=True)
    time.sleep(60)
'''


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        (root / "agents.py").write_text(AGENTS, encoding="utf-8")

    def run(self, text: str, *, code: int | None = None) -> tuple[list[dict[str, Any]], str]:
        path = self.root / "workflow.yaml"
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        env = cli_env(self.state, {
            "SF_TEST_API_KEY": DECLARED,
            "SOME_SERVICE_TOKEN": UNDECLARED,
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        done = subprocess.run(
            [sys.executable, "-m", "storyflow", "run", str(path), "--json"],
            cwd=self.root, env=env, capture_output=True, text=True, encoding="utf-8",
            timeout=CLI_TIMEOUT_S, check=False,
        )
        if code is not None:
            assert done.returncode == code, (done.stdout, done.stderr)
        events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        return events, done.stdout + done.stderr

    def outputs(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        summary = [e for e in events if e["type"] == "run.summary"]
        assert summary, events
        outputs: dict[str, Any] = summary[-1]["outputs"]
        return outputs

    def everything(self) -> bytes:
        """Every byte the runs wrote under the state dir (events, store, artifacts)."""
        return b"".join(p.read_bytes() for p in sorted(self.state.rglob("*")) if p.is_file())


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def _logs(events: list[dict[str, Any]], step: str) -> list[str]:
    return [e["message"] for e in events if e["type"] == "step.log" and e.get("step") == step]


def test_python_steps_read_only_declared_secrets(project: Project) -> None:
    events, out = project.run("""
        apiVersion: storyflow/v1
        name: secrets
        agents:
          keeper: {uses: python, secrets: [SF_TEST_API_KEY]}
        steps:
          plain: {uses: python, with: {callable: "agents:probe"}}
          keeper: {agent: keeper, with: {callable: "agents:probe"}}
        outputs:
          plain: "{{ steps.plain.output }}"
          keeper: "{{ steps.keeper.output }}"
        """, code=0)
    outputs = project.outputs(events)
    plain, keeper = outputs["plain"], outputs["keeper"]
    for seen in (plain, keeper):  # in storyflow's process: nobody reads it from os.environ
        assert seen["api_key_env"] is None
        assert "SF_TEST_API_KEY" not in seen["names"]
        assert "SOME_SERVICE_TOKEN" not in seen["names"]
        assert seen["token_env"] == "absent"
    assert plain["api_key_ctx"] is None and plain["ctx_names"] == []
    assert keeper["api_key_ctx"] == _sha(DECLARED)
    assert keeper["ctx_names"] == ["SF_TEST_API_KEY"]
    assert DECLARED not in out and UNDECLARED not in out


def test_pattern_matched_values_are_redacted_everywhere(project: Project) -> None:
    events, out = project.run("""
        apiVersion: storyflow/v1
        name: redacted
        env: [SOME_SERVICE_TOKEN]
        steps:
          probe: {uses: python, with: {callable: "agents:probe"}}
          echo:
            uses: python
            with: {callable: "agents:echo", value: "{{ env.SOME_SERVICE_TOKEN }}"}
          shell:
            uses: command
            with: {run: "echo token=$T; env", env: {T: "{{ env.SOME_SERVICE_TOKEN }}"}}
          iso:
            uses: python
            with: {callable: "agents:echo", isolate: process, value: "{{ env.SOME_SERVICE_TOKEN }}"}
        outputs:
          echoed: "{{ steps.echo.output.value }}"
          shell: "{{ steps.shell.output }}"
          iso: "{{ steps.iso.output.value }}"
        artifacts:
          token.txt: "{{ steps.echo.output.value }} {{ steps.iso.output.value }}"
        """, code=0)
    outputs = project.outputs(events)
    assert outputs["echoed"] == "***" and outputs["iso"] == "***"
    assert "token=***" in outputs["shell"]
    assert "SOME_SERVICE_TOKEN" not in outputs["shell"]  # not in the command's environment
    assert any("the value is ***" in line for line in _logs(events, "echo"))
    assert any("the value is ***" in line for line in _logs(events, "iso"))
    assert UNDECLARED not in out
    written = project.everything()
    assert any(p.name == "events.jsonl" for p in project.state.rglob("*"))
    assert any(p.name == "token.txt" for p in project.state.rglob("*"))
    assert UNDECLARED.encode() not in written


def test_command_sees_only_its_declared_secrets(project: Project) -> None:
    events, _ = project.run("""
        apiVersion: storyflow/v1
        name: commands
        agents:
          sh: {uses: command, secrets: [SF_TEST_API_KEY]}
        steps:
          plain: {uses: command, with: {run: [env]}}
          keeper: {agent: sh, with: {run: [env]}}
        outputs:
          plain: "{{ steps.plain.output }}"
          keeper: "{{ steps.keeper.output }}"
        """, code=0)
    outputs = project.outputs(events)
    plain = dict(line.split("=", 1) for line in outputs["plain"].splitlines())
    keeper = dict(line.split("=", 1) for line in outputs["keeper"].splitlines())
    assert "SF_TEST_API_KEY" not in plain and "SOME_SERVICE_TOKEN" not in plain
    assert keeper["SF_TEST_API_KEY"] == "***"  # there, and redacted from the output
    assert "SOME_SERVICE_TOKEN" not in keeper
    assert set(keeper) <= {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SF_TEST_API_KEY",
                           "PWD", "SHLVL", "_"}


def test_isolated_call_runs_in_its_own_process(project: Project) -> None:
    events, out = project.run("""
        apiVersion: storyflow/v1
        name: isolated
        agents:
          keeper: {uses: python, secrets: [SF_TEST_API_KEY]}
        steps:
          here: {uses: python, with: {callable: "agents:probe", me: here}}
          there: {agent: keeper, with: {callable: "agents:probe", me: there, isolate: process}}
          bare: {uses: python, with: {callable: "agents:probe", me: bare, isolate: process}}
        outputs:
          here: "{{ steps.here.output }}"
          there: "{{ steps.there.output }}"
          bare: "{{ steps.bare.output }}"
        """, code=0)
    outputs = project.outputs(events)
    here, there, bare = outputs["here"], outputs["there"], outputs["bare"]
    assert there["pid"] != here["pid"] and bare["pid"] != here["pid"]
    assert there["pid"] != bare["pid"]
    assert any(f"there running in {there['pid']}" in m for m in _logs(events, "there"))
    minimal = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "PYTHONUNBUFFERED",
               "PYTHONIOENCODING", "PWD", "LC_CTYPE"}
    assert set(there["names"]) <= minimal | {"SF_TEST_API_KEY"}
    assert "SF_TEST_API_KEY" in there["names"]
    assert there["api_key_env"] == there["api_key_ctx"] == _sha(DECLARED)
    assert there["ctx_names"] == ["SF_TEST_API_KEY"]
    assert set(bare["names"]) <= minimal
    assert bare["api_key_env"] is None and bare["ctx_names"] == []
    assert bare["token_env"] == "absent"
    assert DECLARED not in out and UNDECLARED not in out


def test_isolated_call_reports_its_exception(project: Project) -> None:
    events, _ = project.run("""
        apiVersion: storyflow/v1
        name: isolated-error
        steps:
          bad: {uses: python, with: {callable: "agents:boom", isolate: process}}
        """, code=1)
    failed = [e for e in events if e["type"] == "step.failed" and e["step"] == "bad"]
    assert failed, events
    error = failed[-1]["error"]
    assert error["class"] == "permanent"
    assert error["message"] == "ValueError: isolated failure"
    assert "Traceback (most recent call last)" in error["traceback"]
    assert 'raise ValueError("isolated failure")' in error["traceback"]
    assert "storyflow" not in error["traceback"].replace(str(project.root), "")


def test_isolated_call_is_killed_by_its_timeout(project: Project) -> None:
    pidfile = project.root / "pids"
    events, _ = project.run(f"""
        apiVersion: storyflow/v1
        name: isolated-timeout
        steps:
          slow:
            uses: python
            timeout: 1s
            with: {{callable: "agents:slow", isolate: process, pidfile: "{pidfile}"}}
        """, code=1)
    failed = [e for e in events if e["type"] == "step.failed" and e["step"] == "slow"]
    assert failed and failed[-1]["error"]["class"] == "timeout", events
    assert "started" in _logs(events, "slow")
    for pid in map(int, pidfile.read_text().split()):
        assert not _alive(pid), pid
    assert os.getpid() not in map(int, pidfile.read_text().split())


def test_isolate_takes_only_process(project: Project) -> None:
    events, _ = project.run("""
        apiVersion: storyflow/v1
        name: isolated-bad
        steps:
          odd: {uses: python, with: {callable: "agents:echo", value: 1, isolate: thread}}
        """, code=1)
    failed = [e for e in events if e["type"] == "step.failed" and e["step"] == "odd"]
    assert failed and "isolate" in failed[-1]["error"]["message"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: a container's PID 1 may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_isolated_call_on_a_dask_worker(project: Project) -> None:
    pytest.importorskip("distributed")
    events, out = project.run("""
        apiVersion: storyflow/v1
        name: isolated-dask
        executor: {dask: {workers: 1}}
        agents:
          keeper: {uses: python, secrets: [SF_TEST_API_KEY]}
        steps:
          there: {agent: keeper, with: {callable: "agents:probe", me: there, isolate: process}}
          worker: {uses: python, with: {callable: "agents:probe", me: worker}}
        outputs:
          there: "{{ steps.there.output }}"
          worker: "{{ steps.worker.output }}"
        """, code=0)
    assert events[0]["executor"]["kind"] == "dask"
    outputs = project.outputs(events)
    there, worker = outputs["there"], outputs["worker"]
    assert there["pid"] != worker["pid"] and there["pid"] != os.getpid()
    assert there["api_key_env"] == there["api_key_ctx"] == _sha(DECLARED)
    assert "SOME_SERVICE_TOKEN" not in there["names"]
    # The worker was started by the run after the secrets left its environment.
    assert worker["api_key_env"] is None and worker["token_env"] == "absent"
    assert any(f"there running in {there['pid']}" in m for m in _logs(events, "there"))
    assert DECLARED not in out and UNDECLARED not in out
