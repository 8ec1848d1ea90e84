"""Store format 1 → 2: a store written by storyflow 0.1.0 reads the same after it is
migrated, and a migration is all or nothing — an error or a kill -9 half way leaves the
store as the old release wrote it.

The fixture (`tests/fixtures/README.md`) is a state directory written by 0.1.0, with what
0.1.0 printed about each of its runs.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest

from storyflow.errors import StoreError
from storyflow.store import MIGRATIONS, STORE_FORMAT, RunRecord, StepRecord, Store
from storyflow.store._migrate import FORMAT_KEY, atomic
from storyflow.store._store import RUN_INDEX_KEY, run_key, step_key

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMAT1_TAR = FIXTURES / "store-format1.tar.gz"
FORMAT1_EXPECTED = FIXTURES / "store-format1.expected.json.gz"

NEW_RUN_FIELDS = {"forked_from": None, "fork": None}
NEW_STEP_FIELDS = {"request": None, "forked_from": None}
BIG = "x" * 40_000
"""A value diskcache keeps in a file of its own (its pickle is over 32 KB)."""

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def format1_state(state_dir: Path, tmp_path: Path) -> Path:
    """The 0.1.0 state directory, unpacked where the `cli` fixture looks: tmp_path/state."""
    with tarfile.open(FORMAT1_TAR) as tar:
        tar.extractall(tmp_path, filter="data")
    assert state_dir.is_dir()
    return state_dir


def raw_records(state: Path) -> dict[str, Any]:
    """Every key and value of the store, read with diskcache alone (no migration)."""
    cache = diskcache.Cache(str(state / "db"))
    try:
        return {key: cache.get(key) for key in cache.iterkeys()}
    finally:
        cache.close()


def set_raw(state: Path, values: dict[str, Any]) -> None:
    cache = diskcache.Cache(str(state / "db"))
    try:
        with cache.transact():
            for key, value in values.items():
                cache.set(key, value)
    finally:
        cache.close()


def contains(old: Any, new: Any, where: str = "") -> Iterator[str]:
    """Where ``new`` does not say all ``old`` said: keys may be added, nothing else."""
    if isinstance(old, dict):
        if not isinstance(new, dict):
            yield f"{where}: {type(new).__name__}, not a mapping"
            return
        for key, value in old.items():
            if key not in new:
                yield f"{where}.{key}: missing"
            else:
                yield from contains(value, new[key], f"{where}.{key}")
    elif isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            yield f"{where}: {new!r:.80} instead of {old!r:.80}"
            return
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from contains(a, b, f"{where}[{i}]")
    elif old != new:
        yield f"{where}: {new!r:.80} instead of {old!r:.80}"


# --- the 0.1.0 store, through the real CLI -----------------------------------------


def test_a_format1_store_reads_the_same_after_migration(cli: Cli, format1_state: Path) -> None:
    expected = json.loads(gzip.decompress(FORMAT1_EXPECTED.read_bytes()))
    before = raw_records(format1_state)
    assert before[FORMAT_KEY] == 1
    there = sorted({v["workflow_path"] for k, v in before.items()
                    if k.startswith("run:") and Path(v["workflow_path"]).exists()})
    if there:  # 0.1.0 printed without them (`report` reads the file when it is there)
        pytest.skip(f"the fixture's runs expect their workflow files gone: {there[0]} is not")

    def run(*args: str) -> str:
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""  # a migration says nothing
        return done.stdout.replace(str(format1_state), "<STATE>")

    runs = json.loads(run("runs", "--json"))
    assert list(contains(expected["runs"], runs, "runs")) == []
    for r in runs:
        for doc in [r, *r["children"]]:
            assert doc["forked_from"] is None and doc["fork"] is None
    assert set(expected["show"]) == {
        d["run_id"] for r in runs for d in [r, *r["children"]]
    }
    for run_id, shown in expected["show"].items():
        doc = json.loads(run("show", "--json", run_id))
        assert list(contains(shown, doc, f"show {run_id}")) == []
        assert doc["forked_from"] is None
        report = json.loads(run("report", run_id, "--format", "json"))
        assert list(contains(expected["report"][run_id], report, f"report {run_id}")) == []
        assert run("logs", run_id) == expected["logs"][run_id]

    after = raw_records(format1_state)
    assert after[FORMAT_KEY] == STORE_FORMAT == 2
    assert after[RUN_INDEX_KEY] == before[RUN_INDEX_KEY]
    runs_seen = steps_seen = 0
    for key, old in before.items():
        if key.startswith("run:"):
            runs_seen += 1
            assert after[key] == {**old, **NEW_RUN_FIELDS}, key
            assert list(after[key])[-1] == "meta"  # the order today's release writes
        elif key.startswith("step:"):
            steps_seen += 1
            assert after[key] == {**old, **NEW_STEP_FIELDS}, key
        elif key.startswith(("valid:", "parsed:")):
            assert key not in after  # the old release's verdicts on workflow files
        elif key != FORMAT_KEY:
            assert after[key] == old, key  # the output cache, the run index: as they were
    assert (runs_seen, steps_seen) == (13, 160)
    for key, new in after.items():  # every record a format-2 reader reads is whole
        if key.startswith("run:"):
            assert RunRecord.from_dict(new).run_id == key[len("run:"):]
        elif key.startswith("step:"):
            assert StepRecord.from_dict(new).id == key.split(":", 2)[2]


def test_a_migrated_store_is_not_migrated_again(
    format1_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(format1_state).close()
    migrated = raw_records(format1_state)
    calls: list[int] = []
    monkeypatch.setitem(MIGRATIONS, 1, lambda cache: calls.append(1))
    with Store(format1_state) as store:
        assert store.get_run("20261204-161259-1c138b") is not None
    assert calls == []
    assert raw_records(format1_state) == migrated


def test_a_newer_store_is_refused_by_the_cli(cli: Cli, format1_state: Path) -> None:
    set_raw(format1_state, {FORMAT_KEY: STORE_FORMAT + 1})
    before = raw_records(format1_state)
    done = cli("runs")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: the store at {format1_state} was written by a newer storyflow "
        f"(format {STORE_FORMAT + 1})",
        f"  hint: upgrade storyflow, or use another --state-dir "
        f"(this version reads format {STORE_FORMAT})",
    ]
    assert raw_records(format1_state) == before


# --- all or nothing ----------------------------------------------------------------


class HalfWay:
    """A diskcache `Cache` whose ``set`` fails (or blocks) after ``after`` of them: the
    real migration runs over it and stops half way."""

    def __init__(self, cache: Any, after: int, then: Callable[[], None]) -> None:
        self._cache = cache
        self._after = after
        self._then = then
        self.sets = 0

    def set(self, *args: Any, **kwargs: Any) -> Any:
        self.sets += 1
        if self.sets > self._after:
            self._then()
        return self._cache.set(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def make_format1_store(state: Path, *, runs: int, steps: int, big: int = 0) -> None:
    """A store as storyflow 0.1.0 wrote it: format 1, records without the format-2
    fields; ``big`` of the step records (and every run record) hold a value file."""
    with Store(state) as store, store._cache.transact():
        for r in range(runs):
            run_id = f"20250101-0000{r:02d}-abcdef"
            rec = RunRecord(
                run_id=run_id, workflow="w", workflow_path="/nowhere/w.yaml",
                workflow_version=None, source_hash="h", status="succeeded", inputs={},
                environment=None, sets=[], created_at=1.0e9 + r, updated_at=1.0e9 + r,
                outputs={"story": BIG}, meta={"steps": [f"s{i}" for i in range(steps)]},
            )
            store.put_run(rec)
            old = rec.to_dict()
            for name in NEW_RUN_FIELDS:
                del old[name]
            store._cache.set(run_key(run_id), old)
            for i in range(steps):
                step = StepRecord(id=f"s{i}", status="succeeded", attempts=1,
                                  output=BIG if i < big else {"n": i}).to_dict()
                for name in NEW_STEP_FIELDS:
                    del step[name]
                store._cache.set(step_key(run_id, f"s{i}"), step)
        store._cache.set(FORMAT_KEY, 1)


def check_all_or_nothing(state: Path, before: dict[str, Any]) -> int:
    """The store is wholly format 1 (as ``before``) or wholly format 2; which one."""
    now = raw_records(state)
    if now[FORMAT_KEY] == 1:
        assert now == before
        return 1
    assert now[FORMAT_KEY] == 2
    for key, old in before.items():
        if key.startswith("run:"):
            assert now[key] == {**old, **NEW_RUN_FIELDS}, key
        elif key.startswith("step:"):
            assert now[key] == {**old, **NEW_STEP_FIELDS}, key
    return 2


def test_a_migration_that_fails_half_way_changes_nothing(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_format1_store(state_dir, runs=2, steps=30, big=5)
    before = raw_records(state_dir)
    files = sorted(p.name for p in (state_dir / "db").rglob("*.val"))
    assert len(files) == 2 + 2 * 5  # the run records and the big steps live in files
    real = MIGRATIONS[1]

    def boom() -> None:
        raise RuntimeError("boom")

    monkeypatch.setitem(MIGRATIONS, 1, lambda cache: real(HalfWay(cache, 40, boom)))
    with pytest.raises(StoreError) as info:
        Store(state_dir)
    assert info.value.message == (
        f"cannot migrate the store at {state_dir} from format 1 to 2: RuntimeError: boom"
    )
    assert info.value.hint is not None and "unchanged (format 1)" in info.value.hint
    assert check_all_or_nothing(state_dir, before) == 1
    # The new value files it wrote are gone, the old ones all there.
    assert sorted(p.name for p in (state_dir / "db").rglob("*.val")) == files

    monkeypatch.setitem(MIGRATIONS, 1, real)
    Store(state_dir).close()
    assert check_all_or_nothing(state_dir, before) == 2
    assert len(list((state_dir / "db").rglob("*.val"))) == len(files)  # old ones removed


def test_a_failed_migration_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_format1_store(state, runs=1, steps=3)
    script = textwrap.dedent("""
        import sys
        from storyflow.commands.app import main
        from storyflow.store import MIGRATIONS

        def broken(cache):
            raise KeyError("oops")

        MIGRATIONS[1] = broken
        sys.argv = ["storyflow", "--state-dir", sys.argv[1], "runs"]
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script, str(state)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        f"error: cannot migrate the store at {state} from format 1 to 2: KeyError: 'oops'"
    )
    assert "Traceback" not in done.stderr
    assert raw_records(state)[FORMAT_KEY] == 1


def test_atomic_keeps_a_replaced_value_file_until_it_commits(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as store:
        cache = store._cache
        cache.set("k", {"v": BIG})
        with pytest.raises(RuntimeError), atomic(cache):
            cache.set("k", {"v": BIG + "y"})
            cache.delete("k")
            raise RuntimeError
        assert cache.get("k") == {"v": BIG}  # diskcache's transact alone loses it
        assert len(list((tmp_path / "s" / "db").rglob("*.val"))) == 1
        with atomic(cache):
            cache.set("k", {"v": BIG + "z"})
        assert cache.get("k") == {"v": BIG + "z"}
        assert len(list((tmp_path / "s" / "db").rglob("*.val"))) == 1


# --- kill -9 half way ----------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from storyflow.store import MIGRATIONS, Store

    state, block_after = Path(sys.argv[1]), int(sys.argv[2])
    if block_after >= 0:
        real = MIGRATIONS[1]

        class HalfWay:
            def __init__(self, cache):
                self._cache, self.sets = cache, 0

            def set(self, *args, **kwargs):
                self.sets += 1
                if self.sets == block_after:
                    print("half way", flush=True)
                    time.sleep(120)
                return self._cache.set(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(self._cache, name)

        MIGRATIONS[1] = lambda cache: real(HalfWay(cache))
    print("opening", flush=True)
    Store(state).close()
    print("migrated", flush=True)
""")


@pytest.fixture(scope="module")
def big_format1_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 step records (and a few value files) as 0.1.0 wrote them."""
    state = tmp_path_factory.mktemp("big") / "state"
    make_format1_store(state, runs=4, steps=5_000, big=3)
    return state


def copy_of(state: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "state"
    shutil.copytree(state, target)
    return target


def kill_migration(state: Path, *, block_after: int, delay_s: float | None) -> None:
    """Start a process that opens (migrates) the store; kill -9 it when it says "half
    way" (``block_after`` sets into the migration), or ``delay_s`` after it opens."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(state), str(block_after)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "opening\n"
        if delay_s is None:
            assert proc.stdout.readline() == "half way\n"
        else:
            import time

            time.sleep(delay_s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
def test_kill_9_half_way_through_a_migration_leaves_format_1(
    big_format1_store: Path, tmp_path: Path
) -> None:
    state = copy_of(big_format1_store, tmp_path)
    before = raw_records(state)
    assert sum(k.startswith("step:") for k in before) == 20_000
    kill_migration(state, block_after=10_000, delay_s=None)
    assert check_all_or_nothing(state, before) == 1
    Store(state).close()  # the next open migrates it
    assert check_all_or_nothing(state, before) == 2


@pytest.mark.slow
def test_kill_9_at_any_moment_of_a_migration_leaves_one_format(
    big_format1_store: Path, tmp_path: Path
) -> None:
    state = copy_of(big_format1_store, tmp_path)
    before = raw_records(state)
    kill_migration(state, block_after=-1, delay_s=random.uniform(0.0, 1.5))
    check_all_or_nothing(state, before)
    Store(state).close()
    assert check_all_or_nothing(state, before) == 2


def test_gc_of_a_migrated_store_keeps_the_cache_entry_a_kept_run_came_from(
    cli: Cli, format1_state: Path
) -> None:
    """The second `failing` run's first step was answered from the cache entry the
    first one wrote: gc removes the first run, not the entry."""
    (entry,) = [k for k in raw_records(format1_state) if k.startswith("cache:")]
    assert raw_records(format1_state)[entry]["run_id"] == "20261204-161300-25bf83"
    done = cli("gc", "--keep", "0", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [r["run_id"] for r in doc["runs"]] == [
        "20261204-161300-25bf83", "20261204-161300-c76767", "20261204-161259-1c138b"]
    assert doc["totals"]["cache_entries"] == 0
    assert entry in raw_records(format1_state)
    doctor = cli("doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout
    assert {c["check"]: c["status"] for c in json.loads(doctor.stdout)}["store"] == "ok"


FAILING = """\
apiVersion: storyflow/v1
name: failing
description: A tiny workflow whose command step fails for good, after a cached step.
steps:
  hello:
    uses: command
    cache: true
    with: {run: [echo, hello], output: text}
  boom:
    uses: command
    retry: {attempts: 2, delay: 0s}
    with: {run: "echo {{ steps.hello.output }} >&2; exit 3", output: text}
"""


def test_a_migrated_run_resumes_forks_and_replays(
    cli: Cli, format1_state: Path, tmp_path: Path
) -> None:
    """The failed `failing` run, its workflow file back (at another path: the recorded
    one is under a temporary folder that is gone)."""
    run_id = "20261204-161303-e2fdfe"
    path = tmp_path / "failing.yaml"
    path.write_text(FAILING, encoding="utf-8")
    with Store(format1_state) as store:  # migrates
        rec = store.get_run(run_id)
        assert rec is not None and rec.forked_from is None
        rec.workflow_path = str(path)
        store.put_run(rec)

    def run(*args: str, code: int = 1) -> subprocess.CompletedProcess[str]:
        done = cli(*args, "--no-progress")
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr and "internal error" not in done.stderr
        return done

    replayed = run("replay", run_id).stderr
    assert f"run {run_id} has no answer to give back" in replayed  # 0.1.0 kept none
    assert "every call runs live" in replayed
    assert "kept: 1 step" in run("resume", run_id).stderr  # hello, from the cache
    forked = run("fork", run_id, "--from", "boom").stderr
    assert f"forking run {run_id} (failing) as run " in forked
    with Store(format1_state) as store:
        runs = store.list_runs(workflow="failing")
        assert {r.forked_from for r in runs} == {None, run_id}
        assert {(r.fork or {}).get("kind") for r in runs if r.fork} == {"fork", "replay"}
