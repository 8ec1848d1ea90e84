"""Signals and processes (issue #13, items 1-4): a run ends on SIGINT/SIGTERM with 130/143
(0 once it has succeeded) within the grace period, leaves no process of its own behind,
loses nothing it committed, and `resume` runs nothing twice at once — not even after a
``kill -9`` of storyflow.

Everything goes through the real CLI in subprocesses, with real signals. Command steps
run ``cmd.sh``, which writes the pid of each of its processes under ``pids/`` (in the
file's name ``STEP.PID``: a process stopped before it wrote the file leaves it empty)
and, when it starts, notes in ``overlap`` any earlier attempt of the same step that
still runs.
Waits are bounded polls; no assertion depends on a sleep being long enough.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI_TIMEOUT_S, cli_env, run_cli
from storyflow.commands.stopping import STOP_GRACE_S
from storyflow.store import Store
from storyflow.store._store import lease_key

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and process groups")

CMD = r"""
name=$1; pause=$2; again=$3; shift 3
for f in pids/"$name".*; do
  [ -e "$f" ] || continue
  again_=1; p=${f##*.}
  if [ -r /proc/$p/stat ] && [ "$(cut -d' ' -f3 /proc/$p/stat)" != Z ]; then
    echo "$name: $p still runs" >> overlap
  fi
done
[ -n "$again_" ] && pause=$again
sleep "$pause" &
echo $! > pids/"$name".$!
echo $$ > pids/"$name".$$
wait $!
echo "$name:$*"
"""

AGENTS = """
import time

def work(me, pause=0.0):
    time.sleep(pause)
    return me
"""

MIX = """
apiVersion: storyflow/v1
name: mix
defaults: {retry: {attempts: 1}}
steps:
  plan: {uses: python, with: {callable: "agents:work", me: plan, pause: 0.1}}
  left:
    uses: command
    with: {run: ["sh", "cmd.sh", "left", "0.3", "0.3", "{{ steps.plan.output }}"]}
  right: {uses: command, with: {run: "sh cmd.sh right 0.15 0.15 {{ steps.plan.output }}"}}
  draft:
    for_each: [1, 2]
    uses: command
    with: {run: "sh cmd.sh draft-{{ item }} 0.2 0.2 {{ steps.right.output }}"}
  mid: {uses: python, with: {callable: "agents:work", me: "{{ steps.left.output }}", pause: 0.15}}
  end:
    uses: command
    with: {run: "sh cmd.sh end 0.1 0.1 {{ steps.mid.output }}+{{ steps.draft.output | join(',') }}"}
outputs:
  story: "{{ steps.end.output }}"
"""


@dataclass
class Project:
    root: Path
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.state = self.root / "state"
        (self.root / "pids").mkdir(parents=True, exist_ok=True)
        (self.root / "cmd.sh").write_text(CMD.lstrip(), encoding="utf-8")
        (self.root / "agents.py").write_text(AGENTS.lstrip(), encoding="utf-8")

    def workflow(self, text: str, name: str = "wf.yaml") -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "storyflow", *args], cwd=self.root, text=True,
            env=cli_env(self.state, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, state_dir=self.state, cwd=self.root)

    def pids(self) -> list[int]:
        """``cmd.sh``'s processes (by the files' names) and those of the other commands
        (which write theirs into ``pids/NAME``)."""
        found = []
        for path in (self.root / "pids").iterdir():
            name, _, pid = path.name.rpartition(".")
            if name and pid.isdigit():
                found.append(int(pid))
            elif text := path.read_text().strip():
                found.append(int(text))
        return found

    def overlap(self) -> str:
        path = self.root / "overlap"
        return path.read_text() if path.exists() else ""


def alive(pid: int) -> bool:
    """The process runs (a zombie does not: PID 1 may never reap it here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_all_gone(pids: list[int], within_s: float = 10.0) -> list[int]:
    """The pids still alive after ``within_s`` (polled; well under the 30-60 s that the
    long commands here sleep, so a process left running is still seen)."""
    deadline = time.monotonic() + within_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def wait_for(predicate: Any, proc: subprocess.Popen[str] | None = None,
             within_s: float = CLI_TIMEOUT_S, every_s: float = 0.01) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert proc is None or proc.poll() is None, "the run ended too early"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every_s)


def next_line(proc: subprocess.Popen[str]) -> str | None:
    """The next line the run prints (None once its output has ended), read byte by byte:
    a buffered read may take later lines along, and `finish`'s ``communicate`` reads the
    pipe itself, so they (the summary too) would be lost."""
    assert proc.stdout is not None
    fd, line = proc.stdout.fileno(), bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            return None
        line += byte
    return line.decode("utf-8")


def first_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The run's first event: ``run.started`` (its signal handlers are installed)."""
    line = next_line(proc)
    assert line is not None, "the run printed no event"
    return dict(json.loads(line))


def lease_groups(project: Project, run_id: str) -> set[int]:
    """The process groups the run's lease records now."""
    with Store(project.state) as store:
        record = store._cache.get(lease_key(run_id))
    return {g["pgid"] for g in (record or {}).get("groups", [])}


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def finish(proc: subprocess.Popen[str], within_s: float = STOP_GRACE_S + 5) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"storyflow did not exit within {within_s}s:\n{err}") from None


def run_status(project: Project, run_id: str) -> str:
    with Store(project.state) as store:
        record = store.get_run(run_id)
        assert record is not None
        return str(record.status)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


# -- the harness ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    index: int
    signum: int
    after: int
    """The signal goes once the run has printed this many events (1: ``run.started``)..."""
    delay_s: float
    """... and this long more."""


@dataclass
class Outcome:
    trial: Trial
    code: int
    exit_s: float
    problems: list[str]


def _one_trial(root: Path, trial: Trial, expected: dict[str, Any]) -> Outcome:
    project = Project(root)
    wf = project.workflow(MIX)
    proc = project.start("run", str(wf), "--json")
    problems: list[str] = []
    run_id = first_line(proc)["run_id"]  # the run has started: signals are ours
    for _ in range(trial.after - 1):  # a moment told by the run's progress, not a clock
        if next_line(proc) is None:
            break
    time.sleep(trial.delay_s)
    sent = time.monotonic()
    proc.send_signal(trial.signum)
    rest, err = finish(proc)
    exit_s = time.monotonic() - sent
    code = proc.returncode
    wanted = 130 if trial.signum == signal.SIGINT else 143
    if code not in (wanted, 0):
        problems.append(f"exit {code}, not {wanted} or 0: {err[-500:]}")
    if exit_s > STOP_GRACE_S:
        problems.append(f"exited {exit_s:.1f}s after the signal")
    summary = events(rest)[-1] if events(rest) else {}
    if summary.get("type") != "run.summary":
        problems.append(f"no summary at the end: {rest[-300:]!r} {err[-300:]}")
    if code == 0 and summary.get("outputs") != expected:
        problems.append(f"succeeded with {summary.get('outputs')}")
    if left := wait_all_gone(project.pids()):
        problems.append(f"processes of the run still alive: {left}")
    if code != 0 and not problems:
        status = run_status(project, run_id)
        if status != "interrupted":
            problems.append(f"the run is {status}, not interrupted")
        resumed = project.cli("resume", run_id, "--json")
        if resumed.returncode != 0:
            problems.append(f"resume exited {resumed.returncode}: {resumed.stderr[-500:]}")
        elif events(resumed.stdout)[-1].get("outputs") != expected:
            problems.append(f"resume reached {events(resumed.stdout)[-1].get('outputs')}")
        if left := wait_all_gone(project.pids()):
            problems.append(f"processes still alive after resume: {left}")
    if project.overlap():
        problems.append(f"an attempt ran beside an earlier one: {project.overlap()}")
    return Outcome(trial, code, exit_s, problems)


@pytest.mark.slow
def test_signal_harness_50_random_sigint_sigterm_exit_clean_and_resume_the_same(
    tmp_path: Path,
) -> None:
    """50 SIGINT/SIGTERM at random moments (seeded) of a run mixing python and command
    steps: each exits 130/143 (0 if it had finished) within the grace period, with a
    summary, no process of the run left, and `resume` reaches the uninterrupted outputs.

    A moment is a number of the run's events, then up to 0.15 s (about the time between
    two of them): a busy machine slows the run, not where the signals land in it.
    """
    base = Project(tmp_path / "base")
    result = base.cli("run", str(base.workflow(MIX)), "--json")
    assert result.returncode == 0, result.stderr
    done = events(result.stdout)[-1]
    expected = done["outputs"]
    assert expected == {"story": "end:left:plan+draft-1:right:plan,draft-2:right:plan"}
    before_summary = len(events(result.stdout)) - 1
    rng = random.Random(13)
    trials = [
        Trial(i, rng.choice([signal.SIGINT, signal.SIGTERM]),
              rng.randint(1, before_summary), rng.uniform(0.0, 0.15))
        for i in range(50)
    ]
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(
            lambda t: _one_trial(tmp_path / f"t{t.index}", t, expected), trials
        ))
    took = time.monotonic() - started
    failed = [(o.trial, o.problems) for o in outcomes if o.problems]
    assert not failed, failed
    interrupted = [o for o in outcomes if o.code != 0]
    assert len(interrupted) >= 25, "most signals should land while the run runs"
    slowest = max(o.exit_s for o in outcomes)
    print(f"\n50 signals in {took:.1f}s; {len(interrupted)} interrupted, "
          f"slowest exit {slowest:.2f}s after its signal")


# -- kill -9 --------------------------------------------------------------------------------

SLOW = """
apiVersion: storyflow/v1
name: slow
defaults: {retry: {attempts: 1}}
steps:
  quick: {uses: python, with: {callable: "agents:work", me: quick}}
  long: {uses: command, with: {run: "sh cmd.sh long 30 0.05 {{ steps.quick.output }}"}}
  also: {uses: command, with: {run: ["sh", "cmd.sh", "also", "30", "0.05", "x"]}}
outputs:
  out: "{{ steps.long.output }} {{ steps.also.output }}"
"""


def _kill_9_trial(root: Path, seed: int) -> list[str]:
    project = Project(root)
    wf = project.workflow(SLOW)
    proc = project.start("run", str(wf), "--json")
    run_id = first_line(proc)["run_id"]
    pids = root / "pids"
    wait_for(lambda: sum(1 for _ in pids.iterdir()) >= 4, proc)  # both commands run
    # ... and the lease says so: a command writes its pids before storyflow records its
    # group, and a kill -9 in between leaves nothing for `resume` to stop.
    wait_for(lambda: len(lease_groups(project, run_id)) >= 2, proc, every_s=0.05)
    time.sleep(random.Random(seed).uniform(0.0, 0.2))
    proc.kill()
    finish(proc)
    first = project.pids()
    resumed = project.cli("resume", run_id, "--json")
    problems = []
    if resumed.returncode != 0:
        problems.append(f"resume exited {resumed.returncode}: {resumed.stderr[-500:]}")
    elif events(resumed.stdout)[-1]["outputs"] != {"out": "long:quick also:x"}:
        problems.append(f"resume reached {events(resumed.stdout)[-1]['outputs']}")
    if project.overlap():
        problems.append(f"a re-run ran beside the dead run's attempt: {project.overlap()}")
    if left := [p for p in first if alive(p)]:
        problems.append(f"commands of the dead run outlived the resume: {left}")
    return problems


def test_kill_9_then_resume_stops_the_dead_runs_commands_before_rerunning(
    tmp_path: Path,
) -> None:
    """10 trials: storyflow killed with SIGKILL while two 30-second commands run; the
    next `resume` stops what they left running before it runs them again."""
    with ThreadPoolExecutor(3) as pool:
        problems = list(pool.map(lambda i: _kill_9_trial(tmp_path / f"k{i}", i), range(10)))
    assert not [p for p in problems if p], problems


def test_the_lease_records_the_command_groups_in_flight(project: Project) -> None:
    wf = project.workflow(SLOW)
    proc = project.start("run", str(wf), "--json")
    try:
        run_id = first_line(proc)["run_id"]
        pids = project.root / "pids"
        wait_for(lambda: sum(1 for _ in pids.iterdir()) >= 4, proc)
        # storyflow records a group once the command has started: a little later
        wait_for(lambda: len(lease_groups(project, run_id)) >= 2, proc, every_s=0.05)
        groups = lease_groups(project, run_id)
        leaders = {int(p.name.split(".")[1]) for p in pids.iterdir()}
        assert len(groups) == 2 and groups <= {os.getpgid(p) for p in leaders if alive(p)}
    finally:
        proc.send_signal(signal.SIGINT)
        finish(proc)
    assert proc.returncode == 130
    assert not wait_all_gone(project.pids())


# -- one case each ------------------------------------------------------------------------


def test_a_second_ctrl_c_leaves_at_once_and_the_run_is_interrupted(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: stubborn
        steps:
          deaf:
            uses: command
            with: {run: "trap 'echo > termed' TERM; echo $$ > pids/deaf; while :; do sleep 1; done"}
    """)
    proc = project.start("run", str(wf), "--json")
    run_id = first_line(proc)["run_id"]
    wait_for(lambda: (project.root / "pids" / "deaf").exists(), proc)
    proc.send_signal(signal.SIGINT)  # the command notes the SIGTERM it gets, and goes on
    # The first signal is handled before the second is sent: two that reach the process
    # before Python runs its handler make one call of it (a busy machine, a 0.3 s sleep).
    wait_for(lambda: (project.root / "termed").exists(), proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = finish(proc)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < STOP_GRACE_S  # the message says how it left
    assert "did not stop within" not in err
    assert "second signal" in err and f"storyflow resume {run_id}" in err
    assert run_status(project, run_id) == "interrupted"
    assert not wait_all_gone(project.pids())


def test_a_term_ignoring_command_is_killed_after_its_grace(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: deaf
        steps:
          deaf: {uses: command, with: {run: "trap '' TERM; echo $$ > pids/deaf; sleep 60"}}
          py: {uses: python, with: {callable: "agents:work", me: py, pause: 30}}
    """)
    proc = project.start("run", str(wf), "--json")
    run_id = first_line(proc)["run_id"]
    wait_for(lambda: (project.root / "pids" / "deaf").exists(), proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    took = time.monotonic() - sent
    assert proc.returncode == 143, err
    assert 1.5 < took < STOP_GRACE_S  # SIGTERM ignored; SIGKILL after the 2 s grace
    assert events(out)[-1]["status"] == "interrupted"
    assert run_status(project, run_id) == "interrupted"
    assert not wait_all_gone(project.pids())


def test_a_grandchild_that_escapes_with_setsid(project: Project) -> None:
    """It holds the pipes: the timeout is reported at its own time, with no noise of a
    transport closed on a closed loop; without a timeout the output is what the command
    printed, read until its own processes are gone (and 2 s more)."""
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: escape
        steps:
          timed:
            uses: command
            with: {run: "setsid sh -c 'echo $$ > pids/timed; exec sleep 30' & sleep 30"}
            timeout: 1s
            retry: {attempts: 1}
            allow_failure: true
          loose:
            uses: command
            with: {run: "setsid sh -c 'echo $$ > pids/loose; exec sleep 30' & echo started"}
        outputs:
          loose: "{{ steps.loose.output }}"
    """)
    try:
        started = time.monotonic()
        result = project.cli("run", str(wf), "--json")
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert "Exception ignored" not in result.stderr
        assert "Event loop is closed" not in result.stderr
        found = events(result.stdout)
        (failed,) = [e for e in found if e["type"] == "step.failed" and e["step"] == "timed"]
        assert failed["error"]["class"] == "timeout"
        assert failed["duration_s"] < 2.0
        assert found[-1]["outputs"] == {"loose": "started"}
        assert took < 10
    finally:
        for pid in project.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_signal_after_the_run_succeeded_exits_0(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: quick
        steps:
          one: {uses: template, with: {template: "done"}}
        outputs:
          one: "{{ steps.one.output }}"
    """)
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = project.start("run", str(wf), "--json")
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line)["type"] == "run.summary":
                break
        proc.send_signal(signum)  # while it closes: the outcome is decided
        _, err = finish(proc)
        assert proc.returncode == 0, (signum, err)


def test_a_signal_in_the_very_turn_a_step_starts_does_not_hang_the_run(
    project: Project,
) -> None:
    """A step task cancelled before its first step never runs its `finally`; the run
    used to wait for it forever (the hang after Ctrl-C)."""
    (project.root / "racer.py").write_text(textwrap.dedent("""
        import os, signal

        async def stop_after(me):
            os.kill(os.getpid(), signal.SIGINT)  # handled in this very turn of the loop
            return me
    """), encoding="utf-8")
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: race
        steps:
          a: {uses: python, with: {callable: "racer:stop_after", me: a}}
          b: {uses: python, with: {callable: "agents:work", me: "{{ steps.a.output }}"}}
          c: {uses: command, with: {run: "echo {{ steps.a.output }}"}}
    """)
    proc = project.start("run", str(wf), "--json", env={"STORYFLOW_STOP_GRACE_S": "5"})
    out, err = finish(proc)
    assert proc.returncode == 130, err
    assert "leaving now" not in err  # the watchdog had nothing to do
    assert events(out)[-1]["status"] == "interrupted"


def test_a_run_that_cannot_stop_is_left_after_the_grace_period(project: Project) -> None:
    """A step that blocks the event loop: the watchdog kills the command groups in
    flight, records the run interrupted and exits 130 once the grace period is over."""
    (project.root / "blocker.py").write_text(textwrap.dedent("""
        import time
        from pathlib import Path

        async def block(me):
            Path("blocking").write_text("")
            time.sleep(60)  # never yields to the loop
            return me
    """), encoding="utf-8")
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: stuck
        steps:
          cmd: {uses: command, with: {run: ["sh", "cmd.sh", "cmd", "60", "60"]}}
          stuck:
            uses: python
            with: {callable: "blocker:block", me: x}
            needs: [cmd]
          starter: {uses: python, with: {callable: "agents:work", me: s, pause: 0.2}}
          block:
            uses: python
            with: {callable: "blocker:block", me: "{{ steps.starter.output }}"}
    """)
    proc = project.start("run", str(wf), "--json", env={"STORYFLOW_STOP_GRACE_S": "1.5"})
    run_id = first_line(proc)["run_id"]
    wait_for(lambda: (project.root / "blocking").exists(), proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = finish(proc)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert 1.4 < took < 4.0
    assert "did not stop within 1.5s" in err
    assert run_status(project, run_id) == "interrupted"
    assert not wait_all_gone(project.pids())


@pytest.fixture
def sleeper_group() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_taking_over_a_dead_holders_lease_stops_its_recorded_groups(
    tmp_path: Path, sleeper_group: subprocess.Popen[bytes]
) -> None:
    with Store(tmp_path / "state") as store:
        lease = store.acquire_lease("r1")
        lease.track_groups([sleeper_group.pid])
        record = store._cache.get(lease_key("r1"))
        assert [g["pgid"] for g in record["groups"]] == [sleeper_group.pid]
        dead = subprocess.Popen(["true"])
        dead.wait()
        store._cache.set(lease_key("r1"), {**record, "pid": dead.pid})  # its holder died
        taken = store.acquire_lease("r1")
        assert taken.stopped == (sleeper_group.pid,)
        assert sleeper_group.wait(timeout=3) == -signal.SIGTERM
        assert "groups" not in store._cache.get(lease_key("r1"))
        taken.release()


def test_a_recorded_group_whose_id_was_reused_is_left_alone(
    tmp_path: Path, sleeper_group: subprocess.Popen[bytes]
) -> None:
    with Store(tmp_path / "state") as store:
        lease = store.acquire_lease("r1")
        lease.track_groups([sleeper_group.pid])
        record = store._cache.get(lease_key("r1"))
        dead = subprocess.Popen(["true"])
        dead.wait()
        (group,) = record["groups"]
        reused = {**group, "start": group["start"] - 1}  # another process, long ago
        store._cache.set(lease_key("r1"), {**record, "pid": dead.pid, "groups": [reused]})
        taken = store.acquire_lease("r1")
        assert taken.stopped == ()
        assert sleeper_group.poll() is None
        taken.release()
