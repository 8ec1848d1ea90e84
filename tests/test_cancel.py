"""`storyflow cancel` (issue #15, item 4): a second process stops a live run through the
store; the run ends ``interrupted`` with the reason, exits 130 and resumes. A run whose
process is gone is marked ``interrupted`` at once.

Real processes throughout: the run waits in a python step on a gate file, and every
step appends its name to ``log`` when it starts, so a resume's re-runs can be counted.
`cancel` has no signal path: the request reaches the holder through the store only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI_TIMEOUT_S, cli_env, run_cli
from storyflow.commands.stopping import CANCEL_POLL_S, STOP_GRACE_S
from storyflow.store import Store, read_events

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses kill -9")

AGENTS = """
import asyncio
from pathlib import Path

def note(me):
    with open("log", "a") as f:
        f.write(me + "\\n")
    return me

async def gated(me):
    note(me)
    while not Path("gate").exists():
        await asyncio.sleep(0.02)
    return me
"""

WORKFLOW = """\
apiVersion: storyflow/v1
name: gated
defaults: {retry: {attempts: 1}}
steps:
  before: {uses: python, with: {callable: "agents:note", me: before}}
  wait: {uses: python, with: {callable: "agents:gated", me: "{{ steps.before.output }}-wait"}}
  after: {uses: python, with: {callable: "agents:note", me: "{{ steps.wait.output }}-after"}}
outputs:
  story: "{{ steps.after.output }}"
"""

QUICK = """\
apiVersion: storyflow/v1
name: quick
steps:
  only: {uses: python, with: {callable: "agents:note", me: only}}
"""


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        (root / "agents.py").write_text(AGENTS.lstrip(), encoding="utf-8")
        (root / "wf.yaml").write_text(WORKFLOW, encoding="utf-8")
        (root / "quick.yaml").write_text(QUICK, encoding="utf-8")

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "storyflow", *args], cwd=self.root, text=True,
            env=cli_env(self.state), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, state_dir=self.state, cwd=self.root)

    def log(self) -> list[str]:
        path = self.root / "log"
        return path.read_text(encoding="utf-8").split() if path.exists() else []

    def waiting_run(self) -> tuple[subprocess.Popen[str], str]:
        """A run started in the background, waiting on the gate: it and its id."""
        proc = self.start("run", "wf.yaml", "--json")
        assert proc.stdout is not None
        run_id = json.loads(proc.stdout.readline())["run_id"]
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while "before-wait" not in self.log():
            assert proc.poll() is None, "the run ended too early"
            assert time.monotonic() < deadline, "timed out waiting for the step"
            time.sleep(0.02)
        return proc, run_id

    def shown(self, run_id: str) -> dict[str, Any]:
        result = self.cli("show", run_id, "--json")
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return list(read_events(self.state / "runs" / run_id / "events.jsonl"))


def valid(events: list[dict[str, Any]]) -> None:
    """Each event matches schemas/events.schema.json."""
    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[1] / "schemas" /
                         "events.schema.json").read_text(encoding="utf-8"))
    for event in events:
        jsonschema.validate(event, schema)


def finish(proc: subprocess.Popen[str], within_s: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the run did not exit within {within_s}s:\n{err}") from None


def error_of(doc: dict[str, Any]) -> dict[str, Any]:
    error = doc.get("error") or doc.get("run", {}).get("error")
    assert isinstance(error, dict), doc
    return error


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def test_cancel_stops_a_live_run_with_its_reason_and_resume_finishes_it(
    project: Project,
) -> None:
    proc, run_id = project.waiting_run()
    asked = time.monotonic()
    result = project.cli("cancel", run_id, "--reason", "wrong prompt")
    assert result.returncode == 0, result.stderr
    assert f"cancelled run {run_id}" in result.stdout
    assert f"storyflow resume {run_id}" in result.stdout
    out, err = finish(proc, within_s=5.0)
    assert proc.returncode == 130, err
    assert time.monotonic() - asked < STOP_GRACE_S

    doc = project.shown(run_id)
    assert doc["status"] == "interrupted"
    error = error_of(doc)
    assert error["class"] == "cancelled" and "wrong prompt" in error["message"]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ended = {e["type"]: e for e in lines if e["type"] in ("run.interrupted", "run.summary")}
    assert set(ended) == {"run.interrupted", "run.summary"}
    valid(lines)
    for event in ended.values():
        assert "wrong prompt" in event["error"]["message"]
    with Store(project.state) as store:  # the request left with its holder
        assert store.holder(run_id) is None

    (project.root / "gate").touch()
    resumed = project.cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert project.shown(run_id)["status"] == "succeeded"
    assert project.log() == ["before", "before-wait", "before-wait", "before-wait-after"]
    again = project.cli("cancel", run_id)
    assert again.returncode == 1
    assert "already ended" in again.stderr and "succeeded" in again.stderr


def test_cancel_last_and_the_request_is_seen_within_a_second(project: Project) -> None:
    proc, run_id = project.waiting_run()
    asked = time.monotonic()
    result = project.cli("cancel", "--last")
    took = time.monotonic() - asked
    assert result.returncode == 0, result.stderr
    _, err = finish(proc, within_s=5.0)
    assert proc.returncode == 130, err
    assert took < 1.0 + CANCEL_POLL_S + 3.0  # a CLI start-up or two, and one poll
    doc = project.shown(run_id)
    assert doc["status"] == "interrupted"
    assert error_of(doc)["message"] == "cancelled by storyflow cancel"


def test_cancel_of_an_ended_run_exits_1_and_says_so(project: Project) -> None:
    done = project.cli("run", "quick.yaml", "--json")
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout.splitlines()[0])["run_id"]
    result = project.cli("cancel", run_id, "--reason", "late")
    assert result.returncode == 1
    assert f"run {run_id} has already ended: it is succeeded" in result.stderr
    assert project.shown(run_id)["status"] == "succeeded"


def test_cancel_of_an_unknown_run_is_a_usage_error(project: Project) -> None:
    project.cli("run", "quick.yaml")
    result = project.cli("cancel", "no-such-run")
    assert result.returncode == 2
    assert project.cli("cancel").returncode == 2  # neither a run nor --last
    empty = run_cli("cancel", "--last", state_dir=project.root / "empty", cwd=project.root)
    assert empty.returncode == 2 and "no runs yet" in empty.stderr


def test_a_run_whose_holder_is_gone_is_marked_interrupted_at_once(project: Project) -> None:
    proc, run_id = project.waiting_run()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=CLI_TIMEOUT_S)
    with Store(project.state) as store:
        record = store.get_run(run_id)
        assert record is not None and record.status == "running"  # as the kill left it
    result = project.cli("cancel", run_id, "--reason", "stale")
    assert result.returncode == 0, result.stderr
    with Store(project.state) as store:
        record = store.get_run(run_id)
        assert record is not None and record.status == "interrupted"
        assert record.error is not None and "stale" in record.error["message"]
        assert store.holder(run_id) is None
    logged = project.events(run_id)
    assert [e["type"] for e in logged][-2:] == ["run.interrupted", "run.summary"]
    assert "stale" in logged[-1]["error"]["message"]
    valid(logged)
    (project.root / "gate").touch()
    resumed = project.cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert project.log() == ["before", "before-wait", "before-wait", "before-wait-after"]


PARENT = """\
apiVersion: storyflow/v1
name: parent
steps:
  chapter: {uses: workflow, with: {path: wf.yaml}}
outputs:
  story: "{{ steps.chapter.output.story }}"
"""


def test_cancelling_a_sub_workflow_run_cancels_its_top_level_run(project: Project) -> None:
    (project.root / "parent.yaml").write_text(PARENT, encoding="utf-8")
    proc = project.start("run", "parent.yaml", "--json")
    assert proc.stdout is not None
    run_id = json.loads(proc.stdout.readline())["run_id"]
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while "before-wait" not in project.log():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    with Store(project.state) as store:
        child = next(r for r in store.list_runs() if r.parent_run == run_id)
    result = project.cli("cancel", child.run_id, "--reason", "bad chapter")
    assert result.returncode == 0, result.stderr
    assert f"sub-workflow run of {run_id}: cancelling {run_id}" in result.stderr
    _, err = finish(proc, within_s=5.0)
    assert proc.returncode == 130, err
    doc = project.shown(run_id)
    assert doc["status"] == "interrupted" and "bad chapter" in error_of(doc)["message"]
    assert project.shown(child.run_id)["status"] == "interrupted"
