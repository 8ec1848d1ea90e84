"""Sub-workflows (`uses: workflow`) and human steps (`uses: human`), through the CLI.

A child run has its own id (``PARENT.step``), is linked to its parent in ``runs`` and
``show``, and resumes with it — also after a ``kill -9`` in the middle of the child.
A human step pauses a run that has no terminal (exit 3); ``resume --answer`` checks
the answer against the step's schema (exit 2 when it does not match, changing
nothing) and continues; on a terminal the step asks there.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from conftest import CLI_TIMEOUT_S, CliProject, cli_env

REPO = Path(__file__).resolve().parents[1]


def _validator(name: str) -> jsonschema.Draft202012Validator:
    text = (REPO / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8")
    return jsonschema.Draft202012Validator(json.loads(text))


RUNS = _validator("runs")

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
    if gate and me == "child-2":
        pathlib.Path(gate + ".waiting").touch()
        while not os.path.exists(gate):
            time.sleep(0.01)
    return f"{me}({text})"
'''

CHILD = """\
apiVersion: storyflow/v1
name: chapter
inputs:
  topic: {type: string}
  words: {type: integer, default: 100, minimum: 1}
steps:
  one:
    uses: python
    with: {callable: "sub_agents:step", me: child-1, text: "{{ inputs.topic }}"}
  two:
    uses: python
    with: {callable: "sub_agents:step", me: child-2, text: "{{ steps.one.output }}"}
outputs:
  text: "{{ steps.two.output }} x{{ inputs.words }}"
"""

PARENT = """\
apiVersion: storyflow/v1
name: book
steps:
  plan: {uses: python, with: {callable: "sub_agents:step", me: plan, text: "sea"}}
  chapter:
    uses: workflow
    with: {path: chapter.yaml, inputs: {topic: "{{ steps.plan.output }}"}}
  finish: {uses: template, with: {template: "book: {{ steps.chapter.output.text }}"}}
outputs:
  book: "{{ steps.finish.output }}"
"""


@pytest.fixture
def env(tmp_path: Path) -> CliProject:
    e = CliProject(tmp_path, "sub_agents", AGENTS)
    e.write("chapter.yaml", CHILD)
    return e


# --- sub-workflows ------------------------------------------------------------------------


def test_a_child_run_is_linked_to_its_parent(env: CliProject) -> None:
    events = env.events("run", env.write("book.yaml", PARENT))
    run_id = events[0]["run_id"]
    assert events[-1]["outputs"]["book"] == "book: child-2(child-1(plan(sea))) x100"
    child_id = f"{run_id}.chapter"
    logs = [e["message"] for e in events if e["type"] == "step.log"]
    assert f"child run {child_id} starts" in logs

    runs = json.loads(env.cli("runs", "--json").stdout)  # top-level runs, children nested
    RUNS.validate(runs)
    assert [r["run_id"] for r in runs] == [run_id]
    assert [c["run_id"] for c in runs[0]["children"]] == [child_id]
    every = json.loads(env.cli("runs", "--all", "--json").stdout)  # flat
    RUNS.validate(every)
    by_id = {r["run_id"]: r for r in every}
    assert by_id[child_id]["parent_run"] == run_id
    assert by_id[run_id]["parent_run"] is None
    assert "PARENT" in env.cli("runs", "--all").stdout
    assert f"  └ {child_id}" in env.cli("runs").stdout

    parent = env.show(run_id)
    assert parent["children"] == [{"step": "chapter", "run_id": child_id, "status": "succeeded"}]
    child = env.show(child_id)
    assert (child["parent_run"], child["parent_step"]) == (run_id, "chapter")
    assert child["outputs"]["text"] == "child-2(child-1(plan(sea))) x100"
    # The full parent id still names the parent, not its child.
    assert env.show(run_id)["workflow"] == "book"
    # A child is resumed through its parent.
    result = env.cli("resume", child_id)
    assert result.returncode == 2 and f"storyflow resume {run_id}" in result.stderr


def test_child_inputs_are_checked_by_the_child_schema(env: CliProject) -> None:
    wf = env.write("bad.yaml", PARENT.replace(
        '{topic: "{{ steps.plan.output }}"}', '{topic: "x", words: 0}'))
    result = env.cli("run", wf, "--no-progress")
    assert result.returncode == 1
    assert "words" in result.stdout and "minimum" in result.stdout + result.stderr


def test_a_failed_child_is_resumed_with_its_parent(env: CliProject) -> None:
    wf = env.write("book.yaml", PARENT)
    events = env.events("run", wf, env={"SF_FAIL": "child-2"}, code=1)
    run_id = events[0]["run_id"]
    assert env.executions() == ["plan", "child-1", "child-2"]
    assert env.show(f"{run_id}.chapter")["status"] == "failed"
    resumed = env.events("resume", run_id)
    assert resumed[-1]["outputs"]["book"] == "book: child-2(child-1(plan(sea))) x100"
    assert env.executions() == ["child-2"]  # plan and the child's first step are kept
    assert env.show(f"{run_id}.chapter")["status"] == "succeeded"


def test_kill_9_inside_a_child_run_then_resume_the_parent(env: CliProject) -> None:
    wf = env.write("book.yaml", PARENT)
    gate = env.root / "gate"
    run_id = env.kill_at_gate(wf, gate)
    assert env.executions() == ["plan", "child-1", "child-2"]
    resumed = env.events("resume", run_id)
    assert resumed[-1]["status"] == "succeeded"
    assert resumed[-1]["outputs"]["book"] == "book: child-2(child-1(plan(sea))) x100"
    assert env.executions() == ["child-2"]


def test_a_finished_child_is_not_run_again(env: CliProject) -> None:
    events = env.events("run", env.write("book.yaml", PARENT))
    env.executions()
    resumed = env.events("resume", events[0]["run_id"], "--from", "chapter")
    assert env.executions() == []
    assert any("already succeeded" in e.get("message", "") for e in resumed)


def test_a_workflow_that_runs_itself_fails_clearly(env: CliProject) -> None:
    # Directly: found when the file is validated, with its line.
    wf = env.write("loop.yaml", """\
        apiVersion: storyflow/v1
        name: ouroboros
        steps:
          again: {uses: workflow, with: {path: loop.yaml}}
        """)
    result = env.cli("run", wf, "--no-progress")
    assert result.returncode == 2
    assert "loop.yaml:4:" in result.stderr and "would run inside itself" in result.stderr
    # Through another file: found when the grandchild would start.
    env.write("a.yaml", """\
        apiVersion: storyflow/v1
        name: a
        steps:
          b: {uses: workflow, with: {path: b.yaml}}
        """)
    env.write("b.yaml", """\
        apiVersion: storyflow/v1
        name: b
        steps:
          a: {uses: workflow, with: {path: a.yaml}}
        """)
    result = env.cli("run", env.root / "a.yaml", "--no-progress")
    assert result.returncode == 1
    assert "would run inside itself" in result.stdout


def test_a_missing_child_file_is_a_validation_error(env: CliProject) -> None:
    wf = env.write("lost.yaml", """\
        apiVersion: storyflow/v1
        name: lost
        steps:
          sub: {uses: workflow, with: {path: chapters/one.yaml}}
          ask: {uses: human, with: {schema: {type: boolean}}}
          vote: {uses: human, with: {question: "?", schema: {type: yes}}}
          plot: {uses: template, with: {template: x}, output_schema: {type: [1]}}
        """)
    result = env.cli("validate", wf)
    assert result.returncode == 2
    assert "lost.yaml:4:38:" in result.stdout + result.stderr
    assert "workflow file 'chapters/one.yaml' not found" in result.stdout + result.stderr
    assert "step 'ask' (human) needs a question" in result.stdout + result.stderr
    assert "lost.yaml:6:" in result.stdout + result.stderr
    assert "this answer schema is not a valid JSON Schema" in result.stdout + result.stderr
    assert "lost.yaml:7:" in result.stdout + result.stderr
    assert "this output_schema is not a valid JSON Schema" in result.stdout + result.stderr


def test_children_of_a_map_with_a_failing_row(env: CliProject) -> None:
    wf = env.write("batch.yaml", """\
        apiVersion: storyflow/v1
        name: batch
        steps:
          stories:
            for_each: ["a", "b", "c"]
            as: topic
            max_parallel: 2
            allow_failure: true
            uses: workflow
            with: {path: chapter.yaml, inputs: {topic: "{{ topic }}"}}
        outputs:
          all: "{{ steps.stories.output }}"
        """)
    events = env.events("run", wf, env={"SF_FAIL": "never"})
    run_id = events[0]["run_id"]
    children = env.show(run_id)["children"]
    assert [c["run_id"] for c in children] == [f"{run_id}.stories-{i}" for i in range(3)]


# --- human steps ----------------------------------------------------------------------------


HUMAN = """\
apiVersion: storyflow/v1
name: approval
steps:
  outline: {uses: template, with: {template: "three acts"}}
  aside: {uses: python, with: {callable: "sub_agents:step", me: aside}}
  approve:
    uses: human
    with:
      question: "Approve {{ steps.outline.output }}?"
      schema:
        type: object
        required: [ok]
        properties: {ok: {type: boolean}, note: {type: string}}
  title:
    uses: human
    with: {question: "A title?"}
  write:
    uses: template
    with:
      template: "{{ steps.title.output }}: {{ steps.approve.output.ok }}
        {{- ' ' }}{{ steps.approve.output.note }}"
outputs:
  text: "{{ steps.write.output }}"
"""


def test_a_human_step_pauses_the_run_then_answers_continue_it(env: CliProject) -> None:
    wf = env.write("human.yaml", HUMAN)
    result = env.cli("run", wf, "--no-progress")
    assert result.returncode == 3, result.stderr
    run_id = result.stdout.splitlines()[0].rsplit(" ", 1)[-1]
    assert "Approve three acts?" in result.stderr
    assert f"storyflow resume {run_id} --answer title=... --answer approve=@answer.json" \
        in result.stderr
    assert env.executions() == ["aside"]  # the independent branch ran meanwhile
    doc = env.show(run_id)
    assert doc["status"] == "waiting"
    assert {q["step"] for q in doc["waiting"]} == {"approve", "title"}
    statuses = {s["id"]: s["status"] for s in doc["steps"]}
    assert statuses == {"outline": "succeeded", "aside": "succeeded", "approve": "pending",
                        "title": "pending", "write": "pending"}

    # An answer that fails the schema is exit 2 and changes nothing.
    before = env.show(run_id)
    bad = env.cli("resume", run_id, "--answer", 'approve={"ok": "yes"}', "--answer", "title=T")
    assert bad.returncode == 2
    assert "approve" in bad.stderr and "boolean" in bad.stderr
    assert env.show(run_id) == before
    assert env.cli("resume", run_id, "--answer", "nope=1").returncode == 2
    assert env.cli("resume", run_id, "--answer", "approve").returncode == 2
    assert env.cli("resume", run_id, "--answer", "approve=@missing.json").returncode == 2

    (env.root / "answer.json").write_text('{"ok": true, "note": "go"}\n', encoding="utf-8")
    events = env.events("resume", run_id, "--answer", "approve=@answer.json",
                        "--answer", "title=The Keeper")
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["outputs"]["text"] == "The Keeper: True go"
    assert env.executions() == []  # aside was kept
    # A run that is no longer waiting takes no answers.
    again = env.cli("resume", run_id, "--answer", "title=X")
    assert again.returncode == 2 and "not waiting" in again.stderr


def test_json_mode_reports_the_wait(env: CliProject) -> None:
    events = env.events("run", env.write("human.yaml", HUMAN), code=3)
    waiting = [e for e in events if e["type"] == "step.waiting"]
    assert {e["answer_step"] for e in waiting} == {"approve", "title"}
    assert events[-1]["type"] == "run.summary" and events[-1]["status"] == "waiting"
    assert {q["step"] for q in events[-1]["waiting"]} == {"approve", "title"}


def test_a_question_inside_a_child_run_is_answered_through_the_parent(env: CliProject) -> None:
    env.write("ask.yaml", """\
        apiVersion: storyflow/v1
        name: ask
        steps:
          name: {uses: human, with: {question: "Hero's name?"}}
        outputs:
          hero: "{{ steps.name.output }}"
        """)
    wf = env.write("outer.yaml", """\
        apiVersion: storyflow/v1
        name: outer
        steps:
          cast: {uses: workflow, with: {path: ask.yaml}}
        outputs:
          hero: "{{ steps.cast.output.hero }}"
        """)
    result = env.cli("run", wf, "--no-progress")
    assert result.returncode == 3
    run_id = result.stdout.splitlines()[0].rsplit(" ", 1)[-1]
    assert "Hero's name?" in result.stderr
    events = env.events("resume", run_id, "--answer", "name=Ada")
    assert events[-1]["outputs"]["hero"] == "Ada"


@pytest.mark.parametrize("display", ["--no-progress", "--live"])
def test_on_a_terminal_the_question_is_asked_there(env: CliProject, display: str) -> None:
    wf = env.write("tty.yaml", """\
        apiVersion: storyflow/v1
        name: tty
        steps:
          approve: {uses: human, with: {question: "Ship it?", schema: {type: boolean}}}
        outputs:
          shipped: "{{ steps.approve.output }}"
        """)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "storyflow", "run", str(wf),
         *([display] if display != "--live" else [])],
        cwd=env.root, stdin=slave, stdout=slave, stderr=slave,
        env=cli_env(env.state, {"TERM": "xterm", "COLUMNS": "100"}), close_fds=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while marker not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk

    try:
        read_until(b"[y/n]")
        assert b"Ship it?" in seen
        os.write(master, b"maybe\r")  # not a yes/no: asked again
        time.sleep(0)  # no wait: the prompt loops on its own
        os.write(master, b"y\r")
        read_until(b"summary:")
        assert proc.wait(timeout=CLI_TIMEOUT_S) == 0, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert b"succeeded" in seen


def test_an_edited_child_reruns_only_what_changed(env: CliProject) -> None:
    events = env.events("run", env.write("book.yaml", PARENT))
    run_id = events[0]["run_id"]
    env.executions()
    env.write("chapter.yaml", CHILD.replace('text: "{{ steps.one.output }}"',
                                            'text: "{{ steps.one.output }}!"'))
    resumed = env.events("resume", run_id, "--from", "chapter")
    assert resumed[-1]["outputs"]["book"] == "book: child-2(child-1(plan(sea))!) x100"
    assert env.executions() == ["child-2"]  # the child's first step was kept
