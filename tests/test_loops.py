"""`loop` steps: bounded revise loops through the command line.

A critique/revise pair repeats until ``until`` holds or ``max_iterations`` pass; each
iteration's instances are ``polish#N.step`` with their own checkpoints, so a run that
fails or is killed in the middle of an iteration resumes inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import CliProject

AGENTS = '''\
import os
import pathlib
import time


def _log(me):
    log = os.environ.get("SF_EXEC_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(me + "\\n")


def critique(iteration, scores, draft=None):
    _log(f"critique{iteration}")
    values = [int(x) for x in scores.split(",")]
    return {"score": values[iteration - 1], "notes": f"notes{iteration}"}


def revise(iteration, notes, previous=None):
    _log(f"revise{iteration}")
    if os.environ.get("SF_FAIL_AT") == str(iteration):
        raise ValueError(f"revise broke in iteration {iteration}")
    gate = os.environ.get("SF_GATE")
    if gate and iteration == 2:
        pathlib.Path(gate + ".waiting").touch()
        while not os.path.exists(gate):
            time.sleep(0.01)
    return f"v{iteration}<{previous}>"
'''


def loop_workflow(
    scores: str = "3,6,9",
    *,
    max_iterations: int = 4,
    until: str | None = "steps.critique.output.score >= 8",
    extra: str = "",
) -> str:
    until_line = f"      until: {until}\n" if until else ""
    return (
        "apiVersion: storyflow/v1\n"
        "name: revise-loop\n"
        "steps:\n"
        '  first: {uses: template, with: {template: "draft0"}}\n'
        "  polish:\n"
        "    loop:\n"
        f"      max_iterations: {max_iterations}\n"
        f"{until_line}{extra}"
        "      steps:\n"
        "        critique:\n"
        "          uses: python\n"
        '          with: {callable: "loop_agents:critique", '
        f'scores: "{scores}", iteration: "{{{{ loop.iteration }}}}", '
        'draft: "{{ loop.previous.revise or steps.first.output }}"}\n'
        "        revise:\n"
        "          uses: python\n"
        '          with: {callable: "loop_agents:revise", iteration: "{{ loop.iteration }}", '
        'notes: "{{ steps.critique.output.notes }}", previous: "{{ loop.previous.revise }}"}\n'
        '  done: {uses: template, with: {template: "final {{ steps.polish.output.revise }}"}}\n'
        "outputs:\n"
        '  story: "{{ steps.done.output }}"\n'
        '  score: "{{ steps.polish.output.critique.score }}"\n'
    )


@pytest.fixture
def loops(tmp_path: Path) -> CliProject:
    return CliProject(tmp_path, "loop_agents", AGENTS)


def started(events: list[dict[str, Any]]) -> list[str]:
    return [e["step"] for e in events if e["type"] == "step.started"]


def test_loop_repeats_until_the_condition_holds(loops: CliProject) -> None:
    events = loops.events("run", loops.write("wf.yaml", loop_workflow("3,6,9")))
    summary = events[-1]
    assert summary["status"] == "succeeded"
    assert summary["outputs"]["story"] == "final v3<v2<v1<None>>>"
    assert summary["outputs"]["score"] == 9
    assert [e["iteration"] for e in events if e["type"] == "loop.iteration"] == [1, 2, 3]
    assert [e["done"] for e in events if e["type"] == "loop.iterated"] == [False, False, True]
    assert loops.executions() == [
        "critique1", "revise1", "critique2", "revise2", "critique3", "revise3"
    ]
    doc = loops.show(summary["run_id"])
    ids = [s["id"] for s in doc["steps"]]
    assert ids == [
        "first", "polish",
        "polish#1.critique", "polish#1.revise",
        "polish#2.critique", "polish#2.revise",
        "polish#3.critique", "polish#3.revise",
        "done",
    ]
    polish = doc["steps"][1]
    assert polish["output"] == {"critique": {"score": 9, "notes": "notes3"},
                                "revise": "v3<v2<v1<None>>>"}


def test_best_by_keeps_the_best_iteration(loops: CliProject) -> None:
    wf = loops.write("wf.yaml", loop_workflow(
        "5,9,4", max_iterations=3, until=None,
        extra="      best_by: steps.critique.output.score\n",
    ))
    events = loops.events("run", wf)
    assert events[-1]["outputs"]["story"] == "final v2<v1<None>>"
    assert events[-1]["outputs"]["score"] == 9
    assert [e.get("score") for e in events if e["type"] == "loop.iterated"] == [5, 9, 4]
    polish = next(s for s in loops.show(events[0]["run_id"])["steps"] if s["id"] == "polish")
    assert (polish["iterations"], polish["best_iteration"]) == (3, 2)
    text = loops.cli("show", events[0]["run_id"]).stdout
    assert "3 iterations, keeps #2" in text


def test_exhausted_loop_succeeds_by_default_and_fails_on_request(loops: CliProject) -> None:
    events = loops.events("run", loops.write("wf.yaml", loop_workflow("1,1", max_iterations=2)))
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["outputs"]["story"] == "final v2<v1<None>>"

    wf = loops.write("strict.yaml", loop_workflow("1,1", max_iterations=2,
                                   extra="      on_exhausted: fail\n"))
    result = loops.cli("run", wf, "--no-progress")
    assert result.returncode == 1
    assert "still false after 2 iterations" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_failure_inside_an_iteration_then_resume_continues_inside_it(loops: CliProject) -> None:
    wf = loops.write("wf.yaml", loop_workflow("3,6,9"))
    events = loops.events("run", wf, env={"SF_FAIL_AT": "2"}, code=1)
    run_id = events[0]["run_id"]
    failed = [e["step"] for e in events if e["type"] == "step.failed"]
    assert failed == ["polish#2.revise", "polish"]
    assert loops.executions() == ["critique1", "revise1", "critique2", "revise2"]

    resumed = loops.events("resume", run_id)
    assert resumed[-1]["status"] == "succeeded"
    assert resumed[-1]["outputs"]["story"] == "final v3<v2<v1<None>>>"
    kept = {e["step"] for e in resumed if e["type"] == "step.kept"}
    assert {"first", "polish#1.critique", "polish#1.revise", "polish#2.critique"} <= kept
    assert loops.executions() == ["revise2", "critique3", "revise3"]


def test_kill_9_inside_an_iteration_then_resume(loops: CliProject) -> None:
    wf = loops.write("wf.yaml", loop_workflow("3,6,9"))
    gate = loops.root / "gate"
    run_id = loops.kill_at_gate(wf, gate)  # while polish#2.revise runs
    assert loops.executions() == ["critique1", "revise1", "critique2", "revise2"]

    resumed = loops.events("resume", run_id)
    assert resumed[-1]["status"] == "succeeded"
    assert resumed[-1]["outputs"]["story"] == "final v3<v2<v1<None>>>"
    assert loops.executions() == ["revise2", "critique3", "revise3"]
    assert started(resumed)[:2] == ["polish", "polish#2.revise"]


def test_a_finished_loop_is_kept_whole_on_resume(loops: CliProject) -> None:
    wf = loops.write("wf.yaml", loop_workflow("3,6,9"))
    events = loops.events("run", wf)
    loops.executions()
    resumed = loops.events("resume", events[0]["run_id"], "--from", "done")
    assert started(resumed) == ["done"]
    assert {e["step"] for e in resumed if e["type"] == "step.kept"} == {"first", "polish"}
    assert loops.executions() == []
    assert resumed[-1]["outputs"]["story"] == "final v3<v2<v1<None>>>"
    # `show` still lists every iteration of the kept loop.
    ids = [s["id"] for s in loops.show(events[0]["run_id"])["steps"]]
    assert "polish#3.revise" in ids


def test_a_map_inside_a_loop(loops: CliProject) -> None:
    wf = loops.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: map-in-loop
        steps:
          polish:
            loop:
              max_iterations: 5
              until: loop.iteration >= 2
              steps:
                parts:
                  for_each: "[1, 2]"
                  uses: template
                  with: {template: "{{ item }}-{{ loop.iteration }}"}
                joined:
                  uses: template
                  with: {template: "{{ steps.parts.output | join(',') }}"}
        outputs:
          last: "{{ steps.polish.output.joined }}"
        """)
    events = loops.events("run", wf)
    assert events[-1]["outputs"]["last"] == "1-2,2-2"
    ids = [s["id"] for s in loops.show(events[0]["run_id"])["steps"]]
    assert ids == [
        "polish",
        "polish#1.parts", "polish#1.parts[0]", "polish#1.parts[1]", "polish#1.joined",
        "polish#2.parts", "polish#2.parts[0]", "polish#2.parts[1]", "polish#2.joined",
    ]


def test_until_that_cannot_be_evaluated_fails_the_loop_clearly(loops: CliProject) -> None:
    wf = loops.write("wf.yaml", loop_workflow("3,6,9", until="steps.critique.output.score > 'x'"))
    result = loops.cli("run", wf, "--no-progress")
    assert result.returncode == 1
    assert "until" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_loop_whose_when_is_false_is_skipped_with_its_dependents(loops: CliProject) -> None:
    text = loop_workflow("3,6,9").replace("  polish:\n", "  polish:\n    when: false\n", 1)
    text = text.partition("outputs:")[0]
    events = loops.events("run", loops.write("wf.yaml", text))
    assert [e["step"] for e in events if e["type"] == "step.skipped"] == ["polish", "done"]
    assert not any(e["type"] == "loop.iteration" for e in events)
    assert loops.executions() == []
