"""`storyflow fork`: a new run that keeps what a change does not reach, through the CLI.

Agents append their name to an execution log, so each test sees exactly which steps
ran in the fork; the parent's `show --json` is compared before and after to hold that
a fork never modifies it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import CliProject

REPO = Path(__file__).resolve().parents[1]

AGENTS = '''\
import os


def step(me, text=""):
    log = os.environ.get("SF_EXEC_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(me + "\\n")
    if os.environ.get("SF_FAIL") == me:
        raise ValueError(f"{me} broke")
    return f"{me}({text})"
'''

FLOW = """\
apiVersion: storyflow/v1
name: forky
inputs:
  tone: {type: string, default: wistful}
  premise: {type: string, default: a map}
agents:
  py: {uses: python, with: {callable: "fa:step"}}
steps:
  mood:
    agent: py
    with: {me: mood, text: "{{ inputs.tone }}"}
  plot:
    agent: py
    with: {me: plot, text: "{{ inputs.premise }}"}
  scene:
    agent: py
    with: {me: scene, text: "{{ steps.mood.output }}"}
  cast:
    agent: py
    with: {me: cast, text: "{{ steps.plot.output }}"}
  editor:
    agent: py
    with: {me: editor, text: "{{ steps.scene.output }} {{ steps.cast.output }}"}
  title:
    agent: py
    with: {me: title, text: "{{ steps.editor.output }}"}
"""


CHILD = """\
apiVersion: storyflow/v1
name: child
inputs:
  tone: {type: string}
agents:
  py: {uses: python, with: {callable: "fa:step"}}
steps:
  setting:
    agent: py
    with: {me: setting, text: fixed}
  voice:
    agent: py
    with: {me: voice, text: "{{ inputs.tone }}"}
outputs:
  text: "{{ steps.setting.output }} {{ steps.voice.output }}"
"""
"""A sub-workflow whose `setting` reads nothing and whose `voice` reads the tone."""


@pytest.fixture
def project(tmp_path: Path) -> CliProject:
    p = CliProject(tmp_path, "fa", AGENTS)
    p.write("flow.yaml", FLOW)
    return p


def ran(p: CliProject) -> list[str]:
    """The agents executed since the last call (the log is emptied)."""
    if not p.log.exists():
        return []
    names = p.log.read_text(encoding="utf-8").split()
    p.log.unlink()
    return names


def run_id_of(events: list[dict[str, Any]]) -> str:
    return str(events[0]["run_id"])


def steps_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in doc["steps"]}


def test_fork_with_another_input_reruns_only_what_reads_it(project: CliProject) -> None:
    parent = run_id_of(project.events("run", "flow.yaml"))
    assert sorted(ran(project)) == ["cast", "editor", "mood", "plot", "scene", "title"]
    before = project.show(parent)

    result = project.cli("fork", parent, "-i", "tone=eerie", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert sorted(ran(project)) == ["editor", "mood", "scene", "title"]
    # The plan, before anything ran: what is kept and why the rest runs.
    assert f"forking run {parent} (forky) as run " in result.stderr
    assert "inputs changed: tone='eerie'" in result.stderr
    assert "kept: 2 steps" in result.stderr
    assert "mood (input changed: tone)" in result.stderr
    assert "scene, editor, title (after mood)" in result.stderr

    child = project.cli("runs", "--json").stdout
    fork_id = json.loads(child)[0]["run_id"]
    doc = project.show(fork_id)
    steps = steps_of(doc)
    assert steps["plot"]["status"] == "succeeded"
    assert steps["plot"].get("forked_from") == parent
    assert steps["mood"].get("forked_from") is None
    assert steps["title"]["output"] == "title(editor(scene(mood(eerie)) cast(plot(a map))))"
    assert doc.get("forked_from") == parent
    assert project.show(parent) == before  # the parent is never modified

    # Events carry the lineage; a kept step says where it came from.
    events = [json.loads(line) for line in
              (project.state / "runs" / fork_id / "events.jsonl").read_text().splitlines()]
    started = events[0]
    assert started["type"] == "run.started" and started["forked_from"] == parent
    assert started["fork"]["inputs"] == ["tone"]
    kept = [e for e in events if e["type"] == "step.kept"]
    assert {e["step"] for e in kept} == {"plot", "cast"}
    assert all(e["forked_from"] == parent for e in kept)


def test_fork_from_a_step_keeps_everything_upstream(project: CliProject) -> None:
    parent = run_id_of(project.events("run", "flow.yaml"))
    ran(project)
    events = project.events("fork", parent, "--from", "editor")
    assert sorted(ran(project)) == ["editor", "title"]
    fork_id = run_id_of(events)
    assert fork_id != parent
    kept = {e["step"] for e in events if e["type"] == "step.kept"}
    assert kept == {"mood", "plot", "scene", "cast"}
    assert events[-1]["type"] == "run.summary" and events[-1]["status"] == "succeeded"


def test_fork_of_a_failed_run_runs_what_did_not_finish(project: CliProject) -> None:
    events = project.events("run", "flow.yaml", env={"SF_FAIL": "scene"}, code=1)
    parent = run_id_of(events)
    ran(project)
    before = project.show(parent)
    result = project.cli("fork", parent, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "run: scene, editor, title (did not finish in the parent)" in result.stderr
    assert sorted(ran(project)) == ["editor", "scene", "title"]
    # The parent, resumed afterwards, is its own run: the fork does not change.
    fork_id = json.loads(project.cli("runs", "--json").stdout)[0]["run_id"]
    fork_doc = project.show(fork_id)
    assert project.show(parent) == before
    assert project.cli("resume", parent, "--no-progress").returncode == 0
    assert sorted(ran(project)) == ["editor", "scene", "title"]
    assert project.show(fork_id) == fork_doc
    assert project.show(parent)["status"] == "succeeded"


def test_fork_of_an_interrupted_run(project: CliProject) -> None:
    flow = project.write("gated.yaml", FLOW.replace("name: forky", "name: gated").replace(
        "{me: editor,", "{me: gated,"))
    gated_agents = (project.root / "fa.py").read_text() + '''

import pathlib
import time


def gated(me, text=""):
    gate = os.environ.get("SF_GATE")
    if gate:
        pathlib.Path(gate + ".waiting").touch()
        while not os.path.exists(gate):
            time.sleep(0.01)
    return step(me, text)
'''
    (project.root / "fa.py").write_text(gated_agents)
    flow.write_text(flow.read_text().replace(
        "  editor:\n    agent: py", "  editor:\n    uses: python\n"
        "    with: {callable: \"fa:gated\", me: gated, text: \"{{ steps.scene.output }}\"}"
    ).replace('\n    with: {me: gated, text: "{{ steps.scene.output }} {{ steps.cast.output }}"}',
              ""))
    parent = project.kill_at_gate(flow, project.root / "gate")
    ran(project)
    assert project.show(parent)["status"] == "interrupted"
    result = project.cli("fork", parent, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert sorted(ran(project)) == ["gated", "title"]


def test_maps_and_loops_fork_by_instance(project: CliProject) -> None:
    project.write("mapped.yaml", """\
        apiVersion: storyflow/v1
        name: mapped
        inputs:
          scenes: {type: array, default: [dawn, noon, dusk]}
          tone: {type: string, default: calm}
        agents:
          py: {uses: python, with: {callable: "fa:step"}}
        steps:
          draft:
            for_each: "{{ inputs.scenes }}"
            agent: py
            with: {me: "draft-{{ item }}", text: "{{ item }}"}
          polish:
            loop:
              max_iterations: 2
              steps:
                revise:
                  agent: py
                  with: {me: "revise-{{ loop.iteration }}", text: "{{ inputs.tone }}"}
          end:
            needs: [draft, polish]
            agent: py
            with: {me: end, text: "{{ steps.draft.output | join(',') }}"}
        """)
    parent = run_id_of(project.events("run", "mapped.yaml"))
    ran(project)
    events = project.events("fork", parent, "-i", 'scenes=["dawn", "noon", "night"]')
    assert sorted(ran(project)) == ["draft-night", "end"]
    fork_id = run_id_of(events)
    steps = steps_of(project.show(fork_id))
    assert steps["draft[0]"]["forked_from"] == parent
    assert steps["draft[2]"].get("forked_from") is None
    # The loop was kept whole: its iterations were copied too.
    assert steps["polish"]["forked_from"] == parent
    assert steps["polish#2.revise"]["forked_from"] == parent
    assert steps["polish#2.revise"]["output"] == "revise-2(calm)"

    project.events("fork", parent, "-i", "tone=bright")
    assert sorted(ran(project)) == ["revise-1", "revise-2"]  # `end` reads no loop output


def test_a_sub_workflow_step_forks_its_child_run(project: CliProject) -> None:
    project.write("child.yaml", CHILD)
    project.write("parent.yaml", """\
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
        """)
    parent = run_id_of(project.events("run", "parent.yaml"))
    ran(project)
    events = project.events("fork", parent, "-i", "tone=grim")
    assert ran(project) == ["voice"]  # the child's `setting` was kept from the old child
    fork_id = run_id_of(events)
    assert events[-1]["outputs"]["text"] == "setting(fixed) voice(grim)"
    child = project.show(f"{fork_id}.chapter")
    assert child["parent_run"] == fork_id
    assert child["forked_from"] == f"{parent}.chapter"
    assert steps_of(child)["setting"]["forked_from"] == f"{parent}.chapter"


def test_the_flagship_forks_with_another_tone(tmp_path: Path) -> None:
    shutil.copytree(REPO / "workflows", tmp_path / "workflows")
    p = CliProject(tmp_path, "unused", "")
    parent = run_id_of(p.events("run", "workflows/short-story.yaml"))
    events = p.events("fork", parent, "-i", "tone=eerie")
    kept = {e["step"] for e in events if e["type"] == "step.kept"}
    assert "character" in kept  # reads no tone
    started = {e["step"] for e in events if e["type"] == "step.started"}
    assert "conflict" in started and "character" not in started
    fork_id = run_id_of(events)
    story = (p.state / "runs" / fork_id / "story.md").read_text()
    assert story != (p.state / "runs" / parent / "story.md").read_text()


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["--from", "edtor"], "--from: unknown step 'edtor'", "editor"),
        (["-i", "tone"], "is not key=value", "-i"),
        (["-i", "colour=red"], "colour", ""),
        (["--file", "missing.yaml"], "not found", "--file"),
        (["--executor", "nonsense"], "--executor 'nonsense'", "--executor dask"),
        (["--env", "nope"], "unknown environment 'nope'", ""),
    ],
)
def test_bad_fork_requests_are_usage_errors(
    project: CliProject, args: list[str], message: str, hint: str
) -> None:
    parent = run_id_of(project.events("run", "flow.yaml"))
    result = project.cli("fork", parent, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and hint in result.stderr
    assert len(json.loads(project.cli("runs", "--json").stdout)) == 1  # nothing was made
    if args[0] in ("--executor", "--file"):  # replay takes these too, and refuses alike
        result = project.cli("replay", parent, *args)
        assert result.returncode == 2 and message in result.stderr
        assert len(json.loads(project.cli("runs", "--json").stdout)) == 1


def test_fork_of_an_unknown_run_or_a_child_run(project: CliProject) -> None:
    result = project.cli("fork", "nope")
    assert result.returncode == 2 and "no run matches 'nope'" in result.stderr
    project.write("child.yaml", "apiVersion: storyflow/v1\nname: c\nsteps:\n"
                  "  a: {uses: template, with: {template: hi}}\n")
    project.write("p.yaml", "apiVersion: storyflow/v1\nname: p\nsteps:\n"
                  "  sub: {uses: workflow, with: {path: child.yaml}}\n")
    parent = run_id_of(project.events("run", "p.yaml"))
    result = project.cli("fork", f"{parent}.sub")
    assert result.returncode == 2
    assert f"fork the parent: storyflow fork {parent} --from sub" in result.stderr


def test_a_redacted_output_runs_again_in_the_fork(project: CliProject) -> None:
    project.write("secret.yaml", """\
        apiVersion: storyflow/v1
        name: secretive
        agents:
          py: {uses: python, with: {callable: "fa:step"}, secrets: [SF_TOKEN]}
        steps:
          leak:
            agent: py
            with: {me: leak, text: "{{ secrets.SF_TOKEN }}"}
          plain:
            uses: python
            with: {callable: "fa:step", me: plain}
        """)
    env = {"SF_TOKEN": "hunter2-very-secret"}
    parent = run_id_of(project.events("run", "secret.yaml", env=env))
    ran(project)
    project.events("fork", parent, env=env)
    assert ran(project) == ["leak"]


SEEDED = """\
    apiVersion: storyflow/v1
    name: seeded
    seed: 1
    agents:
      teller: {uses: builtin/grammar, with: {grammar: {origin: [WORDS]}}}
    steps:
      pick:
        agent: teller
      polish:
        loop:
          max_iterations: 2
          steps:
            again: {agent: teller}
    outputs:
      pick: "{{ steps.pick.output }}"
      again: "{{ steps.polish.output.again }}"
    """.replace("WORDS", ", ".join(f"w{i}" for i in range(100)))


def test_a_seed_changed_in_the_file_runs_every_step_again(project: CliProject) -> None:
    # The seed is no part of a fingerprint: a fork must see that the parent ran under
    # another one even when the change is in the file, not a --set.
    path = project.write("seeded.yaml", SEEDED)
    parent = run_id_of(project.events("run", "seeded.yaml"))
    path.write_text(path.read_text().replace("seed: 1", "seed: 8"))
    result = project.cli("fork", parent, "--no-progress")
    assert result.returncode == 0, result.stderr
    fork_id = json.loads(project.cli("runs", "--json").stdout)[0]["run_id"]
    fresh = project.events("run", "seeded.yaml")[-1]["outputs"]
    assert project.show(fork_id)["outputs"] == fresh  # as a run with seed 8 tells it
    assert "kept: 0 steps" in result.stderr and "(seed changed)" in result.stderr
    assert "the workflow file changed since the parent ran" in result.stderr


def test_copies_of_a_kept_loop_carry_no_usage(project: CliProject) -> None:
    from llm_server import FakeLLM

    with FakeLLM() as server:
        project.write("llm.yaml", f"""\
            apiVersion: storyflow/v1
            name: spent
            inputs:
              tone: {{type: string, default: calm}}
            agents:
              writer: {{uses: llm, with: {{base_url: "{server.url}", model: m}}}}
            steps:
              polish:
                loop:
                  max_iterations: 2
                  steps:
                    line: {{agent: writer, prompt: "A line, take {{{{ loop.iteration }}}}"}}
              mood:
                uses: template
                with: {{template: "{{{{ inputs.tone }}}}"}}
            """)
        parent = run_id_of(project.events("run", "llm.yaml", "--no-cache"))
        assert len(server.requests) == 2
        spent = steps_of(project.show(parent))
        assert spent["polish#1.line"]["usage"]["tokens"] > 0
        fork_id = run_id_of(project.events("fork", parent, "-i", "tone=dark"))
        assert len(server.requests) == 2
    steps = steps_of(project.show(fork_id))
    assert steps["polish#1.line"]["forked_from"] == parent
    # What a kept step spent, the parent spent: no copy carries usage, nested or not.
    assert "usage" not in steps["polish"] and "usage" not in steps["polish#1.line"]
    assert "usage" not in steps["polish#2.line"]
    diff = project.cli("diff", parent, fork_id, "--format", "json")
    assert diff.returncode == 0, diff.stderr


def test_fork_of_a_run_still_held_by_another_process(project: CliProject) -> None:
    import subprocess
    import sys
    import time

    from conftest import cli_env

    gated = project.write("gated.yaml", FLOW.replace("name: forky", "name: gated").replace(
        "{me: title,", "{callable: \"fa:gated\", me: title,"))
    (project.root / "fa.py").write_text((project.root / "fa.py").read_text() + '''

import pathlib
import time


def gated(me, text=""):
    gate = os.environ.get("SF_GATE")
    if gate:
        pathlib.Path(gate + ".waiting").touch()
        while not os.path.exists(gate):
            time.sleep(0.01)
    return step(me, text)
''')
    gate = project.root / "gate"
    proc = subprocess.Popen(
        [sys.executable, "-m", "storyflow", "run", str(gated), "--json"], cwd=project.root,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=cli_env(project.state, {"SF_EXEC_LOG": str(project.log), "SF_GATE": str(gate)}))
    try:
        assert proc.stdout is not None
        parent = json.loads(proc.stdout.readline())["run_id"]
        deadline = time.monotonic() + 30
        while not (project.root / "gate.waiting").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        ran(project)
        result = project.cli("fork", parent, "--no-progress")
        assert result.returncode == 0, result.stderr
        assert f"note: run {parent} is still running" in result.stderr
        assert "run: title (did not finish in the parent)" in result.stderr
        assert ran(project) == ["title"]
    finally:
        gate.touch()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert project.show(parent)["status"] == "succeeded"


def test_a_fork_of_an_llm_run_can_drop_its_environment(tmp_path: Path) -> None:
    # The flagship's agents are grammar writers; `--env llm` makes them chat models.
    # A fork of an llm run with `--env ''` runs the file as written: offline again.
    from llm_server import FakeLLM
    from test_llm_env import answer

    shutil.copytree(REPO / "workflows", tmp_path / "workflows")
    p = CliProject(tmp_path, "unused", "")
    with FakeLLM(answer) as server:
        env = {"STORYFLOW_LLM_BASE_URL": server.url, "OPENAI_API_KEY": "sk-fork-env-key"}
        parent = run_id_of(p.events("run", "workflows/short-story.yaml", "--env", "llm",
                                    env=env))
        asked = len(server.requests)
        result = p.cli("fork", parent, "--env", "", "--no-progress", env=env)
        assert result.returncode == 0, result.stderr
        assert len(server.requests) == asked  # every agent is a grammar writer again
    assert "environment: (none) (was llm)" in result.stderr
    assert "(definition changed)" in result.stderr
    fork_id = json.loads(p.cli("runs", "--json").stdout)[0]["run_id"]
    doc = p.show(fork_id)
    assert doc["status"] == "succeeded" and doc.get("environment") is None
    fresh = run_id_of(p.events("run", "workflows/short-story.yaml"))
    assert (p.state / "runs" / fork_id / "story.md").read_bytes() == (
        p.state / "runs" / fresh / "story.md").read_bytes()


def test_a_fork_of_a_fork_finds_the_child_run_through_the_lineage(
    project: CliProject,
) -> None:
    project.write("child.yaml", CHILD)
    project.write("parent.yaml", """\
        apiVersion: storyflow/v1
        name: parent
        inputs:
          tone: {type: string, default: calm}
          premise: {type: string, default: a map}
        steps:
          chapter:
            uses: workflow
            with: {path: child.yaml, inputs: {tone: "{{ inputs.tone }}"}}
          side:
            uses: python
            with: {callable: "fa:step", me: side, text: "{{ inputs.premise }}"}
        outputs:
          text: "{{ steps.chapter.output.text }}"
        """)
    first = run_id_of(project.events("run", "parent.yaml"))
    second = run_id_of(project.events("fork", first, "-i", "premise=a key"))
    assert steps_of(project.show(second))["chapter"]["forked_from"] == first  # no child
    ran(project)
    third = run_id_of(project.events("fork", second, "-i", "tone=grim"))
    # The kept chapter's child is the first run's: the new child forks it.
    assert ran(project) == ["voice"]
    child = project.show(f"{third}.chapter")
    assert child["forked_from"] == f"{first}.chapter"
    assert steps_of(child)["setting"]["forked_from"] == f"{first}.chapter"
