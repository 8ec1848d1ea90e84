"""The example workflows run offline through the real CLI and keep their promises.

short-story: the editor's critique/revise loop runs, rewrites the weakest section and
keeps the best-scored draft; the same seed tells the same story. novella: chapters
are child runs written in order, each handed the previous chapter's continuity record;
the optional approval pauses the run until `resume --answer`. batch: one child run per
premise, two at a time, a failing premise marked failed without failing the run.
"""

from __future__ import annotations

import json
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from conftest import WORKFLOWS, run_cli

SHORT_STORY = WORKFLOWS / "short-story.yaml"
NOVELLA = WORKFLOWS / "novella.yaml"
BATCH = WORKFLOWS / "batch.yaml"
SECTIONS = ("exposition", "rising_action", "climax", "falling_action", "resolution")
PASS_SCORE = 8
"""config.pass_score of short-story.yaml and chapter.yaml."""


class Cli:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"

    def __call__(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        result = run_cli(*args, state_dir=self.state, cwd=self.root)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def events(self, *args: str | Path, code: int = 0) -> list[dict[str, Any]]:
        result = self(*args, "--json")
        assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def show(self, run_id: str) -> dict[str, Any]:
        result = self("show", run_id, "--json")
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def summary_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    summary = events[-1]
    assert summary["type"] == "run.summary", summary
    return summary


def artifact(summary: dict[str, Any], name: str) -> str:
    return (Path(summary["run_dir"]) / name).read_text(encoding="utf-8")


def outputs_by_id(doc: dict[str, Any]) -> dict[str, Any]:
    return {s["id"]: s["output"] for s in doc["steps"]}


# --- short-story ---------------------------------------------------------------------------


def test_short_story_edits_in_a_loop_and_keeps_the_best_draft(cli: Cli) -> None:
    summary = summary_of(cli.events("run", SHORT_STORY))
    assert summary["status"] == "succeeded"
    story = artifact(summary, "story.md")
    assert len(story.split()) >= 300
    assert summary["outputs"]["story"] == story
    assert summary["outputs"]["words"] == len(story.split())

    doc = cli.show(summary["run_id"])
    statuses = {s["id"]: s["status"] for s in doc["steps"]}
    out = outputs_by_id(doc)
    assert statuses["edit#1.current"] == statuses["edit#1.critique"] == "succeeded"
    readings = sorted(int(sid[5]) for sid in statuses if sid.endswith(".critique"))
    assert readings == list(range(1, len(readings) + 1)) and len(readings) <= 3
    scores = [out[f"edit#{n}.critique"]["score"] for n in readings]
    # It stopped at the first passing score, or after three readings.
    assert all(s < PASS_SCORE for s in scores[:-1])
    assert scores[-1] >= PASS_SCORE or len(readings) == 3
    # Each rewrite replaced the weakest section, and only that one, in the next reading.
    for n in readings[:-1]:
        weakest = out[f"edit#{n}.critique"]["weakest"]
        before, after = out[f"edit#{n}.current"], out[f"edit#{n + 1}.current"]
        assert after[weakest]["text"] == out[f"edit#{n}.revise"]["text"] != before[weakest]["text"]
        assert {k: v for k, v in after.items() if k != weakest} == {
            k: v for k, v in before.items() if k != weakest
        }
    assert statuses[f"edit#{readings[-1]}.revise"] == "skipped"  # no rewrite nobody reads
    # The story is the best-scored reading (the first of equals), with its editor's note.
    best = readings[scores.index(max(scores))]
    chosen = out[f"edit#{best}.current"]
    assert out["edit"]["current"] == chosen
    assert all(chosen[s]["text"] in story for s in SECTIONS)
    assert out["edit"]["critique"]["notes"] in story
    assert f"({max(scores)}/10;" in story
    # Each section opens on the image the one before ended with, rewrites included.
    for before, after in pairwise(SECTIONS):
        assert chosen[after]["before"] == chosen[before]["thread"]
        assert chosen[before]["thread"].lower() in chosen[after]["text"].lower()


def test_short_story_same_seed_same_story(cli: Cli) -> None:
    first = summary_of(cli.events("run", SHORT_STORY, "--set", "seed=5"))
    again = summary_of(cli.events("run", SHORT_STORY, "--set", "seed=5"))
    other = summary_of(cli.events("run", SHORT_STORY, "--set", "seed=6"))
    assert first["run_id"] != again["run_id"]
    assert artifact(first, "story.md") == artifact(again, "story.md")
    assert artifact(other, "story.md") != artifact(first, "story.md")


def test_short_story_refuses_an_empty_premise(cli: Cli) -> None:
    result = cli("run", SHORT_STORY, "-i", "premise=")
    assert result.returncode == 2
    assert "premise" in result.stderr


# --- novella -------------------------------------------------------------------------------


def test_novella_writes_its_chapters_in_order_with_continuity(cli: Cli) -> None:
    events = cli.events("run", NOVELLA, "-i", "chapters=3")
    summary = summary_of(events)
    run_id = summary["run_id"]
    assert summary["status"] == "succeeded"
    novella = artifact(summary, "novella.md")
    assert summary["outputs"]["novella"] == novella

    # The outline loop ran; the approval was skipped; the chapters still ran.
    doc = cli.show(run_id)
    statuses = {s["id"]: s["status"] for s in doc["steps"]}
    assert statuses["outline#1.beats[2]"] == statuses["outline#1.review"] == "succeeded"
    assert statuses["approve"] == "skipped"
    assert statuses["chapters"] == "succeeded"

    # One child run per chapter, one after the other.
    children = [c["run_id"] for c in doc["children"]]
    assert children == [f"{run_id}.chapters-{i}" for i in range(3)]
    order = [(e["type"], e["step"]) for e in events
             if e["type"] in ("step.started", "step.succeeded")
             and e.get("step", "").startswith("chapters[")]
    assert order == [(kind, f"chapters[{i}]") for i in range(3)
                     for kind in ("step.started", "step.succeeded")]

    # Each chapter got the continuity record of the one before, and opens on it.
    chapters = [cli.show(child) for child in children]
    assert chapters[0]["inputs"]["previous"] is None
    for before, chapter in pairwise(chapters):
        record = before["outputs"]["record"]
        assert chapter["inputs"]["previous"] == record
        assert record["open_question"] in chapter["outputs"]["text"]
    # Every chapter ran its own critique/revise loop, and is in the novella in order.
    headings = []
    for i, chapter in enumerate(chapters):
        ids = {s["id"] for s in chapter["steps"]}
        assert {"polish#1.current", "polish#1.critique"} <= ids
        assert chapter["outputs"]["text"] in novella
        headings.append(f"## {i + 1}. {chapter['outputs']['title']}")
    assert [line for line in novella.splitlines() if line.startswith("## ")] == headings
    assert len(novella.split()) >= 600


def test_novella_waits_for_an_approval_when_asked(cli: Cli) -> None:
    result = cli("run", NOVELLA, "-i", "chapters=3", "-i", "approve_outline=true",
                 "--no-progress")
    assert result.returncode == 3, result.stdout + result.stderr
    run_id = result.stdout.splitlines()[0].rsplit(" ", 1)[-1]
    assert "Write the chapters from this outline?" in result.stderr
    doc = cli.show(run_id)
    assert doc["status"] == "waiting"
    assert [q["step"] for q in doc["waiting"]] == ["approve"]
    assert not doc["children"]  # no chapter was written before the answer

    summary = summary_of(cli.events("resume", run_id, "--answer", "approve=true"))
    assert summary["status"] == "succeeded"
    assert "## 3. " in artifact(summary, "novella.md")
    assert len(cli.show(run_id)["children"]) == 3


def test_novella_declined_outline_writes_the_outline_only(cli: Cli) -> None:
    result = cli("run", NOVELLA, "-i", "chapters=3", "-i", "approve_outline=true",
                 "--no-progress")
    assert result.returncode == 3
    run_id = result.stdout.splitlines()[0].rsplit(" ", 1)[-1]
    summary = summary_of(cli.events("resume", run_id, "--answer", "approve=false"))
    assert summary["status"] == "succeeded"
    novella = artifact(summary, "novella.md")
    assert "the outline was not approved" in novella
    assert "## " not in novella and novella.count("\n3. **") == 1
    assert not cli.show(run_id)["children"]


# --- batch ---------------------------------------------------------------------------------


def table_rows(summary_md: str) -> list[list[str]]:
    """The data rows of summary.md's table, cells stripped."""
    lines = [line for line in summary_md.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


def test_batch_writes_one_story_per_premise(cli: Cli) -> None:
    premises = [json.loads(line) for line in
                (WORKFLOWS / "premises.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 5 <= len(premises) <= 8
    events = cli.events("run", BATCH)
    summary = summary_of(events)
    assert summary["status"] == "succeeded"
    assert summary["outputs"]["succeeded"] == len(premises)
    assert summary["outputs"]["failed"] == 0
    rows = table_rows(artifact(summary, "summary.md"))
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (p["id"], p["premise"], "succeeded") for p in premises
    ]
    assert all(int(r[5]) >= 300 for r in rows)  # words
    assert all(r[6] == "0" and r[7] == "0.0000" for r in rows)  # offline: no tokens, no cost
    stories = artifact(summary, "stories.md")
    assert all(f"*{p['premise']}" in stories for p in premises)
    # Two at a time.
    running, most = set(), 0
    for e in events:
        step = e.get("step", "")
        if step.startswith("stories["):
            if e["type"] == "step.started":
                running.add(step)
            elif e["type"] in ("step.succeeded", "step.failed"):
                running.discard(step)
            most = max(most, len(running))
    assert most == 2


def test_batch_marks_a_failing_row_and_finishes_the_others(cli: Cli, tmp_path: Path) -> None:
    rows = [
        {"id": "storm", "premise": "A storm at sea", "tone": "eerie"},
        {"id": "empty", "premise": ""},  # short-story.yaml's premise has minLength: 1
        {"id": "choir", "premise": "A choir sings | out of tune"},
    ]
    premises = tmp_path / "premises.jsonl"
    premises.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = summary_of(cli.events("run", BATCH, "-i", f"premises={premises}"))
    assert summary["status"] == "succeeded"
    assert (summary["outputs"]["succeeded"], summary["outputs"]["failed"]) == (2, 1)
    text = artifact(summary, "summary.md")
    table = table_rows(text)
    assert [(r[1], r[3]) for r in table] == [
        ("storm", "succeeded"), ("empty", "failed"), ("choir", "succeeded")
    ]
    assert table[1][5:] == ["0", "?", "?"]  # a failed row's tokens and cost are unknown
    assert "A choir sings \\| out of tune" in text  # the table survives a '|'
    assert "premise" in text and 'stories[1]' in text  # why, and where to look
    statuses = {s["id"]: s["status"] for s in cli.show(summary["run_id"])["steps"]}
    assert statuses["stories[1]"] == "failed" and statuses["stories"] == "failed"
    assert statuses["summary"] == "succeeded"


def test_batch_reports_a_bad_premises_file(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "premise": "A"}\nnot json\n', encoding="utf-8")
    result = cli("run", BATCH, "-i", f"premises={bad}", "--no-progress")
    assert result.returncode == 1
    assert f"{bad}:2: not valid JSON" in result.stdout
