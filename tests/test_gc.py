"""`storyflow gc` through the real CLI: which runs go, what of them goes, and what stays.

Runs are made through the Store API with their times set in the past (the CLI's clock
is the real one): nothing sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from storyflow.store import RunRecord, StepRecord, Store
from storyflow.store._gc import GC_LEASE_KEY
from storyflow.store._store import RUN_INDEX_KEY, lease_key

Cli = Callable[..., subprocess.CompletedProcess[str]]

NOW = time.time()
DAY = 86400.0
GC_SCHEMA = jsonschema.Draft202012Validator(json.loads(
    (Path(__file__).resolve().parents[1] / "schemas" / "gc.schema.json").read_text("utf-8")))
BIG = "x" * 40_000
"""An output diskcache keeps in a file of its own."""


def add_run(
    store: Store,
    run_id: str,
    workflow: str,
    *,
    days_old: float,
    status: str = "succeeded",
    parent: str | None = None,
    forked_from: str | None = None,
    steps: int = 2,
    big: bool = False,
) -> RunRecord:
    """A run (its record, step records and folder) that last changed ``days_old`` ago."""
    t = NOW - days_old * DAY
    rec = RunRecord(
        run_id=run_id, workflow=workflow, workflow_path=f"/nowhere/{workflow}.yaml",
        workflow_version=None, source_hash="h", status=status, inputs={}, environment=None,
        sets=[], created_at=t, updated_at=t, ended_at=None if status == "running" else t,
        parent_run=parent, parent_step=None if parent is None else "sub",
        forked_from=forked_from, meta={"steps": [f"s{i}" for i in range(steps)]},
    )
    store.put_run(rec)
    store.put_steps(run_id, [
        StepRecord(id=f"s{i}", status="succeeded", attempts=1,
                   output=BIG if big and i == 0 else f"out {i}")
        for i in range(steps)
    ])
    folder = store.run_dir(run_id)
    (folder / "events.jsonl").write_text('{"type": "run.started"}\n', encoding="utf-8")
    (folder / "story.md").write_text("Once upon a time.\n", encoding="utf-8")
    return rec


def run_ids(store: Store) -> list[str]:
    return [r.run_id for r in store.list_runs()]


def keys(store: Store) -> list[str]:
    return sorted(k for k in store._cache.iterkeys() if isinstance(k, str))


def folders(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "runs").iterdir())


def removed_table(out: str) -> list[list[str]]:
    """The rows of gc's table (RUN, WORKFLOW, STATUS, AGE, sub-workflow runs)."""
    lines = out.splitlines()
    if not lines or not lines[0].startswith("RUN "):
        return []
    rows = []
    for line in lines[1:]:
        if line.startswith(("kept ", "removed ", "would remove ")):
            break
        rows.append(re.split(r"\s{2,}", line))
    return rows


# --- what goes -----------------------------------------------------------------------


def test_gc_removes_a_run_whole(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        add_run(store, "20250101-000000-aaaaaa", "novella", days_old=40, big=True)
        add_run(store, "20250101-000000-aaaaaa.chapters-0", "chapter", days_old=40,
                parent="20250101-000000-aaaaaa", steps=3)
        add_run(store, "20250301-000000-bbbbbb", "novella", days_old=1)
        store.cache_put("fp-old", "cached output", "20250101-000000-aaaaaa")
        store.cache_put("call-old", {"text": "reply"}, "20250101-000000-aaaaaa.chapters-0")
        store.cache_put("fp-kept", "kept output", "20250301-000000-bbbbbb")
        store.cache_put("fp-orphan", "from a run long gone", "20240101-000000-gone00")
        # A dead holder's lease (its heartbeat long stale) stays until taken over.
        store._cache.set(lease_key("20250101-000000-aaaaaa"), {
            "pid": os.getpid(), "host": socket.gethostname(), "token": "t",
            "heartbeat": NOW - 40 * DAY})

    done = cli("gc", "--older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert removed_table(done.stdout) == [
        ["20250101-000000-aaaaaa", "novella", "succeeded", "40d", "1 sub-workflow run"],
    ]
    summary = done.stdout.splitlines()[-1]
    assert re.fullmatch(r"removed 1 run \(\+1 sub-workflow run\), 5 step records, "
                        r"3 cache entries, \d+\.\d KB", summary), summary

    with Store(state_dir) as store:
        assert run_ids(store) == ["20250301-000000-bbbbbb"]
        assert [k for k in keys(store) if "aaaaaa" in k] == []  # runs, steps, lease
        assert [e[1] for e in store._cache.get(RUN_INDEX_KEY)] == ["20250301-000000-bbbbbb"]
        assert store.cache_get("fp-kept") == (True, "kept output")
        for gone in ("fp-old", "call-old", "fp-orphan"):
            assert store.cache_get(gone) == (False, None)
        assert len(store.get_steps("20250301-000000-bbbbbb", ["s0", "s1"])) == 2
    assert folders(state_dir) == ["20250301-000000-bbbbbb"]
    assert not (state_dir / "trash").exists()
    assert list((state_dir / "db").rglob("*.val")) == []  # the big output's file too
    listed = cli("runs")
    assert listed.returncode == 0 and listed.stderr == ""  # nothing lost, nothing damaged


def test_keep_n_keeps_the_newest_top_level_runs(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        for n in range(5):
            add_run(store, f"2025010{n}-000000-cccccc", "short-story", days_old=10 - n)
        add_run(store, "20250104-000000-cccccc.sub", "chapter", days_old=6,
                parent="20250104-000000-cccccc")  # a child is not counted: it goes along

    done = cli("gc", "--keep", "2")
    assert done.returncode == 0, done.stderr
    assert removed_table(done.stdout) == [
        ["20250102-000000-cccccc", "short-story", "succeeded", "8d"],
        ["20250101-000000-cccccc", "short-story", "succeeded", "9d"],
        ["20250100-000000-cccccc", "short-story", "succeeded", "10d"],
    ]
    with Store(state_dir) as store:
        assert set(run_ids(store)) == {"20250104-000000-cccccc", "20250104-000000-cccccc.sub",
                                       "20250103-000000-cccccc"}


def test_older_than_goes_by_the_last_change(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        old = add_run(store, "20250101-000000-dddddd", "w", days_old=20)
        add_run(store, "20250102-000000-dddddd", "w", days_old=15)
        add_run(store, "20250103-000000-dddddd", "w", days_old=1)
        old.updated_at = old.ended_at = NOW - 2 * DAY  # started 20 days ago, resumed since
        store.put_run(old)

    done = cli("gc", "--older-than", "12d", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    GC_SCHEMA.validate(doc)
    assert [r["run_id"] for r in doc["runs"]] == ["20250102-000000-dddddd"]
    run = doc["runs"][0]
    assert run["workflow"] == "w" and run["status"] == "succeeded" and run["children"] == []
    assert run["step_records"] == 2 and run["bytes"] > 0
    since = time.time() - NOW  # NOW was taken when this module was imported
    assert 15 * DAY + since - 60 < run["age_s"] < 15 * DAY + since + 60
    assert doc["dry_run"] is False and doc["kept"] == [] and doc["recovered"] == []
    assert doc["totals"] == {"runs": 1, "child_runs": 0, "step_records": 2,
                             "cache_entries": 0, "bytes": run["bytes"]}


# --- what stays ----------------------------------------------------------------------


def test_gc_keeps_the_newest_run_of_each_workflow(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        add_run(store, "20250101-000000-eeeeee", "short-story", days_old=50)
        add_run(store, "20250102-000000-eeeeee", "novella", days_old=45)
        add_run(store, "20250103-000000-eeeeee", "short-story", days_old=40)

    done = cli("gc", "--older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert removed_table(done.stdout) == [
        ["20250101-000000-eeeeee", "short-story", "succeeded", "50d"],
    ]
    assert "kept 20250103-000000-eeeeee (short-story): the newest run of its workflow" in (
        done.stdout.splitlines())
    assert "kept 20250102-000000-eeeeee (novella): the newest run of its workflow" in (
        done.stdout.splitlines())
    with Store(state_dir) as store:
        assert run_ids(store) == ["20250103-000000-eeeeee", "20250102-000000-eeeeee"]


def test_gc_keeps_a_live_run_and_removes_one_whose_process_is_gone(
    cli: Cli, state_dir: Path
) -> None:
    with Store(state_dir) as store:
        add_run(store, "20250101-000000-ffffff", "w", days_old=40, status="running")
        add_run(store, "20250102-000000-ffffff", "w", days_old=40, status="running")
        add_run(store, "20250103-000000-ffffff", "w", days_old=1)
        store._cache.set(lease_key("20250102-000000-ffffff"), {  # killed long ago
            "pid": os.getpid(), "host": socket.gethostname(), "token": "t",
            "heartbeat": NOW - 40 * DAY})
        lease = store.acquire_lease("20250101-000000-ffffff")  # this live process
        try:
            done = cli("gc", "--keep", "0")
            assert done.returncode == 0, done.stderr
            assert removed_table(done.stdout) == [
                ["20250102-000000-ffffff", "w", "running", "40d"],
            ]
            assert (f"kept 20250101-000000-ffffff (w): held by process {os.getpid()} on "
                    f"{socket.gethostname()}") in done.stdout.splitlines()
            assert run_ids(store) == ["20250103-000000-ffffff", "20250101-000000-ffffff"]
            assert len(store.get_steps("20250101-000000-ffffff", ["s0", "s1"])) == 2
            assert (state_dir / "runs" / "20250101-000000-ffffff" / "events.jsonl").is_file()
        finally:
            lease.release()


def test_gc_keeps_the_lineage_of_a_kept_fork(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        add_run(store, "20250101-000000-gggggg", "w", days_old=60)  # forked twice over
        add_run(store, "20250102-000000-gggggg", "w", days_old=50,
                forked_from="20250101-000000-gggggg")
        add_run(store, "20250103-000000-gggggg", "w", days_old=1,
                forked_from="20250102-000000-gggggg")  # the newest: kept
        add_run(store, "20250104-000000-gggggg", "v", days_old=60)  # a fork that goes...
        add_run(store, "20250105-000000-gggggg", "v", days_old=50,
                forked_from="20250104-000000-gggggg")  # ... takes no parent along
        add_run(store, "20250106-000000-gggggg", "v", days_old=2)
        add_run(store, "20250107-000000-gggggg", "w", days_old=45)  # no kin: goes

    done = cli("gc", "--older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert [row[0] for row in removed_table(done.stdout)] == [
        "20250107-000000-gggggg", "20250105-000000-gggggg", "20250104-000000-gggggg",
    ]
    lines = done.stdout.splitlines()
    assert "kept 20250102-000000-gggggg (w): 20250103-000000-gggggg was forked from it" in lines
    assert "kept 20250101-000000-gggggg (w): 20250102-000000-gggggg was forked from it" in lines
    with Store(state_dir) as store:
        assert set(run_ids(store)) == {"20250101-000000-gggggg", "20250102-000000-gggggg",
                                       "20250103-000000-gggggg", "20250106-000000-gggggg"}


def test_dry_run_removes_nothing(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        add_run(store, "20250101-000000-hhhhhh", "w", days_old=40)
        add_run(store, "20250101-000000-hhhhhh.sub", "c", days_old=40,
                parent="20250101-000000-hhhhhh")
        add_run(store, "20250102-000000-hhhhhh", "w", days_old=1)
        store.cache_put("fp", "x", "20250101-000000-hhhhhh")
        before = {k: store._cache.get(k) for k in keys(store)}
    files = sorted(str(p) for p in state_dir.rglob("*"))

    done = cli("gc", "--keep", "0", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert removed_table(done.stdout) == [
        ["20250101-000000-hhhhhh", "w", "succeeded", "40d", "1 sub-workflow run"],
    ]
    assert re.fullmatch(r"would remove 1 run \(\+1 sub-workflow run\), 4 step records, "
                        r"1 cache entry, \d+\.\d KB; nothing was removed \(--dry-run\)",
                        done.stdout.splitlines()[-1])
    with Store(state_dir) as store:
        assert {k: store._cache.get(k) for k in keys(store)} == before
    assert sorted(str(p) for p in state_dir.rglob("*")) == files


# --- crash safety ----------------------------------------------------------------------


def test_a_removal_that_fails_leaves_the_run_whole(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storyflow.store import _gc

    with Store(state_dir) as store:
        add_run(store, "20250101-000000-iiiiii", "w", days_old=40, big=True, steps=4)
        add_run(store, "20250102-000000-iiiiii", "w", days_old=1)
        before = {k: store._cache.get(k) for k in keys(store)}

        def fail(run_id: str) -> str:  # called inside the transaction, after step deletes
            raise RuntimeError("crash")

        monkeypatch.setattr(_gc, "lease_key", fail)
        with pytest.raises(RuntimeError):
            store.gc(keep=0)
        assert {k: store._cache.get(k) for k in keys(store)} == before  # the big step too
        assert folders(state_dir) == ["20250101-000000-iiiiii", "20250102-000000-iiiiii"]
        assert (state_dir / "runs" / "20250101-000000-iiiiii" / "story.md").is_file()
        assert list((state_dir / "trash").iterdir()) == []
        monkeypatch.undo()
        report = store.gc(keep=0)
        assert [r.run_id for r in report.runs] == ["20250101-000000-iiiiii"]
        assert run_ids(store) == ["20250102-000000-iiiiii"]


KILLED_GC = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from storyflow.store import Store, _gc

    real = _gc.lease_key

    def slow(run_id):  # inside the removal's transaction, after the step records went
        print("removing", flush=True)
        time.sleep(120)
        return real(run_id)

    _gc.lease_key = slow
    with Store(Path(sys.argv[1])) as store:
        store.gc(keep=0)
""")


def test_kill_9_during_a_removal_leaves_the_run_whole(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        add_run(store, "20250101-000000-kkkkkk", "w", days_old=40, big=True, steps=50)
        add_run(store, "20250102-000000-kkkkkk", "w", days_old=1)
        before = {k: store._cache.get(k) for k in keys(store)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_GC, str(state_dir)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "removing\n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    with Store(state_dir) as store:
        after = {k: store._cache.get(k) for k in keys(store)}
        assert after.pop(GC_LEASE_KEY)["pid"] == proc.pid  # a dead gc's: taken over next
        assert after == before  # records whole
    listed = cli("runs")  # its folder waits in the trash: the run is not "lost"
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    assert (state_dir / "trash" / "20250101-000000-kkkkkk" / "story.md").is_file()

    done = cli("gc", "--keep", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        "finished removing what an interrupted gc left: 20250101-000000-kkkkkk")
    assert [row[0] for row in removed_table("\n".join(done.stdout.splitlines()[1:]))] == [
        "20250101-000000-kkkkkk"]
    assert folders(state_dir) == ["20250102-000000-kkkkkk"]
    assert not (state_dir / "trash").exists()


def test_a_run_taken_while_gc_runs_stays(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storyflow.store import _gc

    with Store(state_dir) as store:
        add_run(store, "20250101-000000-llllll", "w", days_old=40)
        add_run(store, "20250102-000000-llllll", "w", days_old=1)
        monkeypatch.setattr(_gc, "_live", lambda *_: None)  # looked dead when checked...
        with store.acquire_lease("20250101-000000-llllll"):  # ... but is held at removal
            report = store.gc(keep=0)
        assert report.runs == []
        assert [(s.run_id, s.reason, s.detail) for s in report.spared] == [
            ("20250102-000000-llllll", "newest", "the newest run of its workflow"),
            ("20250101-000000-llllll", "live", "a process took it while gc ran")]
        assert set(run_ids(store)) == {"20250101-000000-llllll", "20250102-000000-llllll"}
        assert len(store.get_steps("20250101-000000-llllll", ["s0", "s1"])) == 2
    assert folders(state_dir) == ["20250101-000000-llllll", "20250102-000000-llllll"]


def test_gc_finishes_what_a_crashed_gc_left_in_the_trash(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        add_run(store, "20250101-000000-jjjjjj", "w", days_old=1)
        add_run(store, "20250102-000000-jjjjjj", "w", days_old=1)
    trash = state_dir / "trash"
    trash.mkdir()
    # Killed after moving a folder, before its records went: the run is still there.
    (state_dir / "runs" / "20250101-000000-jjjjjj").rename(trash / "20250101-000000-jjjjjj")
    # The same, and `logs` (or `resume`) made the run a new folder meanwhile.
    second = state_dir / "runs" / "20250102-000000-jjjjjj"
    second.rename(trash / second.name)
    second.mkdir()
    (second / "events.jsonl").write_text('{"type": "run.resumed"}\n', encoding="utf-8")
    # Killed after the records went, before the folder was deleted.
    (trash / "20240101-000000-gone00").mkdir()
    (trash / "20240101-000000-gone00" / "events.jsonl").write_text("{}\n")

    done = cli("gc", "--keep", "10")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "finished removing what an interrupted gc left: 20240101-000000-gone00, "
        "20250101-000000-jjjjjj, 20250102-000000-jjjjjj",
        "removed 0 runs, 0 step records, 0 cache entries, 0 B",
    ]
    assert folders(state_dir) == ["20250101-000000-jjjjjj", "20250102-000000-jjjjjj"]
    assert (state_dir / "runs" / "20250101-000000-jjjjjj" / "story.md").is_file()
    assert sorted(p.name for p in second.iterdir()) == [
        "events.jsonl", "events.jsonl.before-gc", "story.md"]
    assert (second / "events.jsonl").read_text() == '{"type": "run.resumed"}\n'
    assert (second / "events.jsonl.before-gc").read_text() == '{"type": "run.started"}\n'
    assert not trash.exists()


# --- the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        ((), "error: give --keep N or --older-than AGE", "storyflow gc --older-than 30d"),
        (("--keep", "3", "--older-than", "3d"),
         "error: give --keep N or --older-than AGE, not both", "--dry-run shows what would go"),
        (("--older-than", "30"), "error: --older-than '30' is not an age", "like 90m, 12h"),
        (("--older-than", "3 days"), "error: --older-than '3 days' is not an age", "30d or 2w"),
        (("--older-than", "-1d"), "error: --older-than '-1d' is not an age", "unit"),
        (("--older-than", "\u0663d"), "error: --older-than '\u0663d' is not an age", "unit"),
    ],
)
def test_gc_needs_one_rule_and_a_real_age(
    cli: Cli, args: tuple[str, ...], message: str, hint: str
) -> None:
    done = cli("gc", *args)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == message
    assert lines[1].startswith("  hint: ") and hint in lines[1]
    assert "Traceback" not in done.stderr


def test_gc_refuses_a_negative_keep(cli: Cli) -> None:
    done = cli("gc", "--keep", "-1")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_ages_read_in_every_unit() -> None:
    from storyflow.commands.gc_cmds import age, parse_age, size

    assert [parse_age(a) for a in ("45s", "90m", "12h", "30d", "2w", "1.5d", "7D")] == [
        45.0, 5400.0, 43200.0, 2592000.0, 1209600.0, 129600.0, 604800.0]
    assert [age(s) for s in (5, 600, 7200, 3 * 86400)] == ["5s", "10m", "2h", "3d"]
    assert [size(n) for n in (512, 12_345, 3_100_000)] == ["512 B", "12.3 KB", "3.1 MB"]


def test_a_fresh_store_has_nothing_to_remove(cli: Cli) -> None:
    done = cli("gc", "--older-than", "1d")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "removed 0 runs, 0 step records, 0 cache entries, 0 B\n"


# --- found by using the command ---------------------------------------------------------


def test_a_cache_entry_a_kept_run_came_from_stays(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        add_run(store, "20250101-000000-mmmmmm", "w", days_old=40)  # wrote the entries
        kept = add_run(store, "20250102-000000-mmmmmm", "w", days_old=1)
        store.put_steps(kept.run_id, [
            StepRecord(id="s0", status="cached", fingerprint="fp-used", output="cached"),
            StepRecord(id="s1", status="failed", fingerprint="fp-failed", output=None)])
        for fp in ("fp-used", "fp-failed", "fp-unused", "call-used"):
            store.cache_put(fp, "cached", "20250101-000000-mmmmmm")

    dry = cli("gc", "--older-than", "30d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["totals"]["cache_entries"] == 3
    done = cli("gc", "--older-than", "30d", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    GC_SCHEMA.validate(doc)
    assert [r["run_id"] for r in doc["runs"]] == ["20250101-000000-mmmmmm"]
    assert doc["totals"]["cache_entries"] == 3
    with Store(state_dir) as store:
        assert store.cache_get("fp-used") == (True, "cached")  # s0 came from it
        for gone in ("fp-failed", "fp-unused", "call-used"):  # a call names no step
            assert store.cache_get(gone) == (False, None)


def test_a_run_with_sub_workflow_runs_taken_while_gc_runs_stays(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storyflow.store import _gc

    with Store(state_dir) as store:
        add_run(store, "20250101-000000-nnnnnn", "w", days_old=40)
        add_run(store, "20250101-000000-nnnnnn.sub", "c", days_old=40,
                parent="20250101-000000-nnnnnn")  # listed before its parent
        add_run(store, "20250102-000000-nnnnnn", "w", days_old=1)
        monkeypatch.setattr(_gc, "_live", lambda *_: None)  # looked dead when checked...
        with store.acquire_lease("20250101-000000-nnnnnn"):  # ... but is held at removal
            report = store.gc(keep=0)
        assert report.runs == []
        assert ("20250101-000000-nnnnnn", "live") in [(s.run_id, s.reason)
                                                      for s in report.spared]
        assert len(run_ids(store)) == 3
    assert folders(state_dir) == ["20250101-000000-nnnnnn", "20250101-000000-nnnnnn.sub",
                                  "20250102-000000-nnnnnn"]


def test_a_folder_made_while_gc_moved_the_old_one_keeps_both(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume took the run, and wrote its new folder, after gc moved the old one to
    the trash: gc gives the run up and puts what it moved back beside the new files."""
    from contextlib import contextmanager

    from storyflow.store import _gc

    rid = "20250101-000000-oooooo"
    with Store(state_dir) as store:
        add_run(store, rid, "w", days_old=40)
        add_run(store, "20250102-000000-oooooo", "w", days_old=1)
        real = _gc.atomic
        lease = []

        @contextmanager
        def resumed_meanwhile(cache: object) -> Iterator[None]:
            if not lease:
                lease.append(store.acquire_lease(rid))
                (state_dir / "runs" / rid).mkdir()
                (state_dir / "runs" / rid / "events.jsonl").write_text("resumed\n")
            with real(cache):
                yield

        monkeypatch.setattr(_gc, "_live", lambda *_: None)
        monkeypatch.setattr(_gc, "atomic", resumed_meanwhile)
        try:
            report = store.gc(keep=0)
        finally:
            lease[0].release()
        assert report.runs == [] and set(run_ids(store)) == {rid, "20250102-000000-oooooo"}
    folder = state_dir / "runs" / rid
    assert sorted(p.name for p in folder.iterdir()) == [
        "events.jsonl", "events.jsonl.before-gc", "story.md"]
    assert (folder / "events.jsonl").read_text() == "resumed\n"
    assert not (state_dir / "trash").exists()


def test_only_one_gc_removes_at_a_time(cli: Cli, state_dir: Path) -> None:
    from storyflow.store._lease import acquire

    with Store(state_dir) as store:
        for n in range(3):
            add_run(store, f"2025010{n}-000000-pppppp", "w", days_old=40 - n)
        lease = acquire(store._cache, GC_LEASE_KEY, "gc", ttl_s=600, clock=time.time,
                        root=state_dir)
        try:
            done = cli("gc", "--keep", "0")
            assert done.returncode == 1 and "Traceback" not in done.stderr
            assert done.stderr.splitlines()[0] == (
                f"error: another storyflow gc (process {os.getpid()} on "
                f"{socket.gethostname()}) is removing runs from the store at {state_dir}")
            assert len(run_ids(store)) == 3
            dry = cli("gc", "--keep", "0", "--dry-run")  # reads only: no need to wait
            assert dry.returncode == 0 and "would remove 2 runs" in dry.stdout
        finally:
            lease.release()
    done = cli("gc", "--keep", "0")
    assert done.returncode == 0, done.stderr
    with Store(state_dir) as store:
        assert run_ids(store) == ["20250102-000000-pppppp"]
        assert GC_LEASE_KEY not in store._cache  # released


def test_two_gcs_at_once_leave_a_whole_store(cli: Cli, state_dir: Path) -> None:
    with Store(state_dir) as store:
        for n in range(150):
            rid = f"20250101-{n:06d}-qqqqqq"
            add_run(store, rid, "w", days_old=200 - n, steps=5)
            add_run(store, rid + ".sub", "c", days_old=100 - n, parent=rid, steps=3)
    procs = [subprocess.Popen([sys.executable, "-m", "storyflow", "gc", "--keep", "0"],
                              env={**os.environ, "STORYFLOW_STATE_DIR": str(state_dir)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    for proc, (_, stderr) in zip(procs, outs, strict=True):
        assert "Traceback" not in stderr
        assert proc.returncode == 0 or "another storyflow gc" in stderr, stderr
    listed = cli("runs")
    assert listed.returncode == 0 and listed.stderr == ""  # nothing lost, nothing damaged
    with Store(state_dir) as store:
        assert sorted(run_ids(store)) == ["20250101-000149-qqqqqq",
                                          "20250101-000149-qqqqqq.sub"]
    assert folders(state_dir) == ["20250101-000149-qqqqqq", "20250101-000149-qqqqqq.sub"]
    assert not (state_dir / "trash").exists()


def test_damaged_run_records_are_named_and_left_alone(cli: Cli, state_dir: Path) -> None:
    import sqlite3

    with Store(state_dir) as store:
        add_run(store, "20250101-000000-rrrrrr", "w", days_old=40)
        add_run(store, "20250102-000000-rrrrrr", "w", days_old=39)
        add_run(store, "20250103-000000-rrrrrr", "w", days_old=1)
    with sqlite3.connect(state_dir / "db" / "cache.db") as con:
        con.execute("UPDATE Cache SET value = ? WHERE key = ?",
                    (b"\x80\x05garbage", "run:20250102-000000-rrrrrr"))
    con.close()
    done = cli("gc", "--older-than", "30d", "--json")
    assert done.returncode == 0, done.stderr
    GC_SCHEMA.validate(json.loads(done.stdout))
    assert done.stderr.splitlines()[0].startswith(
        "warning: run 20250102-000000-rrrrrr: damaged record (it does not decode")
    assert done.stderr.splitlines()[0].endswith("; gc leaves it alone")
    assert folders(state_dir) == ["20250102-000000-rrrrrr", "20250103-000000-rrrrrr"]


def test_gc_keeps_a_run_another_storyflow_process_runs(
    cli: Cli, state_dir: Path, tmp_path: Path
) -> None:
    from conftest import cli_env

    path = tmp_path / "nap.yaml"
    path.write_text("apiVersion: storyflow/v1\nname: nap\nsteps:\n"
                    '  nap: {uses: command, with: {run: [sleep, "30"], output: text}}\n',
                    encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "storyflow", "run", path, "--no-progress"],
                            env=cli_env(state_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            time.sleep(0.05)
            with Store(state_dir) as store:
                live = store.list_runs()
                if live and store.holder(live[0].run_id) is not None:
                    break
        (live_run,) = live
        with Store(state_dir) as store:  # a newer run of the workflow: the live one is not
            add_run(store, "29990101-000000-ssssss", "nap", days_old=-1)  # the newest
        done = cli("gc", "--keep", "0")
        assert done.returncode == 0, done.stderr
        assert f"kept {live_run.run_id} (nap): held by process {proc.pid} on " in done.stdout
        with Store(state_dir) as store:
            assert live_run.run_id in run_ids(store)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert (state_dir / "runs" / live_run.run_id / "events.jsonl").is_file()
