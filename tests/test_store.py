"""The state store: records round-trip, runs are found and listed, the format version is
enforced, leases exclude live holders, checkpoints survive kill -9, event logs tolerate
torn lines, and secrets are scrubbed."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from storyflow.errors import EXIT_HELD, EXIT_USAGE, RunHeldError, StoreError, UsageError
from storyflow.events import ErrorClass, RunStatus, StepStatus
from storyflow.store import (
    MIGRATIONS,
    STORE_FORMAT,
    EventLog,
    RunRecord,
    StepRecord,
    Store,
    follow_events,
    read_events,
    redact,
)
from storyflow.store._store import FORMAT_KEY, lease_key

T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    with Store(tmp_path / "state", clock=clock) as s:
        yield s


def make_run(run_id: str, *, created_at: float = T0, **kw: Any) -> RunRecord:
    fields: dict[str, Any] = {
        "workflow": "tale",
        "workflow_path": "/work/tale.yaml",
        "workflow_version": "1.0",
        "source_hash": "abc123",
        "status": RunStatus.RUNNING,
        "inputs": {"topic": "owls"},
        "environment": None,
        "sets": [],
        "created_at": created_at,
        "updated_at": created_at,
    }
    fields.update(kw)
    return RunRecord(run_id=run_id, **fields)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live child process whose pid can stand for "another storyflow"."""
    with subprocess.Popen(["sleep", "30"]) as proc:
        try:
            yield proc
        finally:
            proc.kill()


# --- state directory -------------------------------------------------------------


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "state"
    old = os.umask(0o022)
    try:
        with Store(root) as s:
            run_dir = s.run_dir("r1")
    finally:
        os.umask(old)
    assert mode(root) == 0o700
    assert mode(root / "runs") == 0o700
    assert run_dir == root / "runs" / "r1"
    assert mode(run_dir) == 0o700


def test_an_existing_store_is_made_private_again(tmp_path: Path) -> None:
    root = tmp_path / "state"
    Store(root).close()
    root.chmod(0o755)
    Store(root).close()
    assert mode(root) == 0o700


def test_an_unusable_state_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as info:
        Store(blocker)
    assert isinstance(info.value.__cause__, OSError)


# --- records ---------------------------------------------------------------------


def test_runs_round_trip(store: Store) -> None:
    rec = make_run(
        "20250615-150640-aaaaaa",
        status=RunStatus.FAILED,
        environment="prod",
        sets=["steps.draft.with.n=3"],
        ended_at=T0 + 5,
        outputs={"story": "Once"},
        error={"class": ErrorClass.PERMANENT, "message": "boom"},
        parent_run="20250615-150000-bbbbbb",
        parent_step="sub",
        meta={"tokens": 12},
    )
    store.put_run(rec)
    got = store.get_run(rec.run_id)
    assert got == rec
    assert got is not None
    assert type(got.status) is str  # enums are persisted as their plain values
    assert got.error is not None and type(got.error["class"]) is str
    assert store.get_run("nope") is None


def test_steps_round_trip(store: Store) -> None:
    rec = StepRecord(
        id="polish#2.revise",
        status=StepStatus.SUCCEEDED,
        attempts=2,
        fingerprint="f" * 64,
        output={"text": "done", "n": [1, 2]},
        error={"class": "transient", "message": "429"},
        ready_at=T0,
        started_at=T0 + 1,
        ended_at=T0 + 2,
        agent="writer",
        degraded=True,
        meta={"tokens": 40},
    )
    store.put_step("r1", rec)
    store.put_step("r1", StepRecord(id="draft[2]", status="running"))
    assert store.get_step("r1", "polish#2.revise") == rec
    assert store.get_step("r2", "polish#2.revise") is None
    got = store.get_steps("r1", ["draft[2]", "missing", "polish#2.revise"])
    assert list(got) == ["draft[2]", "polish#2.revise"]
    assert got["draft[2]"] == StepRecord(id="draft[2]", status="running")


def test_from_dict_ignores_unknown_keys() -> None:
    d = StepRecord(id="a", status="pending").to_dict() | {"from_the_future": 1}
    assert StepRecord.from_dict(d) == StepRecord(id="a", status="pending")
    r = make_run("r").to_dict() | {"from_the_future": 1}
    assert RunRecord.from_dict(r) == make_run("r")


def test_put_step_is_a_single_write(store: Store) -> None:
    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.calls: list[str] = []

        def __getattr__(self, name: str) -> Any:
            attr = getattr(self.inner, name)
            if not callable(attr):
                return attr

            def call(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return attr(*args, **kwargs)

            return call

        def __contains__(self, key: object) -> bool:
            self.calls.append("__contains__")
            return key in self.inner

        def __getitem__(self, key: object) -> Any:
            self.calls.append("__getitem__")
            return self.inner[key]

    real = store._cache
    spy = Spy(real)
    store._cache = spy
    try:
        store.put_step("r1", StepRecord(id="draft", status="running", attempts=1))
    finally:
        store._cache = real
    assert spy.calls == ["set"]


def test_put_steps_rows_read_back_through_diskcache(store: Store) -> None:
    """The batch upsert writes what diskcache's own ``set`` would: values read back by
    ``get``, the item count right, a replaced large value's file removed."""
    import diskcache

    cache = store._cache
    big = "x" * 100_000  # stored by diskcache in a file of its own
    store.put_steps("r1", [StepRecord(id="a", status="running", attempts=1),
                           StepRecord(id="b", status="succeeded", attempts=1, output=big)])
    store.put_steps("r1", [StepRecord(id="a", status="succeeded", attempts=1, output=[1, 2])])
    assert cache.get("step:r1:a")["output"] == [1, 2]
    assert cache.get("step:r1:b")["output"] == big
    before = len(cache)
    files = {p for p in Path(cache.directory).rglob("*.val")}
    assert len(files) == 1
    store.put_steps("r1", [StepRecord(id="b", status="succeeded", attempts=2, output="small")])
    assert cache.get("step:r1:b")["output"] == "small"
    assert len(cache) == before  # replaced, not added
    assert not list(Path(cache.directory).rglob("*.val"))  # the old file is gone
    assert cache.check() == []  # diskcache's own consistency check: rows, files, counts
    assert isinstance(cache, diskcache.Cache)


def test_output_cache(store: Store) -> None:
    assert store.cache_get("fp1") == (False, None)
    store.cache_put("fp1", {"text": "x"}, "r1")
    store.cache_put("fp2", None, "r1")
    assert store.cache_get("fp1") == (True, {"text": "x"})
    assert store.cache_get("fp2") == (True, None)  # a None output is still a hit


# --- finding and listing runs ----------------------------------------------------


def test_new_run_ids_are_readable_sortable_and_unique(store: Store, clock: FakeClock) -> None:
    first = store.new_run_id()
    assert first.startswith("20250615-150640-")
    assert len(first) == len("20250615-150640-") + 6
    clock.now += 1
    assert store.new_run_id() > first
    assert len({store.new_run_id() for _ in range(50)}) == 50


def test_find_run_by_id_or_unique_prefix(store: Store) -> None:
    for run_id in ("20250615-150640-aaaaaa", "20250615-150640-aabbbb", "20250616-000000-cccccc"):
        store.put_run(make_run(run_id))
    assert store.find_run("20250615-150640-aaaaaa").run_id == "20250615-150640-aaaaaa"
    assert store.find_run("20250616").run_id == "20250616-000000-cccccc"
    assert store.find_run("20250615-150640-aab").run_id == "20250615-150640-aabbbb"

    with pytest.raises(UsageError) as ambiguous:
        store.find_run("20250615")
    assert ambiguous.value.exit_code == EXIT_USAGE
    assert "matches 2 runs" in ambiguous.value.message
    assert ambiguous.value.hint is not None
    assert "20250615-150640-aaaaaa" in ambiguous.value.hint
    assert "20250615-150640-aabbbb" in ambiguous.value.hint

    for ref in ("zzz", ""):
        with pytest.raises(UsageError) as missing:
            store.find_run(ref)
        assert missing.value.message == f"no run matches '{ref}'"
        assert missing.value.hint == "storyflow runs lists runs"


def test_list_runs_newest_first_filtered_and_limited(store: Store, clock: FakeClock) -> None:
    made: list[str] = []
    for i, (status, wf) in enumerate(
        [("succeeded", "tale"), ("failed", "tale"), ("failed", "poem"), ("running", "tale")]
    ):
        clock.now = T0 + 60 * i
        run_id = store.new_run_id()
        store.put_run(make_run(run_id, created_at=clock(), status=status, workflow=wf))
        made.append(run_id)
    # Inserted last but created first: order follows created_at, not insertion.
    store.put_run(make_run("20000101-000000-000000", created_at=T0 - 1e6))

    newest_first = [*reversed(made), "20000101-000000-000000"]
    assert [r.run_id for r in store.list_runs()] == newest_first
    assert [r.run_id for r in store.list_runs(limit=2)] == newest_first[:2]
    assert [r.run_id for r in store.list_runs(status="failed")] == [made[2], made[1]]
    assert [r.run_id for r in store.list_runs(status="failed", workflow="tale")] == [made[1]]
    assert [r.run_id for r in store.list_runs(status=RunStatus.FAILED, limit=1)] == [made[2]]
    assert store.list_runs(workflow="nothing") == []

    # Replacing a run does not duplicate it in the index.
    store.put_run(make_run(made[0], created_at=T0, status="succeeded", workflow="tale"))
    assert len(store.list_runs()) == 5


def test_last_run(store: Store) -> None:
    assert store.last_run() is None
    store.put_run(make_run("b", created_at=T0 + 10))
    store.put_run(make_run("a", created_at=T0))
    last = store.last_run()
    assert last is not None and last.run_id == "b"


# --- format version --------------------------------------------------------------


def test_a_fresh_store_records_its_format(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as s:
        assert s._cache.get(FORMAT_KEY) == STORE_FORMAT
    with Store(tmp_path / "s") as s:  # reopening is fine
        assert s._cache.get(FORMAT_KEY) == STORE_FORMAT


def test_a_newer_store_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as s:
        s._cache.set(FORMAT_KEY, STORE_FORMAT + 1)
    with pytest.raises(StoreError) as info:
        Store(tmp_path / "s")
    assert info.value.message == (
        f"the store at {tmp_path / 's'} was written by a newer storyflow "
        f"(format {STORE_FORMAT + 1})"
    )
    assert info.value.hint is not None


def test_an_older_store_is_migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(tmp_path / "s") as s:
        s._cache.set(FORMAT_KEY, STORE_FORMAT - 1)
        s._cache.set("legacy", "old shape")
    seen: list[str] = []

    def migrate(cache: Any) -> None:
        seen.append(cache.get("legacy"))
        cache.set("legacy", "new shape")

    monkeypatch.setitem(MIGRATIONS, STORE_FORMAT - 1, migrate)
    with Store(tmp_path / "s") as s:
        assert s._cache.get(FORMAT_KEY) == STORE_FORMAT
        assert s._cache.get("legacy") == "new shape"
    assert seen == ["old shape"]
    Store(tmp_path / "s").close()  # already migrated: runs once
    assert seen == ["old shape"]


def test_an_older_store_without_a_migration_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as s:
        s._cache.set(FORMAT_KEY, -5)
    with pytest.raises(StoreError, match="cannot migrate"):
        Store(tmp_path / "s")


# --- leases ----------------------------------------------------------------------


def put_lease(store: Store, run_id: str, *, pid: int, host: str, heartbeat: float) -> None:
    record = {"pid": pid, "host": host, "token": "theirs", "heartbeat": heartbeat}
    store._cache.set(lease_key(run_id), record)


def test_a_lease_excludes_a_second_holder(store: Store) -> None:
    lease = store.acquire_lease("r1")
    assert lease.run_id == "r1" and len(lease.token) == 32
    with pytest.raises(RunHeldError) as info:
        store.acquire_lease("r1")  # this very process is alive
    assert info.value.exit_code == EXIT_HELD
    assert (
        info.value.message == f"run r1 is held by process {os.getpid()} on {socket.gethostname()}"
    )
    assert info.value.hint == "wait for it to finish, or stop that process"
    store.acquire_lease("r2").release()  # other runs are free
    lease.release()
    store.acquire_lease("r1").release()


def test_a_live_process_holds_and_a_dead_one_is_taken_over(
    store: Store, clock: FakeClock, sleeper: subprocess.Popen[bytes]
) -> None:
    put_lease(store, "r1", pid=sleeper.pid, host=socket.gethostname(), heartbeat=clock())
    with pytest.raises(RunHeldError, match=f"held by process {sleeper.pid} "):
        store.acquire_lease("r1")
    sleeper.kill()
    sleeper.wait()
    lease = store.acquire_lease("r1")
    assert store._cache.get(lease_key("r1"))["token"] == lease.token
    lease.release()


def test_a_stale_heartbeat_is_taken_over(
    store: Store, clock: FakeClock, sleeper: subprocess.Popen[bytes]
) -> None:
    put_lease(store, "r1", pid=sleeper.pid, host=socket.gethostname(), heartbeat=clock())
    clock.now += 29
    with pytest.raises(RunHeldError):
        store.acquire_lease("r1", ttl_s=30)
    clock.now += 2  # 31 s without a heartbeat: hung, even though the pid lives
    store.acquire_lease("r1", ttl_s=30).release()


def test_another_host_is_judged_by_its_heartbeat(store: Store, clock: FakeClock) -> None:
    put_lease(store, "r1", pid=1, host="elsewhere.invalid", heartbeat=clock())
    with pytest.raises(RunHeldError, match=r"on elsewhere\.invalid"):
        store.acquire_lease("r1", ttl_s=10)
    clock.now += 10
    store.acquire_lease("r1", ttl_s=10).release()


def test_heartbeat_and_release(store: Store, clock: FakeClock) -> None:
    old = store.acquire_lease("r1", ttl_s=10)
    clock.now += 5
    old.heartbeat()
    assert store._cache.get(lease_key("r1"))["heartbeat"] == T0 + 5
    clock.now += 9  # 9 s after the last heartbeat: still held
    with pytest.raises(RunHeldError):
        store.acquire_lease("r1", ttl_s=10)

    clock.now += 1  # now stale: a successor takes over
    new = store.acquire_lease("r1", ttl_s=10)
    with pytest.raises(RunHeldError):
        old.heartbeat()  # the old holder learns it lost the run
    old.release()  # and releasing does not free the successor's lease
    assert store._cache.get(lease_key("r1"))["token"] == new.token

    with new:
        pass  # released on exit
    assert store._cache.get(lease_key("r1")) is None


# --- crash safety ----------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from storyflow.store import StepRecord, Store

    store = Store(Path(sys.argv[1]))
    for batch in range(10):
        for i in range(20):
            n = batch * 20 + i
            store.put_step("r1", StepRecord(id=f"s[{n}]", status="succeeded", output={"n": n}))
        print(f"done {n + 1}", flush=True)
        time.sleep(0.01)
    time.sleep(60)
    """
)


def test_checkpoints_survive_kill_9(tmp_path: Path) -> None:
    root = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "cli"))
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        reported = 0
        try:
            while reported < 60:
                line = proc.stdout.readline()
                assert line, f"writer died: {proc.stderr.read() if proc.stderr else ''}"
                reported = int(line.split()[1])
        finally:
            proc.kill()  # SIGKILL: no cleanup, no close
        out, _ = proc.communicate()
    assert proc.returncode == -9
    for line in out.splitlines():
        reported = int(line.split()[1])

    with Store(root) as s:
        got = s.get_steps("r1", [f"s[{n}]" for n in range(reported)])
    assert len(got) == reported
    assert all(got[f"s[{n}]"].output == {"n": n} for n in range(reported))


# --- event log -------------------------------------------------------------------


def test_event_log_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events: list[dict[str, Any]] = [
        {"type": "run.started", "run_id": "r1", "ts": T0},
        {"type": "step.succeeded", "step": "draft[2]", "output": "«café» ✓", "attempt": 1},
    ]
    with EventLog(path) as log:
        for e in events:
            log.write(e)
        log.write({"type": "odd", "path": Path("/x")})  # non-JSON values become strings
    assert mode(path) == 0o600
    assert path.read_text(encoding="utf-8").splitlines()[1] == json.dumps(
        events[1], separators=(",", ":"), ensure_ascii=False
    )
    assert list(read_events(path)) == [*events, {"type": "odd", "path": "/x"}]


def test_a_torn_last_line_is_skipped_and_later_writes_start_clean(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.write({"type": "run.started"})
    with path.open("ab") as f:
        f.write('{"type":"step.star «'.encode()[:-1])  # torn mid-character, as by a crash
    assert list(read_events(path)) == [{"type": "run.started"}]

    with EventLog(path) as log:  # a resumed run appends after the torn line
        log.write({"type": "run.resumed"})
    assert list(read_events(path)) == [{"type": "run.started"}, {"type": "run.resumed"}]


def test_follow_events_sees_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    finished = threading.Event()

    def writer() -> None:
        time.sleep(0.05)  # the follower starts before the file exists
        with EventLog(path) as log:
            for i in range(3):
                log.write({"type": "step.started", "n": i})
                time.sleep(0.02)
        with path.open("a", encoding="utf-8") as f:  # one line in two flushed halves
            f.write('{"type":"run.')
            f.flush()
            time.sleep(0.05)
            f.write('succeeded"}\n')
        finished.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        got = list(follow_events(path, poll_s=0.01, stop=finished.is_set))
    finally:
        thread.join()
    assert got == [
        {"type": "step.started", "n": 0},
        {"type": "step.started", "n": 1},
        {"type": "step.started", "n": 2},
        {"type": "run.succeeded"},
    ]


def test_follow_events_stops_without_a_file(tmp_path: Path) -> None:
    sleeps: list[float] = []
    calls = iter([False, False, True])
    stop: Callable[[], bool] = lambda: next(calls)  # noqa: E731
    assert list(follow_events(tmp_path / "none", poll_s=0.5, stop=stop, sleep=sleeps.append)) == []
    assert sleeps == [0.5, 0.5]


# --- redaction -------------------------------------------------------------------


def test_redact_scrubs_nested_values_and_copies() -> None:
    value: dict[str, Any] = {
        "prompt": "use sk-live-123456 and hunter22",
        "nested": [{"k": "sk-live-123456"}, ("hunter22!", 3, None, True)],
        "sk-live-123456": 1.5,
        "short": "abc abc",
    }
    out = redact(value, ["sk-live-123456", "hunter22", "abc", "", "sk-live"])
    assert out == {
        "prompt": "use *** and ***",
        "nested": [{"k": "***"}, ["***!", 3, None, True]],
        "***": 1.5,
        "short": "abc abc",  # shorter than 4: left alone
    }
    assert value["nested"][0] == {"k": "sk-live-123456"}  # the input is untouched
    assert redact("nothing here", []) == "nothing here"
