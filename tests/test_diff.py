"""`storyflow diff`: the pure pieces (word diff, JSON diff, step selection, the model
built from made-up records), then the real command on real runs.

The command is driven in subprocesses: runs of a small python workflow (one input
reaches some steps and not others) and of the flagship short-story; what diff names
as differing is checked against `storyflow show --json` of both runs; its JSON is
validated against ``schemas/diff.schema.json``; its HTML searched for anything
external. Forks are made with the Store API (records with ``forked_from``).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import SCHEMAS, WORKFLOWS
from storyflow.compare import (
    RunRecords,
    build_diff,
    compare_folders,
    inline,
    json_changes,
    merged_order,
    render_html,
    render_text,
    same,
    selects,
    text_diff,
    to_document,
)
from storyflow.store import RunRecord, StepRecord, Store

Cli = Callable[..., Any]
T0 = 1_700_000_000.0
VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((SCHEMAS / "diff.schema.json").read_text(encoding="utf-8")))


# --- word diff --------------------------------------------------------------------------


def _sides(segments: Any) -> tuple[str, str]:
    a = "".join(t for op, t in segments if op in "=-")
    b = "".join(t for op, t in segments if op in "=+")
    return a, b


def test_word_diff_names_the_changed_words() -> None:
    diff = text_diff("The cat sat on the mat.", "The dog sat on the mat.")
    assert diff.unit == "word"
    assert [s for s in diff.segments if s[0] != "="] == [("-", "cat "), ("+", "dog ")]
    assert (diff.removed, diff.added) == (1, 1)
    assert inline(diff) == "The [-cat-]{+dog+} sat on the mat."


def test_word_diff_keeps_spacing_apart_from_words() -> None:
    diff = text_diff("one two\n\nthree", "one two three")
    assert _sides(diff.segments) == ("one two\n\nthree", "one two three")
    assert ("=", "one two") in diff.segments  # the words match; only the space changed
    assert diff.removed == diff.added == 0


def test_compact_word_diff_cuts_long_equal_stretches() -> None:
    words = " ".join(f"w{i}" for i in range(40))
    text = inline(text_diff(words + " old " + words, words + " new " + words))
    assert "[-old-]{+new+}" in text
    assert text.startswith("… w34") and text.endswith("w5 …")


@given(st.text(alphabet="ab \n.", max_size=40), st.text(alphabet="ab \n.", max_size=40))
def test_word_diff_gives_back_both_texts(a: str, b: str) -> None:
    assert _sides(text_diff(a, b).segments) == (a, b)


def test_long_texts_are_matched_by_line_then_by_word() -> None:
    paragraphs = [" ".join(f"p{p}w{w}" for w in range(60)) for p in range(60)]
    a = "\n\n".join(paragraphs)
    paragraphs[30] = paragraphs[30].replace("p30w7 ", "seven ")
    b = "\n\n".join(paragraphs[:10] + paragraphs[11:]) + "\n\nThe end."
    diff = text_diff(a, b)
    assert diff.unit == "word" and _sides(diff.segments) == (a, b)
    assert ("-", "p30w7 ") in diff.segments and ("+", "seven ") in diff.segments
    assert diff.added == 3 and diff.removed == 61


def test_very_long_texts_are_compared_by_line() -> None:
    a = "\n".join("word " * 5 for _ in range(5_000))
    diff = text_diff(a, a + "\nthe end")
    assert diff.unit == "line"
    assert _sides(diff.segments) == (a, a + "\nthe end")


# --- structural diff ----------------------------------------------------------------------


def test_json_changes_are_json_pointers() -> None:
    a = {"title": "Low Water", "tags": ["x", "y"], "n": 1, "a/b": {"~k": 1}, "gone": 0}
    b = {"title": "High Water", "tags": ["x"], "n": True, "a/b": {"~k": 2}, "new": [1]}
    changes = [(c.path, c.change, c.a, c.b) for c in json_changes(a, b)]
    assert changes == [
        ("/title", "changed", "Low Water", "High Water"),
        ("/tags/1", "removed", "y", None),
        ("/n", "changed", 1, True),  # 1 is not true
        ("/a~1b/~0k", "changed", 1, 2),
        ("/gone", "removed", 0, None),
        ("/new", "added", None, [1]),
    ]
    assert json_changes("text", {"x": 1})[0].path == ""
    assert same({"a": [1, 2.0]}, {"a": [1.0, 2]}) and not same([True], [1])


# --- selection and order ------------------------------------------------------------------


def test_step_selects_items_and_iterations() -> None:
    assert selects("draft", "draft") and selects("draft", "draft[3]")
    assert selects("polish", "polish#2.revise") and not selects("polish", "polishing")
    assert selects("polish.revise", "polish#12.revise")
    assert not selects("polish.revise", "polish#1.critique")
    assert selects("draft[3]", "draft[3]") and not selects("draft[3]", "draft[30]")


def test_steps_only_b_has_follow_their_place() -> None:
    a = ["plan", "loop", "loop#1.x", "end"]
    b = ["start", "plan", "loop", "loop#1.x", "loop#2.x", "end", "extra"]
    assert merged_order(a, b) == ["start", "plan", "loop", "loop#1.x", "loop#2.x", "end",
                                  "extra"]


# --- the model, from made-up records ------------------------------------------------------


def _run(run_id: str, **kw: Any) -> RunRecord:
    fields: dict[str, Any] = dict(
        run_id=run_id, workflow="tale", workflow_path="/w/tale.yaml", workflow_version="1",
        source_hash="h1", status="succeeded", inputs={"tone": "wry"}, environment=None,
        sets=[], created_at=T0, updated_at=T0 + 10, ended_at=T0 + 10,
        meta={"steps": ["plan", "draft", "title"]})
    fields.update(kw)
    return RunRecord(**fields)


def _step(sid: str, output: Any, *, took: float = 1.0, fp: str = "f", **kw: Any) -> StepRecord:
    return StepRecord(id=sid, status=kw.pop("status", "succeeded"), attempts=kw.pop("attempts", 1),
                      fingerprint=fp, output=output, started_at=T0, ended_at=T0 + took, **kw)


def _records(run: RunRecord, *steps: StepRecord) -> RunRecords:
    return RunRecords(run, [s.id for s in steps], {s.id: s for s in steps})


def test_a_fork_shows_what_it_kept() -> None:
    a = _run("A1", meta={})
    b = _run("B1", forked_from="A1", inputs={"tone": "eerie"}, sets=["seed=2"],
             fork={"kind": "fork", "from": ["draft"], "inputs": ["tone"], "sets": ["seed=2"],
                   "file": None})
    usage = {"tokens": 100, "cost": 0.5}
    diff = build_diff(
        _records(a, _step("plan", {"acts": 3}, meta={"usage": usage}),
                 _step("draft", "The cat sat.", meta={"usage": usage}), _step("title", "T")),
        _records(b, _step("plan", {"acts": 3}, forked_from="A1", meta={"usage": usage}),
                 _step("draft", "The dog sat.", took=2.0, fp="g",
                       meta={"usage": {"tokens": 150, "cost": None}}),
                 _step("title", "T", attempts=2)),
    )
    steps = {s.id: s for s in diff.steps}
    assert steps["plan"].origin == "kept" and steps["plan"].equal
    assert steps["draft"].origin == "rerun" and steps["draft"].change == "changed"
    assert steps["draft"].fingerprint == "different"
    words = steps["draft"].output.text
    assert words is not None and inline(words) == "The [-cat-]{+dog+} sat."
    assert steps["title"].equal and steps["title"].attempts.b == 2  # attempts do not count
    assert diff.lineage.relation == "b_from_a" and diff.lineage.inputs == ("tone",)
    assert [(c.path, c.a, c.b) for c in diff.inputs] == [("/tone", "wry", "eerie")]
    assert [(c.path, c.change) for c in diff.sets] == [("seed", "added")]
    ta, tb = diff.totals.a, diff.totals.b
    assert (ta.tokens, ta.cost, ta.cost_known) == (200, 1.0, True)
    assert (tb.tokens, tb.cost_known) == (250, False)
    assert diff.summary.outputs_differ == ("draft",) and diff.summary.kept == 1
    doc = to_document(diff)
    VALIDATOR.validate(doc)
    assert doc["totals"]["delta"]["cost"] is None and doc["totals"]["delta"]["tokens"] == 50
    text = render_text(diff)
    assert "B is a fork of A (re-run from draft; inputs changed: tone; --set seed=2)" in text
    assert "2 steps equal (plan … title)" not in text  # not adjacent: draft is between
    assert "1 step equal (plan; 1 kept by the fork)" in text and "1 step equal (title)" in text


def test_steps_only_in_one_run_and_statuses() -> None:
    a = _run("A1")
    b = _run("B1", status="failed")
    diff = build_diff(
        _records(a, _step("plan", 1), _step("gone", 2)),
        _records(b, _step("plan", None, status="failed",
                          error={"class": "permanent", "message": "boom"}), _step("new", 3)),
    )
    changes = {s.id: s.change for s in diff.steps}
    assert changes == {"plan": "changed", "gone": "only_a", "new": "only_b"}
    assert [f.name for f in diff.fields] == ["status"]
    assert diff.summary.differs
    text = render_text(diff)
    assert "error in B: permanent: boom" in text
    assert re.search(r"^status\s+succeeded → failed$", text, re.M)
    assert re.search(r"^plan\s+succeeded → failed\s+re-run", text, re.M)
    VALIDATOR.validate(to_document(diff))


def test_artifacts_file_by_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "sub").mkdir(parents=True)
        (folder / "events.jsonl").write_text(f"{folder.name}\n")
        (folder / "events.jsonl.before-gc").write_text(f"{folder.name}\n")  # gc put it back
        (folder / ".hidden").write_text(folder.name)
        (folder / "same.txt").write_text("same")
        (folder / "sub" / "story.md").write_text(f"The {'cat' if folder == a else 'dog'} sat.")
    (a / "old.bin").write_bytes(b"\0\1")
    (b / "new.txt").write_text("new")
    found = {f.name: f for f in compare_folders(a, b)}
    assert {n: f.change for n, f in found.items()} == {
        "new.txt": "only_b", "old.bin": "only_a", "same.txt": "same",
        "sub/story.md": "changed"}
    story = found["sub/story.md"].diff
    assert story is not None and inline(story) == "The [-cat-]{+dog+} sat."
    assert found["old.bin"].text.a is None and found["old.bin"].size.a == 2


def test_html_escapes_what_runs_hold() -> None:
    evil = '<script>alert("x")</script> see http://example.invalid'
    a, b = _run("A1"), _run("B1", inputs={"tone": evil})
    page = render_html(build_diff(_records(a, _step("plan", "a <b> c")),
                                  _records(b, _step("plan", evil))))
    assert "<script" not in page and "://" not in page
    assert "&lt;script&gt;" in page


# --- the real command ---------------------------------------------------------------------

AGENTS = '''\
def say(text):
    return text


def facts(name):
    return {"name": name, "legs": 4, "tags": ["pet", name]}
'''

SMALL = """\
apiVersion: storyflow/v1
name: small
inputs:
  animal: {type: string, default: cat}
steps:
  intro:
    uses: python
    with: {callable: "agents:say", text: "The {{ inputs.animal }} sat on the mat."}
  fixed: {uses: python, with: {callable: "agents:say", text: "Nothing changes here."}}
  facts: {uses: python, with: {callable: "agents:facts", name: "{{ inputs.animal }}"}}
  items: {uses: template, with: {template: "{{ ['one', inputs.animal] }}"}}
  each:
    for_each: steps.items.output
    uses: python
    with: {callable: "agents:say", text: "item {{ item }}"}
  end: {uses: template, with: {template: "{{ steps.intro.output }} {{ steps.fixed.output }}"}}
outputs:
  story: "{{ steps.end.output }}"
artifacts:
  story.md: "{{ steps.end.output }}"
"""


@pytest.fixture
def small(tmp_path: Path) -> Path:
    (tmp_path / "agents.py").write_text(AGENTS, encoding="utf-8")
    path = tmp_path / "small.yaml"
    path.write_text(SMALL, encoding="utf-8")
    return path


def _start(cli: Cli, *args: Any) -> str:
    result = cli("run", *args, "--json")
    assert result.returncode == 0, result.stderr
    run_id: str = json.loads(result.stdout.strip().splitlines()[-1])["run_id"]
    return run_id


def _ok(cli: Cli, *args: Any, code: int = 0) -> str:
    result = cli(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    out: str = result.stdout
    return out


def _doc(cli: Cli, *args: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_ok(cli, "diff", *args, "--format", "json"))
    VALIDATOR.validate(doc)
    return doc


def _outputs_differ(cli: Cli, run_a: str, run_b: str) -> list[str]:
    """What `show --json` of both runs says: the instances whose outputs differ."""
    shown = [{s["id"]: s["output"] for s in json.loads(_ok(cli, "show", r, "--json"))["steps"]}
             for r in (run_a, run_b)]
    ids = list(dict.fromkeys([*shown[0], *shown[1]]))
    return [i for i in ids if shown[0].get(i) != shown[1].get(i)]


def test_diff_names_exactly_the_steps_whose_outputs_differ(cli: Cli, small: Path) -> None:
    run_a = _start(cli, small)
    run_b = _start(cli, small, "-i", "animal=dog")
    doc = _doc(cli, run_a[:17], run_b)
    expected = _outputs_differ(cli, run_a, run_b)
    assert set(expected) == {"intro", "facts", "items", "each", "each[1]", "end"}
    assert doc["summary"]["outputs_differ"] == expected
    steps = {s["id"]: s for s in doc["steps"]}
    assert steps["fixed"]["change"] == "equal" and steps["each[0]"]["change"] == "equal"
    assert steps["intro"]["output"]["kind"] == "text"
    assert steps["intro"]["fingerprint"] == "different"
    assert [c["path"] for c in steps["facts"]["output"]["changes"]] == ["/name", "/tags/1"]
    assert steps["intro"]["request"] in ("different", None)  # when the engine records it
    assert doc["inputs"] == [{"path": "/animal", "change": "changed", "a": "cat", "b": "dog"}]
    assert doc["lineage"]["relation"] == "unrelated"
    assert [(f["name"], f["change"]) for f in doc["artifacts"]] == [("story.md", "changed")]
    assert doc["summary"]["differs"] is True

    text = _ok(cli, "diff", run_a, run_b)
    assert "[-cat-]{+dog+}" in text  # the word diff of intro, end and story.md
    assert "1 step equal (fixed)" in text
    assert '~ animal: "cat" → "dog"' in text and '~ /tags/1: "cat" → "dog"' in text
    assert re.search(r"^story\.md\s+changed", text, re.M)
    _ok(cli, "diff", run_a, run_b, "--exit-code", code=1)


def test_a_run_against_itself_is_all_equal(cli: Cli, small: Path) -> None:
    run_id = _start(cli, small)
    doc = _doc(cli, run_id, run_id)
    assert doc["summary"]["differs"] is False and doc["summary"]["outputs_differ"] == []
    text = _ok(cli, "diff", run_id, run_id, "--exit-code")
    assert "8 steps equal (intro … end)" in text


def test_step_limits_the_diff(cli: Cli, small: Path) -> None:
    run_a = _start(cli, small)
    run_b = _start(cli, small, "-i", "animal=dog")
    doc = _doc(cli, run_a, run_b, "--step", "each")
    assert [s["id"] for s in doc["steps"]] == ["each", "each[0]", "each[1]"]
    assert doc["step"] == "each" and doc["artifacts"] == []
    text = _ok(cli, "diff", run_a, run_b, "--step", "each")
    assert "each[0]" in text and "steps equal" not in text  # every selected step listed
    assert "intro" not in text.split("STEP", 1)[1]

    result = cli("diff", run_a, run_b, "--step", "eahc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "neither run has a step 'eahc'" in result.stderr
    assert "did you mean 'each'?" in result.stderr


def test_html_is_one_page_with_both_stories(cli: Cli, small: Path, tmp_path: Path) -> None:
    run_a = _start(cli, small)
    run_b = _start(cli, small, "-i", "animal=dog")
    out = tmp_path / "diff.html"
    result = cli("diff", run_a, run_b, "--format", "html", "-o", out)
    assert result.returncode == 0 and result.stdout == "" and str(out) in result.stderr
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1
    assert "<del>cat</del>" in page and "<ins>dog</ins>" in page
    for bad in ("<script", "<link", "src=", "://", "@import"):
        assert bad not in page


def test_unknown_runs_and_formats_are_usage_errors(cli: Cli, small: Path) -> None:
    run_id = _start(cli, small)
    for args in ((run_id, "nope"), ("nope", run_id), (run_id, run_id, "--format", "xml")):
        result = cli("diff", *args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert "no run matches 'nope'" in cli("diff", run_id, "nope").stderr


@pytest.mark.slow
def test_two_short_stories(cli: Cli, tmp_path: Path) -> None:
    """The flagship with two seeds: every difference named, both stories on the page."""
    flagship = WORKFLOWS / "short-story.yaml"
    run_a = _start(cli, flagship)
    run_b = _start(cli, flagship, "--set", "seed=8")
    doc = _doc(cli, run_a, run_b)
    assert doc["summary"]["outputs_differ"] == _outputs_differ(cli, run_a, run_b)
    assert doc["sets"] == [{"path": "seed", "change": "added", "b": "8"}]
    assert {f["name"]: f["change"] for f in doc["artifacts"]} == {"story.md": "changed"}
    only = doc["summary"]["only_a"] + doc["summary"]["only_b"]
    assert doc["summary"]["equal"] + doc["summary"]["changed"] + only == len(doc["steps"])

    page = _ok(cli, "diff", run_a, run_b, "--format", "html")
    assert "://" not in page and "<script" not in page
    # story.md side by side: column A holds A's story (its own words in <del>), B B's.
    found = re.search(r'<h4>story\.md · changed</h4><div class="sbs">'
                      r'<div><div class="side">A</div><div class="pane full">(.*?)</div></div>'
                      r'<div><div class="side">B</div><div class="pane full">(.*?)</div></div>',
                      page, re.S)
    assert found is not None
    for run_id, column in zip((run_a, run_b), found.groups(), strict=True):
        story = json.loads(_ok(cli, "show", run_id, "--json"))["outputs"]["story"]
        assert html.unescape(re.sub(r"</?(del|ins)>", "", column)) == story
    assert "<ins>" not in found[1] and "<del>" not in found[2]

    loop = _doc(cli, run_a, run_b, "--step", "edit.critique")["steps"]
    assert loop and all(re.fullmatch(r"edit#\d+\.critique", s["id"]) for s in loop)


def test_records_a_fork_kept_show_as_kept(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        store.put_run(_run("20240101-000000-aaaaaa"))
        store.put_run(_run("20240101-000001-bbbbbb", forked_from="20240101-000000-aaaaaa",
                           created_at=T0 + 1,
                           fork={"kind": "replay", "from": [], "inputs": [], "sets": [],
                                 "file": None}))
        store.put_steps("20240101-000000-aaaaaa", [
            _step("plan", {"acts": 3}), _step("draft", "The cat sat."), _step("title", "T")])
        store.put_steps("20240101-000001-bbbbbb", [
            _step("plan", {"acts": 3}, forked_from="20240101-000000-aaaaaa"),
            _step("draft", "The dog sat."),
            _step("title", "T", forked_from="20240101-000000-aaaaaa")])
    doc = _doc(cli, "20240101-000000", "20240101-000001")
    assert {s["id"]: s["origin"] for s in doc["steps"]} == {
        "plan": "kept", "draft": "rerun", "title": "kept"}
    assert doc["summary"]["kept"] == 2 and doc["summary"]["outputs_differ"] == ["draft"]
    assert doc["lineage"] == {"relation": "b_from_a", "parent": "20240101-000000-aaaaaa",
                              "kind": "replay", "from": [], "inputs": [], "sets": [],
                              "file": None}
    text = _ok(cli, "diff", "20240101-000001", "20240101-000000")  # A made from B
    assert "A is a replay of B" in text
    assert re.search(r"^plan\s+succeeded\s+kept", text, re.M) is None  # equal: folded
    assert "1 step equal (plan; 1 kept by the fork)" in text
    assert re.search(r"^draft\s+succeeded\s+re-run", text, re.M)


# --- found by using the command ---------------------------------------------------------

NESTED = """\
apiVersion: storyflow/v1
name: nested
steps:
  outer:
    loop:
      max_iterations: 2
      until: "false"
      steps:
        parts: {uses: template, with: {template: "{{ ['a', 'b'] }}"}}
        inner:
          loop:
            max_iterations: 2
            until: "false"
            steps:
              x: {uses: template, with: {template: "x {{ loop.iteration }}"}}
"""


def test_step_selects_a_step_of_nested_loops_and_one_iteration(
        cli: Cli, tmp_path: Path) -> None:
    assert selects("outer.inner.x", "outer#1.inner#2.x")
    assert selects("outer#1.inner.x", "outer#1.inner#2.x")
    assert not selects("outer#1.inner.x", "outer#2.inner#1.x")
    assert selects("polish#2", "polish#2.revise") and not selects("polish#2", "polish#1.x")
    path = tmp_path / "nested.yaml"
    path.write_text(NESTED, encoding="utf-8")
    run_a, run_b = _start(cli, path), _start(cli, path)
    for step, expected in (
        ("outer.inner.x", ["outer#1.inner#1.x", "outer#1.inner#2.x", "outer#2.inner#1.x",
                           "outer#2.inner#2.x"]),
        ("outer#2.inner.x", ["outer#2.inner#1.x", "outer#2.inner#2.x"]),
        ("outer#1", ["outer#1.parts", "outer#1.inner", "outer#1.inner#1.x",
                     "outer#1.inner#2.x"]),
    ):
        assert [s["id"] for s in _doc(cli, run_a, run_b, "--step", step)["steps"]] == expected


OUTPUTS = """\
apiVersion: storyflow/v1
name: outputs
inputs:
  none: {type: boolean, default: false}
steps:
  maybe: {uses: python, with: {callable: "agents:maybe", none: "{{ inputs.none }}"}}
"""


def test_a_null_output_is_a_value_not_a_missing_one(cli: Cli, small: Path) -> None:
    with (small.parent / "agents.py").open("a", encoding="utf-8") as f:
        f.write("\n\ndef maybe(none):\n    return None if none else {'v': 1}\n")
    path = small.parent / "outputs.yaml"
    path.write_text(OUTPUTS, encoding="utf-8")
    run_a, run_b = _start(cli, path), _start(cli, path, "-i", "none=true")
    (step,) = _doc(cli, run_a, run_b)["steps"]
    assert step["status"] == {"a": "succeeded", "b": "succeeded"}
    assert step["output"]["changes"] == [{"path": "", "change": "changed", "a": {"v": 1},
                                          "b": None}]
    text = _ok(cli, "diff", run_a, run_b)
    assert "output only in" not in text  # B's step has an output: null
    assert '~ (the whole value): {"v": 1} → null' in text


def test_totals_count_each_runs_own_tasks(cli: Cli, small: Path) -> None:
    """A step id that is a map in one workflow and a task in the other."""
    as_map = small.parent / "as-map.yaml"
    as_map.write_text(SMALL, encoding="utf-8")
    as_task = small.parent / "as-task.yaml"
    as_task.write_text(SMALL.replace("name: small", "name: other").replace(
        "    for_each: steps.items.output\n", "").replace("{{ item }}", "one"),
        encoding="utf-8")
    run_a, run_b = _start(cli, as_map), _start(cli, as_task)
    doc = _doc(cli, run_a, run_b)
    each = next(s for s in doc["steps"] if s["id"] == "each")
    assert each["attempts"] == {"a": 1, "b": 1}
    # A: 5 tasks, and each's 2 items (each itself is a map, not counted); B: 6 tasks.
    assert (doc["totals"]["a"]["attempts"], doc["totals"]["b"]["attempts"]) == (7, 6)
    b_time = sum(s["duration_s"]["b"] or 0 for s in doc["steps"])
    assert doc["totals"]["b"]["duration_s"] == pytest.approx(b_time, abs=1e-3)


def test_diff_reads_run_folders_without_making_them(
        cli: Cli, small: Path, state_dir: Path) -> None:
    import shutil

    run_a, run_b = _start(cli, small), _start(cli, small)
    shutil.rmtree(state_dir / "runs" / run_a)
    doc = _doc(cli, run_a, run_b)
    assert [(f["name"], f["change"]) for f in doc["artifacts"]] == [("story.md", "only_b")]
    assert not (state_dir / "runs" / run_a).exists()


def test_a_damaged_step_record_is_named_once(cli: Cli, small: Path, state_dir: Path) -> None:
    import sqlite3

    run_a, run_b = _start(cli, small), _start(cli, small, "-i", "animal=dog")
    with sqlite3.connect(state_dir / "db" / "cache.db") as con:
        assert con.execute("UPDATE Cache SET value = ? WHERE key = ?",
                           (b"\x80\x05garbage", f"step:{run_a}:each")).rowcount == 1
    con.close()
    for args in ((run_a, run_b), (run_a, run_a)):
        result = cli("diff", *args, "--format", "json")
        assert result.returncode == 0 and "Traceback" not in result.stderr
        VALIDATOR.validate(json.loads(result.stdout))
        assert result.stderr.splitlines() == [
            f"warning: step record each of run {run_a} is damaged (it does not decode: "
            "UnpicklingError: pickle data was truncated); compared as not started"]
    steps = {s["id"]: s for s in json.loads(cli("diff", run_a, run_b, "--format",
                                                "json").stdout)["steps"]}
    assert steps["each"]["status"] == {"a": "pending", "b": "succeeded"}
    assert steps["each[0]"]["status"]["a"] is None  # its items are not known in A
