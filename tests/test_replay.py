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


def tick(me, text=""):
    """The next of $SF_TICKS on each call (counted in ticks.txt): equal requests,
    different answers; "fail" raises."""
    step(me, text)
    n = int(open("ticks.txt").read()) if os.path.exists("ticks.txt") else 0
    with open("ticks.txt", "w") as fh:
        fh.write(str(n + 1))
    values = os.environ.get("SF_TICKS", "0").split(",")
    value = values[min(n, len(values) - 1)]
    if value == "fail":
        raise ValueError(f"{me} broke on call {n + 1}")
    return int(value)
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


def test_each_instance_is_answered_with_its_own_recorded_output(project: CliProject) -> None:
    # Every iteration asks the same, and got another score: best_by picked iteration 2.
    # A replay must hand each iteration its own answer, so it picks the same one.
    project.write("loopy.yaml", """\
        apiVersion: storyflow/v1
        name: loopy
        steps:
          polish:
            loop:
              max_iterations: 3
              best_by: "steps.score.output"
              steps:
                score:
                  uses: python
                  with: {callable: "ra:tick", me: score}
          draft:
            needs: [polish]
            for_each: [same, same]
            max_parallel: 1
            uses: python
            with: {callable: "ra:tick", me: "draft"}
          end:
            needs: [polish, draft]
            uses: python
            with: {callable: "ra:step", me: end,
                   text: "{{ steps.polish.output.score }} {{ steps.draft.output }}"}
        outputs:
          end: "{{ steps.end.output }}"
        """)
    events = project.events("run", "loopy.yaml", env={"SF_TICKS": "5,9,2,7,3"})
    source = events[0]["run_id"]
    assert events[-1]["outputs"]["end"] == "end(9 [7, 3])"
    ran(project)
    (project.root / "ticks.txt").unlink()

    events = project.events("replay", source, "--strict", env={"SF_TICKS": "1"})
    assert ran(project) == []
    scores = [e["score"] for e in events if e["type"] == "loop.iterated"]
    assert scores == [5, 9, 2]
    assert events[-1]["outputs"]["end"] == "end(9 [7, 3])"
    assert events[-1]["replay"]["answered"] == 6 and events[-1]["replay"]["missed"] == 0


def test_a_call_that_failed_in_the_record_runs_live(project: CliProject) -> None:
    # Both items ask the same; the second failed. Its call is not answered by the
    # first item's output: it runs again, live.
    project.write("flaky.yaml", """\
        apiVersion: storyflow/v1
        name: flaky
        steps:
          draft:
            for_each: [same, same]
            max_parallel: 1
            uses: python
            with: {callable: "ra:tick", me: draft}
        """)
    events = project.events("run", "flaky.yaml", env={"SF_TICKS": "4,fail,6"}, code=1)
    source = events[0]["run_id"]
    ran(project)
    events = project.events("replay", source, env={"SF_TICKS": "4,fail,6"})
    assert ran(project) == ["draft"]
    assert events[-1]["replay"]["answered"] == 1 and events[-1]["replay"]["live"] == 1
    assert events[-1]["status"] == "succeeded"

    result = project.cli("replay", source, "--strict", "--no-progress")
    assert result.returncode == 1
    assert ran(project) == []
    new = json.loads(project.cli("runs", "--json").stdout)[0]["run_id"]
    item = {s["id"]: s for s in project.show(new)["steps"]}["draft[1]"]
    assert item["error"]["class"] == "replay_miss"
    assert "step draft[1] made this call there and it did not succeed (failed)" in (
        item["error"]["message"])
    assert f"storyflow show {source} --step 'draft[1]'" in item["error"]["hint"]  # quoted


CHILD = """\
    apiVersion: storyflow/v1
    name: child
    inputs:
      tone: {type: string}
    steps:
      setting:
        uses: python
        with: {callable: "ra:step", me: setting, text: fixed}
      voice:
        uses: python
        with: {callable: "ra:step", me: voice, text: "{{ inputs.tone }}"}
    outputs:
      text: "{{ steps.setting.output }} {{ steps.voice.output }}"
    """

PARENT = """\
    apiVersion: storyflow/v1
    name: parent
    inputs:
      tone: {type: string, default: calm}
    steps:
      chapter:
        uses: workflow
        with: {path: child.yaml, inputs: {tone: "{{ inputs.tone }}"}}
    outputs:
      text: "{{ steps.chapter.output.text }}"
    """


def test_a_sub_workflow_replays_inside_its_child_run(project: CliProject) -> None:
    project.write("child.yaml", CHILD)
    project.write("parent.yaml", PARENT)
    source = project.events("run", "parent.yaml")[0]["run_id"]
    ran(project)
    events = project.events("replay", source)
    assert ran(project) == []
    assert events[-1]["replay"]["answered"] == 2  # the child's two calls

    # A change inside the child file is replayed, not hidden behind the step's output.
    project.write("child.yaml", CHILD.replace("text: fixed", "text: moved"))
    events = project.events("replay", source)
    assert ran(project) == ["setting"]
    assert events[-1]["outputs"]["text"] == "setting(moved) voice(calm)"
    assert events[-1]["replay"] == {"source": source, "answered": 1, "live": 1, "missed": 0}

    result = project.cli("replay", source, "--strict", "--no-progress")
    assert result.returncode == 1 and ran(project) == []
    new = json.loads(project.cli("runs", "--json").stdout)[0]["run_id"]
    chapter = {s["id"]: s for s in project.show(new)["steps"]}["chapter"]
    assert chapter["error"]["class"] == "replay_miss"
    assert f"replay of run {source}.chapter" in chapter["error"]["message"]
    assert "inputs.text differs: recorded 'fixed', now 'moved'" in chapter["error"]["message"]


def test_a_cached_step_is_answered_once_its_cache_entry_is_gone(project: CliProject) -> None:
    project.write("flow.yaml", FLOW.replace("  plan:\n", "  plan:\n    cache: true\n"))
    project.events("run", "flow.yaml")
    source = project.events("run", "flow.yaml")[0]["run_id"]  # plan: cached
    ran(project)
    assert project.cli("gc", "--keep", "1").returncode == 0  # the cache entry goes too
    events = project.events("replay", source, "--strict")
    assert ran(project) == []
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["replay"]["missed"] == 0 and events[-1]["replay"]["live"] == 0


def test_strict_misses_do_not_open_the_agents_breaker(project: CliProject) -> None:
    breaker = FLOW.replace(
        'py: {uses: python, with: {callable: "ra:step"}}',
        'py: {uses: python, with: {callable: "ra:step"}, breaker: {failures: 1, cooldown: 60s}}')
    project.write("flow.yaml", breaker)
    source = project.events("run", "flow.yaml")[0]["run_id"]
    ran(project)
    # draft misses (a changed prompt); plan, before it, and a new step after it ask
    # what was recorded: the miss is the replay's, not the agent's failure.
    project.write("flow.yaml", breaker.replace("Write it", "Write it darker").replace(
        "outputs:\n", "  again:\n    needs: [draft]\n    join: all_done\n    agent: py\n"
        "    with: {me: plan, text: \"{{ inputs.tone }}\"}\noutputs:\n"))
    project.events("replay", source, "--strict", code=1)
    new = json.loads(project.cli("runs", "--json").stdout)[0]["run_id"]
    steps = {s["id"]: s for s in project.show(new)["steps"]}
    assert steps["draft"]["error"]["class"] == "replay_miss"
    assert steps["again"]["status"] == "succeeded", steps["again"]
    assert ran(project) == []


def test_strict_miss_messages(project: CliProject) -> None:
    project.write("fb.yaml", """\
        apiVersion: storyflow/v1
        name: fb
        agents:
          py: {uses: python, with: {callable: "ra:tick"}}
          backup: {uses: template, with: {template: "backup says hi"}}
        steps:
          prim:
            agent: py
            fallback: backup
            with: {me: prim}
        """)
    source = project.events("run", "fb.yaml", env={"SF_TICKS": "fail"})[0]["run_id"]
    project.write("more.yaml", (project.root / "fb.yaml").read_text() + (
        "  extra:\n    uses: template\n    with: {template: new}\n"))
    result = project.cli("replay", source, "--file", "more.yaml", "--strict", "--no-progress")
    out = result.stdout + result.stderr
    # The primary's call failed in the record (a fallback served): the first
    # difference is the kind; a step the recorded run did not have names no `show`.
    assert "uses differs: recorded 'template', now 'python'" in out
    assert "the recorded run made no call for step extra" in out
    assert f"storyflow show {source} --step extra" not in out


def test_a_replay_of_a_fork_replays_the_child_its_parent_made(project: CliProject) -> None:
    project.write("child.yaml", CHILD)
    project.write("parent.yaml", PARENT)
    first = project.events("run", "parent.yaml")[0]["run_id"]
    kept = project.events("fork", first)[0]["run_id"]  # chapter kept: no child of its own
    ran(project)
    project.write("child.yaml", CHILD.replace("text: fixed", "text: moved"))
    events = project.events("replay", kept)
    assert ran(project) == ["setting"]  # replayed inside the first run's child
    assert events[-1]["outputs"]["text"] == "setting(moved) voice(calm)"
    assert events[-1]["replay"] == {"source": kept, "answered": 1, "live": 1, "missed": 0}


def test_strict_replay_exits_1_when_a_miss_was_allowed_to_fail(project: CliProject) -> None:
    """CI relies on the exit code: a miss on an `allow_failure` step lets the run
    succeed, yet `replay --strict` still exits 1 and says why."""
    flow = FLOW.replace("  draft:\n    agent: py\n",
                        "  draft:\n    agent: py\n    allow_failure: true\n")
    assert "allow_failure" in flow
    project.write("flow.yaml", flow)
    source = project.events("run", "flow.yaml")[0]["run_id"]
    project.write("flow.yaml", flow.replace("Write it", "Write it darker"))
    result = project.cli("replay", source, "--strict", "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "replay --strict: 1 call had no recorded answer" in result.stderr
