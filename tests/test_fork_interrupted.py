"""Forks that are interrupted (kill -9, Ctrl-C) and resumed, through the real CLI.

A fork keeps (copies) what its change does not reach and runs the rest. Interrupted
and resumed, it must end as the same fork never interrupted would: what it copied (or
would have copied) never executes, what it finished is not run again, the rest runs
once. Agents append their name to an execution log before doing anything else, so
every test sees exactly what executed; one of them waits at a gate (``$SF_GATE``)
when it is the step named by ``$SF_GATE_AT``, so a test kills the fork while that
step runs, never by timing.
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

from conftest import CLI_TIMEOUT_S, CliProject, cli_env

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")


AGENTS = '''\
import os
import pathlib
import time


def step(me, text=""):
    with open(os.environ["SF_EXEC_LOG"], "a", encoding="utf-8") as fh:
        fh.write(me + "\\n")
    gate = os.environ.get("SF_GATE")
    if gate and os.environ.get("SF_GATE_AT") == me:
        pathlib.Path(gate + ".waiting").touch()
        while not os.path.exists(gate):
            time.sleep(0.005)
    if os.environ.get("SF_FAIL") == me:
        raise ValueError(f"{me} broke")
    return f"{me}({text})"


def const(me, text=""):
    """Executes (and logs) like `step`, but its output does not depend on `text`."""
    step(me)
    return me
'''

FLOW = """\
apiVersion: storyflow/v1
name: tale
inputs:
  tone: {type: string, default: wistful}
  premise: {type: string, default: a map}
config: {style: plain}
agents:
  py: {uses: python, with: {callable: "fx:step"}}
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
    with: {me: cast, text: "{{ steps.plot.output }} {{ config.style }}"}
  editor:
    agent: py
    with: {me: editor, text: "{{ steps.scene.output }} {{ steps.cast.output }}"}
  title:
    agent: py
    with: {me: title, text: "{{ steps.editor.output }}"}
outputs:
  title: "{{ steps.title.output }}"
"""
"""mood → scene ┐
plot → cast  ┴→ editor → title"""


@pytest.fixture
def p(tmp_path: Path) -> CliProject:
    project = CliProject(tmp_path, "fx", AGENTS)
    project.write("tale.yaml", FLOW)
    return project


def ran(p: CliProject) -> list[str]:
    """What executed since the last call, sorted (the log is emptied)."""
    return sorted(p.executions())


def steps_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in doc["steps"]}


def run(p: CliProject, *args: str, code: int = 0, env: dict[str, str] | None = None) -> str:
    """``storyflow ARGS --json`` to its end; the run id."""
    events = p.events(*args, env=env, code=code)
    return str(events[0]["run_id"])


def interrupt(p: CliProject, *args: str, at: str, sig: int = signal.SIGKILL,
              env: dict[str, str] | None = None, expect: int | None = None,
              early: bool = False) -> str:
    """``storyflow ARGS --json``, sent ``sig`` once step ``at`` runs (it waits at a
    gate) — ``early``: once the run has started — the run id. With SIGINT the process
    must end with ``expect``."""
    gate = p.root / f"gate-{time.monotonic_ns()}"
    extra = {"SF_EXEC_LOG": str(p.log), "SF_GATE": str(gate), "SF_GATE_AT": at, **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "storyflow", *args, "--json"], cwd=p.root,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(p.state, extra))
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, proc.communicate(timeout=CLI_TIMEOUT_S)[1]
        run_id = str(json.loads(first)["run_id"])
        waiting = Path(str(gate) + ".waiting")
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not early and not waiting.exists():
            assert proc.poll() is None, proc.communicate(timeout=CLI_TIMEOUT_S)[1]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
        if expect is not None:
            assert proc.returncode == expect, stderr
        else:
            assert proc.returncode == -sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=CLI_TIMEOUT_S)
        gate.touch()  # the step's thread, if any, may leave now
    return run_id


def resume(p: CliProject, run_id: str, *args: str, code: int = 0) -> list[dict[str, Any]]:
    events = p.events("resume", run_id, *args, code=code)
    assert events[-1]["type"] == "run.summary"
    return events


def same_steps(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two runs' steps agree on ids, statuses, outputs and what was kept from where."""
    sa, sb = steps_of(a), steps_of(b)
    assert sorted(sa) == sorted(sb)
    for sid in sa:
        for key in ("status", "output"):
            assert sa[sid].get(key) == sb[sid].get(key), (sid, key)
        assert bool(sa[sid].get("forked_from")) == bool(sb[sid].get("forked_from")), sid
    assert a["outputs"] == b["outputs"]


def origins(p: CliProject, a: str, b: str) -> dict[str, str]:
    """`storyflow diff A B`: per step instance, whether B kept it from A or ran it."""
    result = p.cli("diff", a, b, "--format", "json")
    assert result.returncode == 0, result.stderr
    return {s["id"]: s["origin"] for s in json.loads(result.stdout)["steps"]}


# --- --from: kill -9 / Ctrl-C while a step after the fork point runs ---------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, None), (signal.SIGINT, 130)])
def test_fork_from_killed_after_the_fork_point_resumes_to_the_same_fork(
    p: CliProject, sig: int, code: int | None
) -> None:
    parent = run(p, "run", "tale.yaml")
    ran(p)
    before = p.show(parent)
    fork = interrupt(p, "fork", parent, "--from", "scene", at="editor", sig=sig, expect=code)
    assert ran(p) == ["editor", "scene"]
    doc = p.show(fork)
    assert doc["status"] == "interrupted"
    assert doc["forked_from"] == parent
    copied = {sid for sid, s in steps_of(doc).items() if s.get("forked_from") == parent}
    assert copied == {"mood", "plot", "cast"}

    events = resume(p, fork)
    assert ran(p) == ["editor", "title"]  # nothing copied or finished runs again
    assert events[-1]["status"] == "succeeded"
    assert {e["step"] for e in events if e["type"] == "step.kept"} == {
        "mood", "plot", "cast", "scene"}

    clean = run(p, "fork", parent, "--from", "scene")
    assert ran(p) == ["editor", "scene", "title"]
    same_steps(p.show(fork), p.show(clean))
    assert p.show(parent) == before  # the parent is never modified

    assert origins(p, parent, fork) == origins(p, parent, clean) == {
        "mood": "kept", "plot": "kept", "cast": "kept",
        "scene": "rerun", "editor": "rerun", "title": "rerun"}


MAPPED = """\
apiVersion: storyflow/v1
name: mapped
inputs:
  scenes: {type: array, default: [dawn, noon, dusk]}
agents:
  py: {uses: python, with: {callable: "fx:step"}}
steps:
  draft:
    for_each: "{{ inputs.scenes }}"
    max_parallel: 1
    agent: py
    with: {me: "draft-{{ item }}", text: "{{ item }}"}
  end:
    agent: py
    with: {me: end, text: "{{ steps.draft.output | join(',') }}"}
outputs:
  end: "{{ steps.end.output }}"
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, None), (signal.SIGINT, 130)])
def test_map_items_the_fork_had_not_released_are_still_kept_on_resume(
    p: CliProject, sig: int, code: int | None
) -> None:
    p.write("mapped.yaml", MAPPED)
    parent = run(p, "run", "mapped.yaml")
    ran(p)
    change = ("-i", 'scenes=["night", "noon", "dusk"]')
    clean = run(p, "fork", parent, *change)
    assert ran(p) == ["draft-night", "end"]  # noon and dusk are kept, uninterrupted

    # One item at a time: the fork is stopped in draft[0], before it reached the rest.
    fork = interrupt(p, "fork", parent, *change, at="draft-night", sig=sig, expect=code)
    assert ran(p) == ["draft-night"]
    resume(p, fork)
    assert ran(p) == ["draft-night", "end"]  # not draft-noon, draft-dusk: kept
    same_steps(p.show(fork), p.show(clean))
    assert origins(p, parent, fork) == origins(p, parent, clean)


NEEDS = FLOW.replace("""\
  title:
""", """\
  index:
    needs: [mood]
    agent: py
    with: {me: index, text: "{{ inputs.premise }}"}
  title:
""")
"""`index` waits for mood (``needs:``) but reads nothing that a new tone changes."""


def test_a_step_after_the_rerun_one_is_still_kept_on_resume(p: CliProject) -> None:
    p.write("needs.yaml", NEEDS)
    parent = run(p, "run", "needs.yaml")
    ran(p)
    clean = run(p, "fork", parent, "-i", "tone=eerie")
    assert ran(p) == ["editor", "mood", "scene", "title"]  # index: kept

    fork = interrupt(p, "fork", parent, "-i", "tone=eerie", at="mood")
    assert ran(p) == ["mood"]
    doc = p.show(fork)
    assert doc["inputs"]["tone"] == "eerie"
    resume(p, fork)
    assert ran(p) == ["editor", "mood", "scene", "title"]
    after = p.show(fork)
    assert after["inputs"]["tone"] == "eerie"  # the override holds on resume
    assert steps_of(after)["index"].get("forked_from") == parent
    same_steps(after, p.show(clean))


LOOPED = """\
apiVersion: storyflow/v1
name: looped
inputs:
  tone: {type: string, default: calm}
config: {style: plain}
agents:
  py: {uses: python, with: {callable: "fx:step"}}
steps:
  brief:
    uses: python
    with: {callable: "fx:const", me: brief, text: "{{ inputs.tone }}"}
  draft:
    for_each: [a, b]
    agent: py
    with: {me: "draft-{{ item }}", text: "{{ item }} {{ steps.brief.output }}"}
  polish:
    needs: [draft]
    loop:
      max_iterations: 2
      steps:
        critique:
          agent: py
          with: {me: "critique-{{ loop.iteration }}", text: "{{ config.style }}"}
        revise:
          agent: py
          with: {me: "revise-{{ loop.iteration }}", text: "{{ steps.critique.output }}"}
  end:
    agent: py
    with: {me: end, text: "{{ steps.polish.output.revise }}"}
outputs:
  end: "{{ steps.end.output }}"
"""
"""brief (its output ignores the tone) → draft[a, b] → polish (reads config.style) → end"""


def test_a_loop_after_the_fork_point_resumes_where_it_stopped(p: CliProject) -> None:
    p.write("looped.yaml", LOOPED)
    parent = run(p, "run", "looped.yaml")
    ran(p)
    # Only the loop reads the setting: it runs again whole, the rest is kept.
    fork = interrupt(p, "fork", parent, "--set", "config.style=terse", at="revise-2")
    assert ran(p) == ["critique-1", "critique-2", "revise-1", "revise-2"]
    resume(p, fork)
    assert ran(p) == ["end", "revise-2"]  # iteration 1 and critique-2 stand
    doc = p.show(fork)
    assert doc["fork"]["sets"] == ["config.style=terse"]
    steps = steps_of(doc)
    assert steps["polish#2.critique"]["output"] == "critique-2(terse)"  # the --set holds
    assert steps["polish#2.critique"].get("forked_from") is None
    assert steps["draft[1]"]["forked_from"] == parent
    clean = run(p, "fork", parent, "--set", "config.style=terse")
    ran(p)
    same_steps(doc, p.show(clean))
    assert origins(p, parent, fork) == origins(p, parent, clean)


def test_fork_of_an_interrupted_and_resumed_fork(p: CliProject) -> None:
    parent = run(p, "run", "tale.yaml")
    first = interrupt(p, "fork", parent, "-i", "tone=eerie", at="scene")
    resume(p, first)
    ran(p)
    second = interrupt(p, "fork", first, "--from", "editor", at="title")
    assert ran(p) == ["editor", "title"]
    resume(p, second)
    assert ran(p) == ["title"]
    steps = steps_of(p.show(second))
    assert {sid for sid, s in steps.items() if s.get("forked_from") == first} == {
        "mood", "plot", "scene", "cast"}  # copies name the run they were copied from
    assert steps["title"]["output"] == (
        "title(editor(scene(mood(eerie)) cast(plot(a map) plain)))")


def test_fork_of_a_failed_run_interrupted_then_resumed(p: CliProject) -> None:
    parent = run(p, "run", "tale.yaml", code=1, env={"SF_FAIL": "scene"})
    ran(p)
    before = p.show(parent)
    fork = interrupt(p, "fork", parent, at="editor")
    assert ran(p) == ["editor", "scene"]
    resume(p, fork)
    assert ran(p) == ["editor", "title"]
    doc = p.show(fork)
    assert doc["status"] == "succeeded"
    assert {sid for sid, s in steps_of(doc).items() if s.get("forked_from")} == {
        "mood", "plot", "cast"}
    assert p.show(parent) == before
    assert origins(p, parent, fork) == {"mood": "kept", "plot": "kept", "cast": "kept",
                                        "scene": "rerun", "editor": "rerun", "title": "rerun"}


def test_resume_from_a_step_of_an_interrupted_fork(p: CliProject) -> None:
    parent = run(p, "run", "tale.yaml")
    ran(p)
    fork = interrupt(p, "fork", parent, "-i", "tone=eerie", at="editor")
    assert ran(p) == ["editor", "mood", "scene"]
    resume(p, fork, "--from", "cast")  # a copied step: it and what follows run now
    assert ran(p) == ["cast", "editor", "title"]
    steps = steps_of(p.show(fork))
    assert steps["cast"].get("forked_from") is None
    assert steps["plot"]["forked_from"] == parent
    assert steps["title"]["output"] == (
        "title(editor(scene(mood(eerie)) cast(plot(a map) plain)))")


CHILD = """\
apiVersion: storyflow/v1
name: child
inputs:
  tone: {type: string}
agents:
  py: {uses: python, with: {callable: "fx:step"}}
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

NESTED = """\
apiVersion: storyflow/v1
name: nested
inputs:
  tone: {type: string, default: calm}
steps:
  chapter:
    uses: workflow
    with: {path: child.yaml, inputs: {tone: "{{ inputs.tone }}"}}
outputs:
  text: "{{ steps.chapter.output.text }}"
"""


def test_a_sub_workflow_of_an_interrupted_fork_keeps_its_copies(p: CliProject) -> None:
    p.write("child.yaml", CHILD)
    p.write("nested.yaml", NESTED)
    parent = run(p, "run", "nested.yaml")
    ran(p)
    fork = interrupt(p, "fork", parent, "-i", "tone=grim", at="voice")
    assert ran(p) == ["voice"]
    events = resume(p, fork)
    assert ran(p) == ["voice"]
    assert events[-1]["outputs"] == {"text": "setting(fixed) voice(grim)"}
    child = p.show(f"{fork}.chapter")
    assert child["status"] == "succeeded"
    assert child["forked_from"] == f"{parent}.chapter"
    assert steps_of(child)["setting"]["forked_from"] == f"{parent}.chapter"


def test_what_the_fork_runs_again_whatever_is_not_kept_from_the_parent_on_resume(
    p: CliProject,
) -> None:
    # A new tone re-runs brief, whose output comes out the same: the drafts after it
    # are kept after all. The loop reads a changed setting: it runs again whatever,
    # though its needs' outputs are the parent's. The fork is killed in brief, before
    # reaching either; resumed, it must decide both as it would have.
    p.write("looped.yaml", LOOPED)
    parent = run(p, "run", "looped.yaml")
    ran(p)
    change = ("-i", "tone=eerie", "--set", "config.style=terse")
    clean = run(p, "fork", parent, *change)
    loop = ["critique-1", "critique-2", "end", "revise-1", "revise-2"]
    assert ran(p) == sorted(["brief", *loop])
    fork = interrupt(p, "fork", parent, *change, at="brief")
    assert ran(p) == ["brief"]
    resume(p, fork)
    assert ran(p) == sorted(["brief", *loop])  # not the drafts; the whole loop
    doc = p.show(fork)
    assert steps_of(doc)["polish#1.critique"]["output"] == "critique-1(terse)"
    same_steps(doc, p.show(clean))
    assert origins(p, parent, fork) == origins(p, parent, clean)


def test_map_items_after_the_fork_point_run_on_resume_those_finished_do_not(
    p: CliProject,
) -> None:
    p.write("mapped.yaml", MAPPED)
    parent = run(p, "run", "mapped.yaml")
    ran(p)
    fork = interrupt(p, "fork", parent, "--from", "draft", at="draft-noon")
    assert ran(p) == ["draft-dawn", "draft-noon"]
    resume(p, fork)
    # dawn finished in the fork: it stands; dusk is after the fork point: it runs,
    # though the parent has it with the same inputs.
    assert ran(p) == ["draft-dusk", "draft-noon", "end"]
    steps = steps_of(p.show(fork))
    assert not any(s.get("forked_from") for sid, s in steps.items() if sid != "end")
    assert steps["draft[0]"]["attempts"] == 1


BIG = 1000


def test_a_fork_killed_while_it_copies_keeps_the_rest_on_resume(p: CliProject) -> None:
    lines = ["apiVersion: storyflow/v1", "name: big",
             "inputs: {tone: {type: string, default: calm}}", "steps:"]
    lines += [f"  s{i}: {{uses: template, with: {{template: s{i}}}}}" for i in range(BIG)]
    lines.append('  last: {uses: python, with: {callable: "fx:step", me: last, '
                 'text: "{{ inputs.tone }}"}}')
    p.write("big.yaml", "\n".join(lines) + "\n")
    parent = run(p, "run", "big.yaml")
    ran(p)
    # Killed as soon as it says it started: while it keeps (copies) the 1,000 steps
    # it does not re-run, or — on a fast machine — just after, in `last` (which
    # then waits at a gate). Either way, resumed, no copied step may run.
    fork = interrupt(p, "fork", parent, "-i", "tone=dark", at="last", early=True)
    copied = sum(1 for s in p.show(fork)["steps"] if s.get("forked_from"))
    assert copied in (0, BIG)  # all copies commit together, or none
    events = resume(p, fork)
    assert [e["step"] for e in events if e["type"] == "step.started"] == ["last"]
    assert sum(e["type"] == "step.kept" for e in events) == BIG
    doc = p.show(fork)
    assert doc["status"] == "succeeded" and doc["outputs"] == {}
    steps = steps_of(doc)
    assert all(steps[f"s{i}"]["forked_from"] == parent for i in range(BIG))
    assert steps["last"]["output"] == "last(dark)" and "last" in ran(p)
