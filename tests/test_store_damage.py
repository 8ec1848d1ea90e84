"""A damaged store is reported, never misread (issue #13, item 8).

Each test damages a real store on disk — the SQLite file emptied, deleted or with
bytes flipped, a bad value written under one key through sqlite3 or the store's own
diskcache handle — then drives the real CLI in a subprocess: every damaged record is
named (run, step), the rest is still listed and usable, and no traceback is printed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import SCHEMAS, Cli, WriteWorkflow
from storyflow.store import RunRecord, StepRecord, Store

TWO_STEPS = """\
apiVersion: storyflow/v1
name: pair
steps:
  a: {uses: template, with: {template: "hello"}}
  b: {uses: template, with: {template: "{{ steps.a.output }} world"}}
"""


def clean(result: Any) -> Any:
    """The result, once it is known to carry no traceback and no internal error."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "internal error" not in text, text
    return result


def start_runs(cli: Cli, workflow: Path, n: int) -> list[str]:
    """Run ``workflow`` ``n`` times; the run ids, oldest first."""
    ids = []
    for _ in range(n):
        result = clean(cli("run", workflow, "--json"))
        assert result.returncode == 0, result.stderr
        ids.append(json.loads(result.stdout.splitlines()[-1])["run_id"])
        time.sleep(0.01)  # distinct created_at, so the order is the order they ran
    return ids


def db_file(state_dir: Path) -> Path:
    return state_dir / "db" / "cache.db"


def write_raw(state_dir: Path, key: str, value: bytes) -> None:
    """Overwrite the stored bytes of ``key`` (a pickled value) behind the store's back."""
    with sqlite3.connect(db_file(state_dir)) as con:
        assert con.execute("UPDATE Cache SET value = ? WHERE key = ?", (value, key)).rowcount
    con.close()


def write_value(state_dir: Path, key: str, value: Any) -> None:
    """Store ``value`` under ``key`` through the store's own diskcache handle."""
    with Store(state_dir) as store:
        store._cache.set(key, value)


@pytest.fixture
def workflow(write_workflow: WriteWorkflow) -> Path:
    return write_workflow(TWO_STEPS, "pair.yaml")


def doctor_rows(cli: Cli) -> tuple[int, dict[str, dict[str, str]]]:
    result = clean(cli("doctor", "--json"))
    return result.returncode, {c["check"]: c for c in json.loads(result.stdout)}


# --- the database emptied or deleted -------------------------------------------------


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_a_store_that_lost_its_records_says_so_and_what_survives(
    cli: Cli, state_dir: Path, workflow: Path, how: str
) -> None:
    ids = start_runs(cli, workflow, 2)
    for extra in db_file(state_dir).parent.glob("cache.db-*"):
        extra.unlink()  # the WAL and its index, if a checkpoint left them
    if how == "emptied":
        db_file(state_dir).write_bytes(b"")
    else:
        db_file(state_dir).unlink()

    listed = clean(cli("runs"))
    assert listed.returncode == 0
    assert "no runs yet" not in listed.stdout
    assert "the store lost the records of 2 runs" in listed.stderr
    for run_id in ids:  # each named, with what its folder still holds
        line = next(ln for ln in listed.stderr.splitlines() if run_id in ln)
        assert "pair" in line and "run.summary (succeeded)" in line
        assert str(state_dir / "runs" / run_id / "events.jsonl") in line
    assert "hint:" in listed.stderr and "emptied, deleted or replaced" in listed.stderr

    as_json = clean(cli("runs", "--json"))
    assert json.loads(as_json.stdout) == []
    assert "lost the records of 2 runs" in as_json.stderr

    shown = clean(cli("show", ids[0][:-1]))  # a prefix finds the lost run too
    assert shown.returncode == 1
    assert f"the store has no record of run {ids[0]}" in shown.stderr
    assert "events.jsonl" in shown.stderr
    both = clean(cli("show", "2"))  # both ids start with the year
    assert both.returncode == 1 and "matches 2 runs whose records the store lost" in both.stderr

    code, rows = doctor_rows(cli)
    assert code == 1
    assert rows["store run folders"]["status"] == "fail"
    assert all(run_id in rows["store run folders"]["detail"] for run_id in ids)

    assert clean(cli("run", workflow)).returncode == 0  # a new run still works
    assert "lost the records of 2 runs" in clean(cli("runs")).stderr


# --- one damaged run record ------------------------------------------------------------

RUN_DAMAGE: dict[str, Callable[[Path, str], None]] = {
    "bad pickle": lambda state, rid: write_raw(state, f"run:{rid}", b"\x80\x05garbage"),
    "not a pickle": lambda state, rid: write_raw(state, f"run:{rid}", b"{\"run_id\": 1"),
    "missing fields": lambda state, rid: write_value(state, f"run:{rid}", {"run_id": rid}),
    "wrong types": lambda state, rid: write_value(
        state, f"run:{rid}", {**_run_dict(state, rid), "meta": "oops"}),
    "another run's": lambda state, rid: write_value(
        state, f"run:{rid}", {**_run_dict(state, rid), "run_id": "someone-else"}),
}


def _run_dict(state_dir: Path, run_id: str) -> dict[str, Any]:
    with Store(state_dir) as store:
        rec = store.get_run(run_id)
    assert rec is not None
    return rec.to_dict()


@pytest.mark.parametrize("damage", sorted(RUN_DAMAGE))
def test_one_damaged_run_record_is_named_and_the_rest_listed(
    cli: Cli, state_dir: Path, workflow: Path, damage: str
) -> None:
    first, bad, last = start_runs(cli, workflow, 3)
    RUN_DAMAGE[damage](state_dir, bad)

    listed = clean(cli("runs"))
    assert listed.returncode == 0, listed.stderr
    assert first in listed.stdout and last in listed.stdout and bad not in listed.stdout
    assert f"warning: run {bad}: damaged record (" in listed.stderr
    assert "hint:" in listed.stderr

    as_json = clean(cli("runs", "--json"))
    assert [d["run_id"] for d in json.loads(as_json.stdout)] == [last, first]
    assert f"run {bad}: damaged record" in as_json.stderr

    shown = clean(cli("show", bad))
    assert shown.returncode == 1
    assert f"run {bad}: damaged record" in shown.stderr
    assert clean(cli("show", first)).returncode == 0  # the others are still usable
    assert clean(cli("resume", first)).returncode == 0

    code, rows = doctor_rows(cli)
    assert code == 1 and rows["store records"]["status"] == "fail"
    assert f"run {bad}: damaged record" in rows["store records"]["detail"]


def test_show_last_does_not_skip_a_damaged_newest_run(
    cli: Cli, state_dir: Path, workflow: Path
) -> None:
    _, newest = start_runs(cli, workflow, 2)
    write_raw(state_dir, f"run:{newest}", b"\x80\x05garbage")
    shown = clean(cli("show", "--last"))
    assert shown.returncode == 1  # not the older run, shown as if it were the last
    assert f"run {newest}: damaged record" in shown.stderr


# --- a damaged step record ---------------------------------------------------------------

STEP_DAMAGE: dict[str, Callable[[Path, str], None]] = {
    "bad pickle": lambda state, rid: write_raw(state, f"step:{rid}:b", b"\x80\x05garbage"),
    "missing fields": lambda state, rid: write_value(state, f"step:{rid}:b", {"id": "b"}),
    "wrong types": lambda state, rid: write_value(
        state, f"step:{rid}:b", {"id": "b", "status": "succeeded", "attempts": "one"}),
}


@pytest.mark.parametrize("damage", sorted(STEP_DAMAGE))
def test_a_damaged_step_is_marked_by_show_and_run_again_by_resume(
    cli: Cli, state_dir: Path, workflow: Path, damage: str
) -> None:
    (run_id,) = start_runs(cli, workflow, 1)
    STEP_DAMAGE[damage](state_dir, run_id)
    said = f"step record b of run {run_id} is damaged"

    shown = clean(cli("show", run_id))
    assert shown.returncode == 0, shown.stderr
    rows = {ln.split()[0]: ln.split()[1] for ln in shown.stdout.splitlines()[3:]}
    assert rows == {"a": "succeeded", "b": "damaged"}
    assert f"warning: {said}" in shown.stderr and f"storyflow resume {run_id}" in shown.stderr

    doc = json.loads(clean(cli("show", run_id, "--json")).stdout)
    show_schema = json.loads((SCHEMAS / "show.schema.json").read_text(encoding="utf-8"))
    jsonschema.validate(doc, show_schema)
    step_b = next(s for s in doc["steps"] if s["id"] == "b")
    assert step_b["status"] == "pending" and said in step_b["error"]["message"]
    assert next(s for s in doc["steps"] if s["id"] == "a")["output"] == "hello"

    code, found = doctor_rows(cli)
    assert code == 1 and said in found["store records"]["detail"]

    resumed = clean(cli("resume", run_id, "--json"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: {said} (" in resumed.stderr and "; it runs again" in resumed.stderr
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert [e["step"] for e in events if e["type"] == "step.started"] == ["b"]  # a is kept
    assert events[-1]["status"] == "succeeded"

    after = clean(cli("show", run_id))
    assert after.stderr == ""
    assert {ln.split()[0]: ln.split()[1] for ln in after.stdout.splitlines()[3:]} == {
        "a": "succeeded", "b": "succeeded"}
    assert doctor_rows(cli)[0] == 0


# --- caches: dropped and rebuilt, never trusted ----------------------------------------


def test_a_damaged_parsed_workflow_entry_is_dropped_and_parsed_again(
    cli: Cli, state_dir: Path, workflow: Path
) -> None:
    start_runs(cli, workflow, 1)
    key = f"parsed:{workflow.resolve()}"
    write_raw(state_dir, key, b"\x80\x05garbage")
    assert clean(cli("run", workflow)).returncode == 0
    with Store(state_dir) as store:
        entry = store._cache.get(key)
        # The damaged entry was replaced by a sound one; now damage what it holds in a
        # way a pickle does not notice: a flipped byte inside the parsed text.
        blob = entry["blob"].replace(b"hello", b"jello")
        store._cache.set(key, {**entry, "blob": blob})
        store._cache.set(next(k for k in store._cache.iterkeys() if k.startswith("valid:")),
                         b"\x00")
    result = clean(cli("run", workflow, "--json"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["status"] == "succeeded"
    shown = json.loads(clean(cli("show", "--last", "--json")).stdout)
    assert shown["steps"][0]["output"] == "hello"  # the file, not the damaged cache


def test_a_damaged_cache_or_lease_entry_is_no_error(tmp_path: Path) -> None:
    with Store(tmp_path / "state") as store:
        store._cache.set("cache:fp", b"\x80broken")  # raw bytes: not an entry
        assert store.cache_get("fp") == (False, None)
        store.put_run(_record("r1"))
        store._cache.set("lease:r1", ["not", "a", "lease"])
        assert store.holder("r1") is None
        with store.acquire_lease("r1") as lease:  # taken over
            assert store.holder("r1") is not None
            lease.heartbeat()


def test_a_damaged_run_index_is_rebuilt_from_the_records(tmp_path: Path) -> None:
    with Store(tmp_path / "state") as store:
        for i, run_id in enumerate(["r1", "r2", "r3"]):
            store.put_run(_record(run_id, created_at=1000.0 + i))
        store._cache.set("meta:runs", "garbage")
        assert [r.run_id for r in store.list_runs()] == ["r3", "r2", "r1"]
        assert store.find_run("r2").run_id == "r2"
        store.put_run(_record("r4", created_at=2000.0))  # a new run saves a sound index
        assert store._cache.get("meta:runs") == [
            [1000.0, "r1"], [1001.0, "r2"], [1002.0, "r3"], [2000.0, "r4"]]


# --- the store format, and damage to the database file itself -------------------------


@pytest.mark.parametrize("value", ["1", 1.5, None, b"\x80\x05garbage"])
def test_a_damaged_format_version_is_a_clear_store_error(
    cli: Cli, state_dir: Path, workflow: Path, value: Any
) -> None:
    start_runs(cli, workflow, 1)
    if isinstance(value, bytes):
        write_raw(state_dir, "meta:format", value)
        with sqlite3.connect(db_file(state_dir)) as con:  # stored as a pickle now
            con.execute("UPDATE Cache SET mode = 4 WHERE key = 'meta:format'")
        con.close()
    else:
        write_value(state_dir, "meta:format", value if value is not None else [1])
    result = clean(cli("runs"))
    assert result.returncode == 1
    assert f"the store at {state_dir} is damaged: its format version" in result.stderr
    from storyflow.store import STORE_FORMAT

    assert f"this storyflow reads format {STORE_FORMAT}" in result.stderr
    if value == "1":
        assert "'1' (a str)" in result.stderr
    code, rows = doctor_rows(cli)
    assert code == 1 and rows["store"]["status"] == "fail"


@pytest.mark.parametrize("page", [0, 1, 2, 3, 5, 8])
def test_flipped_bytes_in_the_database_never_give_a_traceback(
    cli: Cli, state_dir: Path, workflow: Path, page: int
) -> None:
    ids = start_runs(cli, workflow, 3)
    path = db_file(state_dir)
    data = bytearray(path.read_bytes())
    start = min(page * 4096, len(data) - 4096)
    for i in range(start + 16, start + 4096, 11):  # spare the header's magic string
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    for args in (["runs"], ["runs", "--json"], ["show", ids[0]], ["resume", ids[1]],
                 ["doctor"]):
        result = clean(cli(*args))
        assert result.returncode in (0, 1), (args, result.stderr)
        if result.returncode == 1 and args[0] != "doctor":
            assert "error:" in result.stderr and "hint:" in result.stderr


def test_doctor_passes_a_sound_store(cli: Cli, workflow: Path) -> None:
    start_runs(cli, workflow, 2)
    code, rows = doctor_rows(cli)
    assert code == 0
    for check in ("store", "store database", "store records", "store run folders"):
        assert rows[check]["status"] == "ok", rows[check]
    assert "2 run records, 4 step records" in rows["store records"]["detail"]


# --- a big store: bounded in time ------------------------------------------------------


def _record(run_id: str, created_at: float = 1000.0) -> RunRecord:
    return RunRecord(
        run_id=run_id, workflow="big", workflow_path="/x/big.yaml", workflow_version=None,
        source_hash="h", status="succeeded", inputs={"premise": "p" * 200},
        environment=None, sets=[], created_at=created_at, updated_at=created_at,
        meta={"steps": [f"s{j}" for j in range(5)]},
    )


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """1,000 runs of 5 steps each, every run with its folder."""
    root = tmp_path_factory.mktemp("big") / "state"
    with Store(root) as store:
        for i in range(1000):
            run_id = f"20250101-{i:06d}-abcdef"
            store.put_run(_record(run_id, 1000.0 + i))
            store.put_steps(run_id, [
                StepRecord(id=f"s{j}", status="succeeded", attempts=1, output="y" * 2000)
                for j in range(5)
            ])
            (root / "runs" / run_id).mkdir()
    yield root


def test_the_integrity_check_of_1000_runs_is_quick(big_store: Path) -> None:
    with Store(big_store) as store:
        started = time.monotonic()
        findings = {f.check: f for f in store.check_integrity()}
        took = time.monotonic() - started
    assert {f.status for f in findings.values()} == {"ok"}, findings
    assert "1,000 run records, 5,000 step records" in findings["store records"].detail
    assert took < 10.0  # about 0.2 s on a laptop


def test_the_integrity_check_stops_at_its_budget_and_says_so(big_store: Path) -> None:
    with Store(big_store) as store:
        findings = {f.check: f for f in store.check_integrity(budget_s=0.0)}
    assert findings["store records"].status == "warn"
    assert "then stopped: the rest is not checked" in findings["store records"].detail
