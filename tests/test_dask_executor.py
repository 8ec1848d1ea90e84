"""The Dask executor against real clusters: a temporary `LocalCluster` started by the run,
and `dask scheduler` / `dask worker` processes started here on 127.0.0.1.

No mock of Dask anywhere: workers are separate processes, killed with real signals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI_TIMEOUT_S, CliProject, cli_env
from llm_server import FakeLLM

pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).parent / "dask"
PROBE = '''
import json, os, socket, time
from pathlib import Path


def _log(log, name):
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(name + "\\n")


def where(name="", i=0, sleep=0.0, log="", context=None):
    """Where this attempt ran; waits ``sleep`` seconds."""
    _log(log, f"start {name}")
    if sleep:
        time.sleep(sleep)
    _log(log, f"end {name}")
    return {"pid": os.getpid(), "host": socket.gethostname(), "i": i, "name": name,
            "secret": sorted(context.secrets) if context is not None else []}


def gated(name="", gate="", log=""):
    """Write our pid to GATE.pid, wait (up to 60 s) for GATE to exist, then return."""
    _log(log, f"start {name}")
    Path(gate + ".pid").write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    _log(log, f"end {name}")
    return {"pid": os.getpid(), "name": name}


def window(name="", log="", sleep=0.3):
    """Record when this attempt ran, for concurrency checks."""
    start = time.time()
    time.sleep(sleep)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"name": name, "start": start, "end": time.time(),
                            "pid": os.getpid()}) + "\\n")
    return name
'''


@pytest.fixture
def project(tmp_path: Path) -> CliProject:
    return CliProject(tmp_path, "probe", PROBE)


def events_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def launch(project: CliProject, *args: str | Path,
           env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``storyflow ARGS --json`` in the background, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "storyflow", *map(str, args), "--json"],
        cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(project.state, env),
    )


def wait_for_file(path: Path, proc: subprocess.Popen[str]) -> int:
    """Wait (while ``proc`` lives) until ``path`` holds a pid; the pid."""
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not (path.exists() and path.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return int(path.read_text())


class Cluster:
    """`dask scheduler` and `dask worker` processes on 127.0.0.1, as a user starts them."""

    def __init__(self, root: Path, workers: int = 2, threads: int = 1,
                 worker_env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.file = root / "scheduler.json"
        self.env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        self.worker_env = {**self.env, **(worker_env or {})}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler = self._spawn(
            "scheduler", [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0",
                          "--no-dashboard", "--scheduler-file", str(self.file)]
        )
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not self.file.exists():
            assert self.scheduler.poll() is None, self.log("scheduler")
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.05)
        time.sleep(0.1)  # the file is written whole before it is renamed? be safe
        self.address: str = json.loads(self.file.read_text())["address"]
        self.workers = [self.add_worker(threads, i) for i in range(workers)]
        self.wait_for(workers)

    def _spawn(self, name: str, argv: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, env=env or self.env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=self.root,
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def add_worker(self, threads: int, i: int) -> subprocess.Popen[bytes]:
        return self._spawn(f"worker{i}", [
            str(DASK), "worker", self.address, "--nthreads", str(threads), "--nworkers", "1",
            "--host", "127.0.0.1", "--no-dashboard",
            "--local-directory", str(self.root / f"w{i}"),
        ], env=self.worker_env)

    def wait_for(self, n: int) -> None:
        code = (
            "import sys\nfrom distributed import Client\n"
            f"c = Client({self.address!r}, timeout=30)\n"
            f"c.wait_for_workers({n}, timeout=60)\nc.close()\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=90,
                       capture_output=True)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.root.glob("*.log"))

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One scheduler and two workers of two threads each, shared by this module's tests."""
    c = Cluster(tmp_path_factory.mktemp("cluster"), workers=2, threads=2)
    try:
        yield c
    finally:
        c.close()


def test_a_temporary_local_cluster_runs_every_worker_kind(project: CliProject) -> None:
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: spread
        executor: {dask: {workers: 2}}
        steps:
          items:
            for_each: [0, 1, 2, 3, 4, 5]
            uses: python
            with: {callable: "probe:where", name: "item{{ item }}", i: "{{ item }}",
                   sleep: 0.3}
          cmd: {uses: command, with: {run: ["sh", "-c", "echo $$"]}}
          words: {uses: builtin/grammar, prompt: "a lighthouse"}
          joined: {uses: template, with: {template: "{{ steps.words.output }}!"}}
        outputs:
          pids: "{{ steps.items.output | map(attribute='pid') | list }}"
          cmd: "{{ steps.cmd.output }}"
    """)
    proc = launch(project, "run", wf)
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    events = events_of(out)
    for event in events:
        project._events.validate(event)
    started = events[0]
    assert started["executor"]["kind"] == "dask"
    assert started["executor"]["cluster"] == "local"
    assert len(started["executor"]["workers"]) == 2
    summary = events[-1]
    pids = set(summary["outputs"]["pids"])
    assert len(pids) == 2, "the items ran on both workers"
    assert proc.pid not in pids, "nothing ran in the coordinator"
    assert int(summary["outputs"]["cmd"]) != proc.pid
    ran_on = {e["step"]: e.get("worker") for e in events if e["type"] == "step.succeeded"}
    assert all(ran_on[f"items[{i}]"].startswith("tcp://127.0.0.1:") for i in range(6))
    assert ran_on["cmd"] and ran_on["words"]
    assert ran_on["joined"] is None, "a template step stays on the coordinator"


def test_batch_runs_through_dask_scheduler_and_worker_processes(
    tmp_path: Path, cluster: Cluster
) -> None:
    flows = tmp_path / "flows"
    shutil.copytree(ROOT / "workflows", flows)
    state = tmp_path / "state"
    result = subprocess.run(
        [sys.executable, "-m", "storyflow", "run", str(flows / "batch.yaml"),
         "--executor", cluster.address, "--no-progress"],
        cwd=tmp_path, env=cli_env(state), capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S * 2,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert f"dask {cluster.address}" in result.stdout + result.stderr
    workers: set[str] = set()
    for log in (state / "runs").glob("*/events.jsonl"):
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event["type"] == "step.succeeded" and event.get("worker"):
                workers.add(event["worker"])
    assert len(workers) == 2, "the batch's python and grammar steps spread over both workers"
    summary = next((state / "runs").glob("*/summary.md")).read_text()
    assert "succeeded, 0 failed" in summary


def test_steps_spread_over_worker_processes_never_the_coordinator(
    project: CliProject, cluster: Cluster
) -> None:
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: spread
        agents:
          keyed: {uses: python, secrets: [SF_TEST_TOKEN]}
        steps:
          items:
            for_each: [0, 1, 2, 3, 4, 5, 6, 7]
            uses: python
            with: {callable: "probe:where", name: "i{{ item }}", sleep: 0.2}
          keyed: {agent: keyed, with: {callable: "probe:where", name: keyed}}
          plain: {uses: python, with: {callable: "probe:where", name: plain}}
        outputs:
          pids: "{{ steps.items.output | map(attribute='pid') | list }}"
          keyed: "{{ steps.keyed.output.secret }}"
          plain: "{{ steps.plain.output.secret }}"
    """)
    secret = "s3cr3t-value-for-the-test"
    proc = launch(project, "run", wf, "--executor", cluster.address,
                  env={"SF_TEST_TOKEN": secret})
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, err
    outputs = events_of(out)[-1]["outputs"]
    pids = set(outputs["pids"])
    assert len(pids) == 2 and proc.pid not in pids
    assert outputs["keyed"] == ["SF_TEST_TOKEN"], "the declaring attempt gets its secret"
    assert outputs["plain"] == [], "no other attempt sees it"
    assert secret not in cluster.logs()


def test_a_sigkilled_worker_fails_the_attempt_as_worker_lost_and_it_runs_elsewhere(
    project: CliProject, tmp_path: Path
) -> None:
    own = Cluster(tmp_path / "own-cluster", workers=2, threads=1)
    try:
        gate = tmp_path / "gate"
        log = tmp_path / "exec.log"
        wf = project.write("wf.yaml", f"""\
            apiVersion: storyflow/v1
            name: lost
            defaults: {{retry: {{attempts: 3, delay: 0s}}}}
            steps:
              first: {{uses: python, with: {{callable: "probe:where", name: first,
                                               log: "{log}"}}}}
              held:
                needs: [first]
                uses: python
                with: {{callable: "probe:gated", name: held, gate: "{gate}", log: "{log}"}}
              others:
                needs: [first]
                for_each: [0, 1, 2]
                uses: python
                with: {{callable: "probe:where", name: "o{{{{ item }}}}", log: "{log}"}}
        """)
        proc = launch(project, "run", wf, "--executor", own.address)
        pid_file = Path(str(gate) + ".pid")
        wait_for_file(pid_file, proc)
        time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the worker process itself
        gate.write_text("open")  # the attempt that runs again passes straight through
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        events = events_of(out)
        for event in events:
            project._events.validate(event)
        lost = [e for e in events if e["type"] == "step.retrying" and e["step"] == "held"]
        assert len(lost) == 1
        assert lost[0]["error"]["class"] == "worker_lost"
        assert "died" in lost[0]["error"]["message"]
        runs = log.read_text().split("\n")
        assert runs.count("start held") == 2
        for name in ("first", "o0", "o1", "o2"):
            assert runs.count(f"start {name}") == 1, runs
    finally:
        own.close()


def test_kill_9_of_the_coordinator_then_resume_on_dask_reruns_only_the_attempt_in_flight(
    project: CliProject, tmp_path: Path, cluster: Cluster
) -> None:
    gate = tmp_path / "gate"
    log = tmp_path / "exec.log"
    wf = project.write("wf.yaml", f"""\
        apiVersion: storyflow/v1
        name: crash
        executor: {{dask: {{address: "{cluster.address}"}}}}
        steps:
          a: {{uses: python, with: {{callable: "probe:where", name: a, log: "{log}"}}}}
          b: {{uses: python, with: {{callable: "probe:where", name: b, log: "{log}"}}}}
          held:
            needs: [a, b]
            uses: python
            with: {{callable: "probe:gated", name: held, gate: "{gate}", log: "{log}"}}
          after: {{needs: [held], uses: command, with: {{run: ["echo", "done"]}}}}
    """)
    proc = launch(project, "run", wf)
    assert proc.stdout is not None
    run_id = json.loads(proc.stdout.readline())["run_id"]
    pid_file = Path(str(gate) + ".pid")
    wait_for_file(pid_file, proc)
    proc.kill()
    proc.communicate(timeout=CLI_TIMEOUT_S)  # reaped, its pipes closed
    gate.write_text("open")
    events = project.events("resume", run_id, "--executor", "dask")
    assert events[-1]["status"] == "succeeded"
    runs = log.read_text().split("\n")
    assert runs.count("start a") == 1 and runs.count("start b") == 1
    assert runs.count("start held") == 2, "only the attempt in flight ran again"
    ran = {e["step"] for e in events if e["type"] == "step.succeeded"}
    assert ran == {"held", "after"}


def test_a_pool_of_two_holds_across_four_workers(project: CliProject, tmp_path: Path) -> None:
    log = tmp_path / "window.log"
    wf = project.write("wf.yaml", f"""\
        apiVersion: storyflow/v1
        name: pooled
        executor: {{dask: {{workers: 4, threads: 1}}}}
        pools: {{tools: {{concurrency: 2}}}}
        steps:
          items:
            for_each: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
            uses: python
            pool: tools
            with: {{callable: "probe:window", name: "w{{{{ item }}}}", log: "{log}"}}
          free:
            for_each: [0, 1, 2, 3]
            uses: python
            with: {{callable: "probe:window", name: "f{{{{ item }}}}", log: "{log}.free",
                    sleep: 0.6}}
    """)
    events = project.events("run", wf, "--max-parallel", "16")
    assert events[0]["executor"]["workers"] and len(events[0]["executor"]["workers"]) == 4
    assert events[-1]["status"] == "succeeded"
    spans = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(spans) == 12
    edges = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    assert peak == 2, "never more than the pool's two at once, on four workers"
    free = [json.loads(line) for line in Path(f"{log}.free").read_text().splitlines()]
    assert len({s["pid"] for s in free + spans}) >= 3, "the cluster's workers took the work"


def test_a_timeout_kills_the_command_on_its_worker(
    project: CliProject, tmp_path: Path, cluster: Cluster
) -> None:
    pid_file = tmp_path / "sleeper.pid"
    wf = project.write("wf.yaml", f"""\
        apiVersion: storyflow/v1
        name: slow
        steps:
          slow:
            uses: command
            timeout: 1s
            with: {{run: "echo $$ > {pid_file}; exec sleep 60"}}
    """)
    events = project.events("run", wf, "--executor", cluster.address, code=1)
    failed = [e for e in events if e["type"] == "step.failed"]
    assert failed[0]["error"]["class"] == "timeout"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the command outlived its timeout"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def test_an_unreachable_scheduler_fails_the_run_clearly_and_it_stays_resumable(
    project: CliProject,
) -> None:
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: nowhere
        executor: {dask: {address: "tcp://127.0.0.1:9", connect_timeout: 1s}}
        steps:
          a: {uses: python, with: {callable: "probe:where", name: a}}
    """)
    result = project.cli("run", str(wf), "--no-progress")
    assert result.returncode == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    assert "storyflow resume" in result.stderr
    local = project.cli("resume", "--last", "--executor", "local", "--no-progress")
    assert local.returncode == 0, local.stderr


def test_a_missing_dask_extra_is_a_usage_error_with_the_install_command(
    project: CliProject, tmp_path: Path
) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "distributed.py").write_text(
        "raise ImportError(\"No module named 'distributed'\")\n", encoding="utf-8"
    )
    wf = project.write("wf.yaml", """\
        apiVersion: storyflow/v1
        name: extra
        steps:
          a: {uses: python, with: {callable: "probe:where", name: a}}
    """)
    result = project.cli("run", str(wf), "--executor", "dask",
                         env={"PYTHONPATH": f"{shadow}{os.pathsep}{ROOT / 'cli'}"})
    assert result.returncode == 2
    assert "pip install 'storyflow[dask]'" in result.stderr
    runs = project.cli("runs", "--json")
    assert json.loads(runs.stdout) == [], "no run was created"


def test_a_bad_executor_value_is_a_usage_error(project: CliProject) -> None:
    wf = project.write("wf.yaml", textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: bad
        steps:
          a: {uses: template, with: {template: x}}
    """))
    result = project.cli("run", str(wf), "--executor", "kubernetes")
    assert result.returncode == 2
    assert "--executor 'kubernetes'" in result.stderr


def test_llm_steps_run_on_workers_when_asked_and_the_call_cache_still_answers(
    project: CliProject, cluster: Cluster
) -> None:
    wf = project.write("wf.yaml", f"""\
        apiVersion: storyflow/v1
        name: llm-on-workers
        executor: {{dask: {{address: "{cluster.address}"}}, llm: workers}}
        config: {{prices: {{m: {{input: 1.0, output: 2.0}}}}}}
        agents:
          writer: {{uses: llm, with: {{model: m, temperature: 0}}, secrets: [OPENAI_API_KEY]}}
        steps:
          line: {{agent: writer, prompt: "One line about a lighthouse."}}
          shout: {{uses: template, with: {{template: "{{{{ steps.line.output | upper }}}}"}}}}
        outputs: {{shout: "{{{{ steps.shout.output }}}}"}}
    """)
    with FakeLLM() as server:
        env = {"STORYFLOW_LLM_BASE_URL": server.url, "OPENAI_API_KEY": "sk-test-dask-key-1"}
        first = project.events("run", wf, env=env)
        assert len(server.requests) == 1
        done = next(e for e in first if e["type"] == "step.succeeded" and e["step"] == "line")
        assert done["worker"].startswith("tcp://127.0.0.1:"), "the call ran on a worker"
        assert done["tokens"] == 15 and done["cost"] > 0, "usage reached the coordinator"
        assert first[-1]["outputs"] == {"shout": "HELLO"}
        second = project.events("run", wf, env=env)
        assert len(server.requests) == 1, "the cached reply answered without a dispatch"
        again = next(e for e in second if e["type"] == "step.succeeded" and e["step"] == "line")
        assert "worker" not in again
        assert second[-1]["outputs"] == {"shout": "HELLO"}
    assert "sk-test-dask-key-1" not in cluster.logs()


def test_a_scheduler_that_goes_away_fails_the_run_resumably(
    project: CliProject, tmp_path: Path
) -> None:
    own = Cluster(tmp_path / "doomed", workers=1, threads=2)
    try:
        gate = tmp_path / "gate"
        log = tmp_path / "exec.log"
        wf = project.write("wf.yaml", f"""\
            apiVersion: storyflow/v1
            name: doomed
            defaults: {{retry: {{attempts: 2, delay: 0s}}}}
            steps:
              a: {{uses: python, with: {{callable: "probe:where", name: a, log: "{log}"}}}}
              held:
                needs: [a]
                uses: python
                with: {{callable: "probe:gated", name: held, gate: "{gate}", log: "{log}"}}
        """)
        proc = launch(project, "run", wf, "--executor", own.address)
        pid_file = Path(str(gate) + ".pid")
        wait_for_file(pid_file, proc)
        os.killpg(own.scheduler.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        events = events_of(out)
        failed = [e for e in events if e["type"] == "step.failed" and e["step"] == "held"]
        assert failed, events
        assert failed[0]["error"]["class"] == "transient", failed[0]["error"]
        assert "scheduler" in failed[0]["error"]["message"]
        assert events[-1]["status"] == "failed"
    finally:
        own.close()
    gate.write_text("open")
    resumed = project.events("resume", "--last", "--executor", "local")
    assert resumed[-1]["status"] == "succeeded"
    runs = log.read_text().split("\n")
    assert runs.count("start a") == 1


def test_ctrl_c_cancels_the_command_on_its_worker_and_the_run_resumes(
    project: CliProject, tmp_path: Path, cluster: Cluster
) -> None:
    pid_file = tmp_path / "sleeper.pid"
    wf = project.write("wf.yaml", f"""\
        apiVersion: storyflow/v1
        name: interrupted
        steps:
          slow: {{uses: command, with: {{run: "echo $$ > {pid_file}; exec sleep 60"}}}}
    """)
    proc = launch(project, "run", wf, "--executor", cluster.address)
    pid = wait_for_file(pid_file, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert events_of(out)[-1]["status"] == "interrupted"
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the command outlived the interrupted run"
        time.sleep(0.05)
    pid_file.write_text("")
    wf.write_text(wf.read_text().replace("exec sleep 60", "echo done"))
    resumed = project.events("resume", "--last")
    assert resumed[-1]["status"] == "succeeded"


def test_a_worker_without_storyflow_is_named_in_a_clear_error(
    project: CliProject, tmp_path: Path
) -> None:
    fake = tmp_path / "fake"
    (fake / "storyflow").mkdir(parents=True)
    (fake / "storyflow" / "__init__.py").write_text("__version__ = '0.0.0'\n")
    own = Cluster(tmp_path / "bare", workers=1, worker_env={"PYTHONPATH": str(fake)})
    try:
        wf = project.write("wf.yaml", """\
            apiVersion: storyflow/v1
            name: bare
            steps:
              a: {uses: python, with: {callable: "probe:where", name: a}}
        """)
        result = project.cli("run", str(wf), "--executor", own.address, "--no-progress")
        assert result.returncode == 1
        worker = json.loads(own.file.read_text())["address"].rsplit(":", 1)[0]
        assert f"worker {worker}:" in result.stderr
        assert "cannot run storyflow" in result.stderr
        assert "install storyflow==" in result.stderr
    finally:
        own.close()
