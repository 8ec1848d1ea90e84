"""Lineage in what users read: `runs` names each fork's parent and `--tree` nests forks
under it, `show` names the parent and fork point and marks the steps a fork kept, and
`show --step` prints the step's recorded request readably.

The records are written straight through the Store API (no fork is run), then read
back by the real CLI in a subprocess; every JSON document is checked against its schema.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import SCHEMAS, Cli
from storyflow.store import RunRecord, StepRecord, Store

T0 = 1_767_261_600.0  # 2026-01-01 10:00 UTC
PARENT = "20260101-100000-aaaaaa"
FORK = "20260101-100140-bbbbbb"
CHILD = f"{FORK}.sub-0"  # a sub-workflow run of the fork
REPLAY = "20260101-100320-cccccc"  # made from the fork: two levels down
FORK2 = "20260101-100500-dddddd"  # the parent's newest fork
PLAIN = "20260101-100050-eeeeee"  # no lineage at all
GONE = "20251231-000000-dead00"  # removed by gc: no record
ORPHAN = "20260101-100640-ffffff"  # a fork of GONE

PROMPT = "Edit this draft.\nKeep the tone: wry.\n\n  Indented line stays indented."
REQUEST = {
    "uses": "builtin/grammar",
    "inputs": {"grammar": "grammars/editor.yaml", "prompt": PROMPT, "temperature": 0.8},
    "output_schema": {"type": "object", "required": ["score"]},
}
FORK_POINT = {"kind": "fork", "from": ["editor"], "inputs": ["tone"], "sets": ["seed=8"],
              "file": None}


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


RUNS = _validator("runs")
SHOW = _validator("show")


def _run(run_id: str, at: float, **extra: Any) -> RunRecord:
    return RunRecord(
        run_id=run_id, workflow=extra.pop("workflow", "story"),
        workflow_path="/work/story.yaml", workflow_version="3", source_hash="h",
        status="succeeded", inputs={"tone": "wry"}, environment=None, sets=[],
        created_at=at, updated_at=at + 5, ended_at=at + 5,
        meta={"steps": ["plan", "editor", "assemble"], "active_s": 5.0}, **extra,
    )


def _step(sid: str, at: float, **extra: Any) -> StepRecord:
    return StepRecord(id=sid, status="succeeded", attempts=1, output=f"{sid} out",
                      started_at=at, ended_at=at + 1, agent="writer", **extra)


@pytest.fixture
def lineage(state_dir: Path) -> Path:
    """PARENT ← FORK ← REPLAY, PARENT ← FORK2, FORK's sub-workflow run CHILD, an
    unrelated PLAIN run, and ORPHAN, whose parent GONE is not in the store."""
    with Store(state_dir) as store:
        store.put_run(_run(PARENT, T0))
        store.put_steps(PARENT, [_step(s, T0, request=REQUEST if s == "editor" else None)
                                 for s in ("plan", "editor", "assemble")])
        store.put_run(_run(PLAIN, T0 + 50))
        store.put_run(_run(FORK, T0 + 100, forked_from=PARENT, fork=FORK_POINT))
        store.put_steps(FORK, [
            _step("plan", T0, forked_from=PARENT),  # kept: copied from the parent
            _step("editor", T0 + 100, request=REQUEST),
            _step("assemble", T0 + 101, forked_from="20251201-000000-0ld000"),
        ])
        child = _run(CHILD, T0 + 101, workflow="chapter", parent_run=FORK, parent_step="sub")
        store.put_run(child)
        store.put_run(_run(REPLAY, T0 + 200, forked_from=FORK, fork={
            "kind": "replay", "from": [], "inputs": [], "sets": [], "file": None}))
        store.put_run(_run(FORK2, T0 + 300, forked_from=PARENT, fork={
            **FORK_POINT, "from": [], "inputs": [], "sets": [], "file": "/work/story-v4.yaml"}))
        # a record written oddly (kind unknown, lists not lists) still reads
        store.put_run(_run(ORPHAN, T0 + 400, forked_from=GONE, fork={
            "kind": "spoon", "from": "editor", "inputs": [3, "tone"]}))
    return state_dir


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    return result.stdout


def _json(cli: Cli, *args: str) -> Any:
    return json.loads(_ok(cli(*args, "--json")))


def _row(text: str, run_id: str) -> str:
    """The table row of ``run_id`` (or step id): its first column, after any tree mark."""
    return next(line for line in text.splitlines() if run_id in line.split()[:2])


# --- runs -----------------------------------------------------------------------------------


def test_runs_names_each_forks_parent(cli: Cli, lineage: Path) -> None:
    text = _ok(cli("runs"))
    lines = text.splitlines()
    assert lines[0].split() == ["RUN", "WORKFLOW", "STATUS", "STARTED", "DURATION", "ORIGIN"]
    assert [line.split()[0] for line in lines[1:] if not line.startswith(" ")] == [
        ORPHAN, FORK2, REPLAY, FORK, PLAIN, PARENT]
    assert _row(text, FORK).endswith(f"fork of {PARENT}")
    assert _row(text, REPLAY).endswith(f"replay of {FORK}")
    assert _row(text, ORPHAN).endswith(f"fork of {GONE} (gone)")
    assert _row(text, PLAIN).endswith("5.0s")  # no origin: the column stays empty
    assert lines[lines.index(_row(text, FORK)) + 1].startswith(f"  └ {CHILD} ")

    docs = _json(cli, "runs")
    RUNS.validate(docs)
    by_id = {d["run_id"]: d for d in docs}
    assert (by_id[FORK]["forked_from"], by_id[FORK]["fork"]) == (PARENT, FORK_POINT)
    assert by_id[PLAIN]["forked_from"] is None and by_id[PLAIN]["fork"] is None
    assert by_id[ORPHAN]["forked_from_gone"] is True
    assert by_id[ORPHAN]["fork"] == {"kind": "fork", "from": [], "inputs": ["tone"],
                                     "sets": [], "file": None}
    assert not by_id[FORK]["forked_from_gone"]
    assert all("forks" not in d for d in docs)

    flat = _json(cli, "runs", "--all")
    RUNS.validate(flat)
    assert {d["run_id"]: d["forked_from"] for d in flat}[REPLAY] == FORK
    header = _ok(cli("runs", "--all")).splitlines()[0].split()
    assert header[-2:] == ["ORIGIN", "PARENT"]


def test_runs_tree_nests_forks_under_their_parents(cli: Cli, lineage: Path) -> None:
    text = _ok(cli("runs", "--tree"))
    lines = text.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [
        [ORPHAN, "story"],
        [PLAIN, "story"],
        [PARENT, "story"],
        ["↳", FORK2],
        ["↳", FORK],
        ["└", CHILD],  # the fork's sub-workflow run, then the fork's own fork
        ["↳", REPLAY],
    ]
    assert lines[4].startswith(f"  ↳ {FORK2} ") and lines[6].startswith(f"    └ {CHILD} ")
    assert lines[7].startswith(f"    ↳ {REPLAY} ") and lines[7].endswith(f"replay of {FORK}")
    assert lines[1].endswith(f"fork of {GONE} (gone)")

    docs = _json(cli, "runs", "--tree")
    RUNS.validate(docs)
    assert [d["run_id"] for d in docs] == [ORPHAN, PLAIN, PARENT]
    parent = docs[2]
    assert [f["run_id"] for f in parent["forks"]] == [FORK2, FORK]
    fork = parent["forks"][1]
    assert [c["run_id"] for c in fork["children"]] == [CHILD]
    assert [f["run_id"] for f in fork["forks"]] == [REPLAY]
    assert fork["forks"][0]["fork"]["kind"] == "replay" and fork["forks"][0]["forks"] == []

    assert [d["run_id"] for d in _json(cli, "runs", "--tree", "--limit", "1")] == [ORPHAN]
    mixed = cli("runs", "--tree", "--all")
    assert mixed.returncode == 2 and "--tree and --all" in mixed.stderr
    assert "Traceback" not in mixed.stderr


# --- show -----------------------------------------------------------------------------------


def test_show_names_the_parent_and_fork_point_and_marks_kept_steps(
    cli: Cli, lineage: Path
) -> None:
    text = _ok(cli("show", FORK))
    assert (f"fork of {PARENT}: --from editor; inputs changed: tone; settings: seed=8"
            in text.splitlines())
    assert _row(text, "plan").split()[1:3] == ["succeeded", "(kept)"]
    assert _row(text, "editor").split()[1:3] == ["succeeded", "1"]
    assert "succeeded (kept from 20251201-000000-0ld000)" in _row(text, "assemble")

    doc = _json(cli, "show", FORK)
    SHOW.validate(doc)
    assert (doc["forked_from"], doc["fork"], doc["forked_from_gone"]) == (
        PARENT, FORK_POINT, False)
    steps = {s["id"]: s for s in doc["steps"]}
    assert steps["plan"]["forked_from"] == PARENT
    assert "forked_from" not in steps["editor"] and steps["editor"]["request"] == REQUEST

    assert f"replay of {FORK}" in _ok(cli("show", REPLAY)).splitlines()
    assert f"fork of {PARENT}: file: /work/story-v4.yaml" in _ok(cli("show", FORK2))
    assert f"fork of {GONE} (gone): inputs changed: tone" in _ok(cli("show", ORPHAN))
    orphan = _json(cli, "show", ORPHAN)
    SHOW.validate(orphan)
    assert orphan["forked_from_gone"] is True

    plain = _json(cli, "show", PLAIN)  # a run with no lineage is still valid
    SHOW.validate(plain)
    assert plain["forked_from"] is None and plain["fork"] is None
    assert "fork of" not in _ok(cli("show", PLAIN))


def test_show_step_prints_the_request_prompt_over_several_lines(
    cli: Cli, lineage: Path
) -> None:
    lines = _ok(cli("show", FORK, "--step", "editor")).splitlines()
    assert lines[0].startswith("step editor: succeeded · 1 attempt(s)")
    at = lines.index("request:")
    assert lines.index("output:") < at  # after what it printed before
    assert lines[at + 1:] == [
        "  uses: builtin/grammar",
        "  inputs:",
        "    grammar: grammars/editor.yaml",
        "    prompt:",
        "      Edit this draft.",
        "      Keep the tone: wry.",
        "",
        "        Indented line stays indented.",
        "    temperature: 0.8",
        "  output_schema:",
        "    type: object",
        "    required:",
        "      - score",
    ]
    kept = _ok(cli("show", FORK, "--step", "plan")).splitlines()
    assert kept[0].startswith("step plan: succeeded (kept) · ")
    assert "request:" not in kept  # none recorded

    one = _json(cli, "show", FORK, "--step", "editor")
    SHOW.validate({**_json(cli, "show", FORK), "steps": [one]})
    assert one["request"]["inputs"]["prompt"] == PROMPT
