"""`storyflow replay`: a new run whose agent calls are answered from a recorded run.

Through the CLI, against the fake OpenAI-compatible server (which counts the requests
it receives) and python agents that log each execution.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CliProject
from llm_server import FakeLLM
from test_llm_env import answer

REPO = Path(__file__).resolve().parents[1]

AGENTS = '''\
import os


def step(me, text=""):
    log = os.environ.get("SF_EXEC_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(me + "\\n")
    return f"{me}({text})"
'''

FLOW = """\
apiVersion: storyflow/v1
name: replayed
inputs:
  tone: {type: string, default: calm}
agents:
  py: {uses: python, with: {callable: "ra:step"}}
steps:
  plan:
    agent: py
    with: {me: plan, text: "{{ inputs.tone }}"}
  draft:
    agent: py
    with: {me: draft, text: "Write it {{ steps.plan.output }}"}
  shout:
    uses: command
    with: {run: ["sh", "-c", "echo ran >> exec.log; echo loud"]}
  title:
    needs: [draft, shout]
    uses: template
    with: {template: "{{ steps.draft.output }} / {{ steps.shout.output }}"}
outputs:
  title: "{{ steps.title.output }}"
"""


@pytest.fixture(scope="module")
def model() -> Iterator[FakeLLM]:
    with FakeLLM(answer) as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> CliProject:
    p = CliProject(tmp_path, "ra", AGENTS)
    p.write("flow.yaml", FLOW)
    return p


def ran(p: CliProject) -> list[str]:
    if not p.log.exists():
        return []
    names = p.log.read_text(encoding="utf-8").split()
    p.log.unlink()
    return names


def test_replay_of_the_llm_flagship_sends_no_request(tmp_path: Path, model: FakeLLM) -> None:
    shutil.copytree(REPO / "workflows", tmp_path / "workflows")
    p = CliProject(tmp_path, "unused", "")
    env = {"STORYFLOW_LLM_BASE_URL": model.url, "OPENAI_API_KEY": "sk-replay-test-key"}
    events = p.events("run", "workflows/short-story.yaml", "--env", "llm", "--no-cache", env=env)
    source = events[0]["run_id"]
    asked = len(model.requests)
    assert asked > 10

    result = p.cli("replay", source, "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    assert len(model.requests) == asked  # not one request reached the server
    new = json.loads(p.cli("runs", "--json").stdout)[0]["run_id"]
    assert new != source
    assert f"from run {source}, 0 live" in result.stderr
    assert (p.state / "runs" / new / "story.md").read_bytes() == (
        p.state / "runs" / source / "story.md").read_bytes()
    doc = p.show(new)
    assert doc["forked_from"] == source and doc["fork"]["kind"] == "replay"


def test_replay_answers_python_commands_and_templates_from_the_record(
    project: CliProject,
) -> None:
    source = project.events("run", "flow.yaml")[0]["run_id"]
    assert sorted(ran(project)) == ["draft", "plan", "ran"]
    events = project.events("replay", source)
    assert ran(project) == []  # no python call, no subprocess
    summary = events[-1]
    assert summary["type"] == "run.summary" and summary["status"] == "succeeded"
    assert summary["replay"] == {"source": source, "answered": 4, "live": 0, "missed": 0}
    assert summary["outputs"]["title"] == "draft(Write it plan(calm)) / loud"


def test_a_changed_template_runs_only_that_step_live(project: CliProject) -> None:
    source = project.events("run", "flow.yaml")[0]["run_id"]
    ran(project)
    project.write("flow.yaml", FLOW.replace("Write it", "Write it darker"))
    events = project.events("replay", source)
    assert ran(project) == ["draft"]
    summary = events[-1]
    # plan and shout answered; draft changed, and so did what title renders from it.
    assert summary["replay"]["answered"] == 2 and summary["replay"]["live"] == 2
    assert summary["outputs"]["title"] == "draft(Write it darker plan(calm)) / loud"
    # The replay compares with its source: exactly the steps the change reached differ.
    new = summary["run_id"]
    diff = project.cli("diff", source, new, "--format", "json")
    assert diff.returncode == 0, diff.stderr
    assert json.loads(diff.stdout)["summary"]["outputs_differ"] == ["draft", "title"]


def test_strict_replay_fails_a_changed_call_as_replay_miss(project: CliProject) -> None:
    source = project.events("run", "flow.yaml")[0]["run_id"]
    ran(project)
    project.write("flow.yaml", FLOW.replace("Write it", "Write it darker"))
    result = project.cli("replay", source, "--strict", "--no-progress")
    assert result.returncode == 1, result.stderr
    assert ran(project) == []
    new = json.loads(project.cli("runs", "--json").stdout)[0]["run_id"]
    draft = {s["id"]: s for s in project.show(new)["steps"]}["draft"]
    assert draft["status"] == "failed"
    assert draft["error"]["class"] == "replay_miss"
    message = draft["error"]["message"]
    assert f"replay of run {source}" in message
    assert "inputs.text differs" in message
    assert "'Write it plan(calm)'" in message and "'Write it darker plan(calm)'" in message
    assert "missed" in result.stderr


def test_a_resumed_replay_goes_on_answering_from_the_record(project: CliProject) -> None:
    source = project.events("run", "flow.yaml")[0]["run_id"]
    ran(project)
    project.write("flow.yaml", FLOW.replace("Write it", "Write it darker"))
    assert project.cli("replay", source, "--strict", "--no-progress").returncode == 1
    new = json.loads(project.cli("runs", "--json").stdout)[0]["run_id"]
    project.write("flow.yaml", FLOW)  # back as recorded: the missed call now matches
    events = project.events("resume", new)
    assert ran(project) == []
    assert events[-1]["replay"]["answered"] == 4 and events[-1]["replay"]["missed"] == 1


def test_replay_of_an_unknown_run(project: CliProject) -> None:
    result = project.cli("replay", "nope")
    assert result.returncode == 2 and "no run matches 'nope'" in result.stderr
