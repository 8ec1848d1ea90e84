"""Where steps ran, as the user sees it (issue #11, "Seen by the user").

`show`, `report` and the run displays read a run whose step records carry
``meta["worker"]`` and whose events carry ``worker`` and ``executor``: the run is built
here through the store API, with known times. `doctor` is driven against a real
temporary Dask `LocalCluster` (no mock of Dask) and against a port nothing listens on.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from rich.console import Console

from conftest import SCHEMAS
from storyflow.engine.executors import setting
from storyflow.report import build_report, render_html, sections, to_document
from storyflow.store import EventLog, RunRecord, StepRecord, Store, read_events
from storyflow.ui.live import LiveSink
from storyflow.ui.plain import PlainSink
from storyflow.ui.tables import plain_text

Cli = Callable[..., Any]
T0 = 1_795_000_000.0
RUN = "20261123-101500-ab12cd"
LOCAL_RUN = "20261123-101600-cd34ef"
W1 = "tcp://127.0.0.1:38135"
W2 = "tcp://127.0.0.1:38933"
LOST = {"class": "worker_lost", "message": f"worker {W1} died while running the attempt"}
EXECUTOR = {"kind": "dask", "address": "tcp://127.0.0.1:8786", "cluster": "local",
            "workers": [W1, W2]}


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def ev(type_: str, at: float, step: str | None = None, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": type_, "run_id": RUN, "ts": T0 + at, **fields}
    if step is not None:
        event["step"] = step
    return event


def record(sid: str, status: str, start: float | None, end: float | None, *,
           attempts: int = 1, worker: str | None = None, **meta: Any) -> StepRecord:
    if worker is not None:
        meta["worker"] = worker
    return StepRecord(
        id=sid, status=status, attempts=attempts,
        ready_at=None if start is None else T0 + min(start, 1.0),
        started_at=None if start is None else T0 + start,
        ended_at=None if end is None else T0 + end, meta=meta,
    )


# items[0] ran on W1, items[1] on W2; items[2] was lost with W2, retried on W1 and lost
# with it too; title is a template step (the storyflow process); coda never ran.
RECORDS = [
    record("title", "succeeded", 0.0, 0.1),
    record("items", "failed", 1.0, 2.25, attempts=0, items=3),
    record("items[0]", "succeeded", 1.0, 1.3, worker=W1),
    record("items[1]", "succeeded", 1.0, 1.5, worker=W2),
    record("items[2]", "failed", 2.0, 2.25, attempts=2, worker=W1),
]
RECORDS[-1].error = dict(LOST)
EVENTS = [
    ev("run.started", 0.0, workflow="spread", steps=3, inputs={}, executor=EXECUTOR),
    ev("step.started", 0.0, "title", attempt=1),
    ev("step.succeeded", 0.1, "title", attempt=1, duration_s=0.1),
    ev("step.started", 1.0, "items[0]", attempt=1),
    ev("step.started", 1.0, "items[1]", attempt=1),
    ev("step.started", 1.0, "items[2]", attempt=1),
    ev("step.succeeded", 1.3, "items[0]", attempt=1, duration_s=0.3, worker=W1),
    ev("step.succeeded", 1.5, "items[1]", attempt=1, duration_s=0.5, worker=W2),
    ev("step.retrying", 1.5, "items[2]", attempt=1, delay_s=0.5,
       error={**LOST, "message": f"worker {W2} died while running the attempt"}, worker=W2),
    ev("step.started", 2.0, "items[2]", attempt=2),
    ev("step.failed", 2.25, "items[2]", attempt=2, error=LOST, final=True, duration_s=0.25,
       worker=W1),
    ev("run.failed", 2.5, status="failed", duration_s=2.5,
       error={"class": "worker_lost", "message": "step items[2] failed"}),
]


@pytest.fixture
def runs(state_dir: Path) -> Path:
    """A store holding a failed run on two workers (`RUN`) and a local run (`LOCAL_RUN`)."""
    with Store(state_dir) as s:
        for run_id, steps in ((RUN, ["title", "items", "coda"]), (LOCAL_RUN, ["title"])):
            s.put_run(RunRecord(
                run_id=run_id, workflow="spread", workflow_path="/gone/spread.yaml",
                workflow_version=None, source_hash="x", status="failed", inputs={},
                environment=None, sets=[], created_at=T0, updated_at=T0 + 2.5,
                ended_at=T0 + 2.5, meta={"steps": steps},
            ))
        s.put_steps(RUN, RECORDS)
        s.put_steps(LOCAL_RUN, RECORDS[:1])
        log = EventLog(s.run_dir(RUN) / "events.jsonl")
        for event in EVENTS:
            log.write(event)
        log.close()
    return state_dir


# -- show ------------------------------------------------------------------------------------


def test_show_names_the_worker_of_each_step(cli: Cli, runs: Path) -> None:
    text = cli("show", RUN)
    assert text.returncode == 0, text.stderr
    table = text.stdout.splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("STEP"))
    assert table[start:start + 7] == [
        "STEP      STATUS     ATTEMPTS  DURATION  WORKER           NOTE",
        "title     succeeded  1         0.1s      -",
        "items     failed     0         1.2s      -",
        "items[0]  succeeded  1         0.3s      127.0.0.1:38135",
        "items[1]  succeeded  1         0.5s      127.0.0.1:38933",
        "items[2]  failed     2         0.2s      127.0.0.1:38135  "
        f"worker_lost: worker {W1} died while running the attem",  # notes stop at 70
        "coda      pending    0         -         -",
    ]

    doc = json.loads(cli("show", RUN, "--json").stdout)
    _validator("show").validate(doc)
    workers = {s["id"]: s.get("worker") for s in doc["steps"]}
    assert workers == {"title": None, "items": None, "items[0]": W1, "items[1]": W2,
                       "items[2]": W1, "coda": None}
    assert "worker" not in doc["steps"][0], "absent, not null, for a local step"

    one = cli("show", RUN, "--step", "items[1]")
    assert one.stdout.splitlines()[0] == (
        f"step items[1]: succeeded · 1 attempt(s) · 0.5s · on worker {W2}"
    )
    assert json.loads(cli("show", RUN, "--step", "items[1]", "--json").stdout)["worker"] == W2


def test_show_of_a_local_run_has_no_worker_column(cli: Cli, runs: Path) -> None:
    text = cli("show", LOCAL_RUN)
    assert text.returncode == 0, text.stderr
    assert "WORKER" not in text.stdout
    assert "STEP   STATUS     ATTEMPTS  DURATION  NOTE" in text.stdout.splitlines()


# -- report ----------------------------------------------------------------------------------


def _report(store: Store, run_id: str = RUN) -> Any:
    from storyflow.store import instance_records

    run = store.get_run(run_id)
    assert run is not None
    ids, records = instance_records(store, run)
    log = store.run_dir(run_id) / "events.jsonl"
    events = list(read_events(log)) if log.exists() else []
    return build_report(run, records, events, now=T0 + 99, order=ids)


def test_report_per_worker_steps_busy_time_and_failures(runs: Path) -> None:
    with Store(runs) as store:
        report = _report(store)
        local = _report(store, LOCAL_RUN)
    doc = to_document(report)
    _validator("report").validate(doc)
    assert doc["workers"] == [
        {"worker": W1, "steps": 2, "busy_s": 0.55, "failed": 1, "worker_lost": 1},
        {"worker": W2, "steps": 1, "busy_s": 0.5, "failed": 0, "worker_lost": 1},
    ]
    by_id = {s["id"]: s for s in doc["steps"]}
    assert by_id["items[0]"]["worker"] == W1
    assert "worker" not in by_id["title"]

    text = plain_text(sections(report)).split("\n\n")
    assert text[-1].splitlines() == [
        "workers",
        "WORKER           STEPS   BUSY  FAILURES",
        "127.0.0.1:38135      2  550ms  failed×1, worker_lost×1",
        "127.0.0.1:38933      1  500ms  worker_lost×1",
        "busy = the steps' latest attempts on the worker, summed",
    ]
    steps_table = next(block for block in text if block.startswith("steps\n"))
    assert steps_table.splitlines()[1].endswith("COST  WORKER")
    assert steps_table.splitlines()[5].startswith("items[1] ")
    assert steps_table.splitlines()[5].endswith("127.0.0.1:38933")

    html = render_html(report)
    assert "<h3>Workers</h3>" in html
    assert "<td>tcp:&#47;&#47;127.0.0.1:38135</td><td class=n>2</td>" in html
    assert "<th>worker</th><th>error</th>" in html
    assert "<td>127.0.0.1:38933</td>" in html  # the instance row names its worker
    assert "succeeded on 127.0.0.1:38135" in html  # the timeline's bar says it too

    assert local.workers == ()
    assert to_document(local)["workers"] == []
    assert "workers" not in plain_text(sections(local)).split("\n\n")[-1]
    assert "Workers" not in render_html(local) and "<th>worker</th>" not in render_html(local)


def test_report_command_shows_the_workers(cli: Cli, runs: Path) -> None:
    result = cli("report", RUN, "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    _validator("report").validate(doc)
    assert [(w["worker"], w["steps"], w["worker_lost"]) for w in doc["workers"]] == [
        (W1, 2, 1), (W2, 1, 1)
    ]
    table = cli("report", RUN)
    assert "127.0.0.1:38135      2  550ms  failed×1, worker_lost×1" in table.stdout


# -- the run displays ------------------------------------------------------------------------


def test_plain_lines_name_the_cluster_and_the_workers() -> None:
    out = io.StringIO()
    sink = PlainSink(out, clock_start=T0)
    note = ("the scheduler re-runs an attempt whose worker died up to 3 times before "
            "storyflow sees worker_lost; start it with DASK_DISTRIBUTED__SCHEDULER__"
            "ALLOWED_FAILURES=0 to let retry policies decide")
    external = {"kind": "dask", "address": "tcp://10.0.0.5:8786", "cluster": "external",
                "workers": [f"tcp://10.0.0.{i}:4000" for i in range(10, 20)], "note": note}
    for event in [*EVENTS[:3], *EVENTS[6:11], ev("run.resumed", 3.0, workflow="spread",
                                                   steps=3, executor=external)]:
        sink(event)
    assert out.getvalue().splitlines() == [
        f"00:00.0 run.started spread (3 steps) run {RUN}",
        "00:00.0 executor: dask tcp://127.0.0.1:8786 (local cluster) · 2 workers: "
        "127.0.0.1:38135, 127.0.0.1:38933",
        "00:00.0 ▶ title attempt 1",
        "00:00.1 ✓ title 0.1s",
        "00:01.3 ✓ items[0] 0.3s on 127.0.0.1:38135",
        "00:01.5 ✓ items[1] 0.5s on 127.0.0.1:38933",
        "00:01.5 ↻ items[2] retry in 0.5s (worker_lost on 127.0.0.1:38933)",
        "00:02.0 ▶ items[2] attempt 2",
        "00:02.2 ✗ items[2] attempt 2 on 127.0.0.1:38135: worker_lost: worker "
        f"{W1} died while running the attempt",
        f"00:03.0 run.resumed spread (3 steps) run {RUN}",
        "00:03.0 executor: dask tcp://10.0.0.5:8786 (external scheduler) · 10 workers: "
        + ", ".join(f"10.0.0.{i}:4000" for i in range(10, 18)) + ", … and 2 more",
        f"00:03.0 executor note: {note}",
    ]


def test_plain_lines_of_a_local_run_are_unchanged() -> None:
    out = io.StringIO()
    sink = PlainSink(out, clock_start=T0)
    sink(ev("run.started", 0.0, workflow="w", steps=1))
    sink(ev("run.started", 0.0, workflow="w", steps=1, executor={"kind": "local"}))
    sink(ev("run.started", 0.0, workflow="w", steps=1, executor="odd"))
    sink(ev("step.succeeded", 0.5, "a", attempt=1, duration_s=0.5))
    sink(ev("step.retrying", 0.5, "b", attempt=1, delay_s=1.0, error=LOST))
    assert out.getvalue().splitlines() == [f"00:00.0 run.started w (1 step) run {RUN}"] * 3 + [
        "00:00.5 ✓ a 0.5s",
        "00:00.5 ↻ b retry in 1.0s",
    ]


def test_logs_of_a_cluster_run_name_its_workers(cli: Cli, runs: Path) -> None:
    lines = cli("logs", RUN).stdout.splitlines()
    assert lines[1].startswith("00:00.0 executor: dask tcp://127.0.0.1:8786 (local cluster)")
    assert "00:01.3 ✓ items[0] 0.3s on 127.0.0.1:38135" in lines


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _console() -> Console:
    return Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)


def _rendered(sink: LiveSink) -> list[str]:
    console = _console()
    console.print(sink.render())
    return [line.rstrip() for line in console.file.getvalue().splitlines()]  # type: ignore[attr-defined]


def test_live_view_names_the_cluster_and_counts_each_workers_steps() -> None:
    clock = FakeClock()
    sink = LiveSink(_console(), clock=clock, refresh_per_second=0.01)
    try:
        sink(EVENTS[0])
        sink(ev("step.started", 1.0, "items[2]", attempt=1))
        for event in EVENTS[6:9]:
            sink(event)
        clock.now += 0.2
        assert _rendered(sink) == [
            f"spread · run {RUN} · 0.2s · running",
            "executor: dask tcp://127.0.0.1:8786 (local cluster)",
            "2 workers: 127.0.0.1:38135 ✓1, 127.0.0.1:38933 ✓1",
            "━" * 45 + " " * 24 + "steps 0/3 · instances 2/3 (66%)",
            "instances: retrying 1 · succeeded 2",
            "step      status    attempt           time",
            "items[2]  retrying        1  retry in 0.3s  worker_lost on 127.0.0.1:38933",
        ]
        sink(EVENTS[10])
        lines = _rendered(sink)
        assert lines[2] == "2 workers: 127.0.0.1:38135 ✓1 ✗1, 127.0.0.1:38933 ✓1"
        assert lines[-1] == (  # cut to the console's 100 columns
            f"✗ items[2] on 127.0.0.1:38135  worker_lost: worker {W1} died while running the "
            "att…"
        )
    finally:
        sink.close()


def test_live_view_of_a_big_cluster_stays_bounded() -> None:
    sink = LiveSink(_console(), clock=FakeClock(), refresh_per_second=0.01)
    calls = 0
    render = sink.render

    def counting_render() -> Any:
        nonlocal calls
        calls += 1
        return render()

    sink.render = counting_render  # type: ignore[method-assign]
    workers = [f"tcp://10.0.{i // 250}.{i % 250}:4000" for i in range(500)]
    note = "the scheduler re-runs an attempt whose worker died"
    try:
        sink(ev("run.started", 0.0, workflow="big", steps=5000,
                executor={**EXECUTOR, "cluster": "external", "workers": workers,
                          "note": note}))
        for i in range(5000):
            sink(ev("step.succeeded", 1.0, f"s[{i}]", attempt=1, worker=workers[i % 500]))
        assert calls == 1, "events never draw"
        lines = _rendered(sink)
        assert lines[1] == "executor: dask tcp://127.0.0.1:8786 (external scheduler)"
        named = ", ".join(f"10.0.0.{i}:4000 ✓10" for i in range(8))
        assert " ".join(lines[2:4]) == f"500 workers: {named}, … and 492 more"
        assert lines[4] == f"executor note: {note}"
    finally:
        sink.close()


# -- doctor ----------------------------------------------------------------------------------

MODULE = "def fn(x=1):\n    return x\n"
DOCTOR_WORKFLOW = """\
apiVersion: storyflow/v1
name: spread
executor: {dask: {workers: 2, connect_timeout: 2s}}
steps:
  ok: {uses: python, with: {callable: "mod:fn"}}
  missing: {uses: python, with: {callable: "mod:missing"}}
  again: {uses: python, with: {callable: "mod:fn", x: 2}}
"""


@pytest.fixture
def doctor_file(tmp_path: Path) -> Path:
    (tmp_path / "mod.py").write_text(MODULE, encoding="utf-8")
    path = tmp_path / "spread.yaml"
    path.write_text(DOCTOR_WORKFLOW, encoding="utf-8")
    return path


def _checks(stdout: str) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in json.loads(stdout)}


def test_doctor_checks_a_local_dask_cluster(cli: Cli, doctor_file: Path) -> None:
    pytest.importorskip("distributed")
    result = cli("doctor", doctor_file, "--executor", "dask", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    checks = _checks(result.stdout)
    executor = checks["executor"]
    assert executor["status"] == "ok"
    assert executor["detail"].startswith("a temporary local cluster at tcp://127.0.0.1:")
    workers = checks["executor: workers"]
    assert workers["status"] == "ok" and workers["detail"].startswith("2 workers: 127.0.0.1:")
    assert checks["executor: storyflow version"]["status"] == "ok"
    assert checks["executor: imports mod:fn"] == {
        "check": "executor: imports mod:fn", "status": "ok",
        "detail": "imports on all 2 workers", "fix": "",
    }
    missing = checks["executor: imports mod:missing"]
    assert missing["status"] == "fail"
    assert missing["detail"].startswith(
        "does not import on 2 of 2 workers: module 'mod' has no attribute 'missing' (127.0.0.1:"
    )
    assert "installed in every worker's environment" in missing["fix"]
    assert "executor: lost workers" not in checks  # a temporary cluster never re-runs


def test_doctor_says_why_a_scheduler_cannot_be_reached(cli: Cli, doctor_file: Path) -> None:
    pytest.importorskip("distributed")
    result = cli("doctor", doctor_file, "--executor", "tcp://127.0.0.1:9")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("executor "))
    assert row.split()[1] == "fail"
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in row
    assert "dask worker tcp://127.0.0.1:9" in row  # the fix
    assert "executor: workers" not in result.stdout


def test_doctor_without_the_dask_extra_says_how_to_install_it(
    cli: Cli, doctor_file: Path, tmp_path: Path
) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "distributed.py").write_text("raise ImportError('no distributed here')\n")
    cli_dir = Path(__file__).resolve().parents[1] / "cli"
    result = cli("doctor", doctor_file, "--json",
                 env={"PYTHONPATH": f"{shadow}{os.pathsep}{cli_dir}"})
    assert result.returncode == 1
    row = _checks(result.stdout)["executor"]
    assert row["status"] == "fail" and row["fix"] == "pip install 'storyflow[dask]'"


def test_doctor_rejects_a_bad_executor_and_skips_a_local_one(
    cli: Cli, doctor_file: Path
) -> None:
    bad = cli("doctor", doctor_file, "--executor", "kubernetes")
    assert bad.returncode == 2
    assert "--executor 'kubernetes'" in bad.stderr
    local = cli("doctor", doctor_file, "--executor", "local", "--json")
    assert not [c for c in json.loads(local.stdout) if c["check"].startswith("executor")]


def test_doctor_lines_from_what_a_cluster_answered() -> None:
    """The verdicts on probe results no test cluster gives: mismatched versions, a worker
    that cannot run storyflow, no workers, an external scheduler's note."""
    from storyflow import __version__
    from storyflow.doctor._executor import _usable

    chosen = setting(None, "tcp://10.0.0.5:8786")
    info = {"storyflow": __version__, "python": "3.11.7", "host": "h", "pid": 1}
    found = {
        "address": "tcp://10.0.0.5:8786",
        "workers": {W1: info, W2: {**info, "storyflow": "0.0.1"},
                    "tcp://127.0.0.1:4000": "ModuleNotFoundError: No module named 'storyflow'"},
        "imports": {"mod:fn": {W1: None, W2: None, "tcp://127.0.0.1:4000": "gone"}},
        "note": "the scheduler re-runs an attempt whose worker died up to 3 times before "
                "storyflow sees worker_lost; start it with X=0 to let retry policies decide",
    }
    checks = {c.check: c for c in _usable(chosen, found, ["mod:fn", "mod:other"])}
    assert checks["executor"].detail == "the scheduler at tcp://10.0.0.5:8786 answers"
    assert checks["executor: workers"].detail.startswith("3 workers: 127.0.0.1:38135, ")
    version = checks["executor: storyflow version"]
    assert version.status == "fail"
    assert version.detail == (
        "127.0.0.1:4000: ModuleNotFoundError: No module named 'storyflow'; "
        f"127.0.0.1:38933 runs storyflow 0.0.1 (this is storyflow {__version__})"
    )
    assert f"storyflow=={__version__}" in version.fix
    lost = checks["executor: lost workers"]
    assert lost.status == "warn"
    assert lost.fix == "start the scheduler with X=0 to let retry policies decide"
    assert checks["executor: imports mod:fn"].detail == (
        "does not import on 1 of 3 workers: gone (127.0.0.1:4000)"
    )
    assert checks["executor: imports mod:other"].status == "warn"

    empty = _usable(chosen, {"address": "tcp://10.0.0.5:8786", "workers": {}, "imports": {}},
                    ["mod:fn"])
    assert [(c.check, c.status) for c in empty] == [
        ("executor", "ok"), ("executor: workers", "warn")
    ]
    assert empty[1].fix == "start workers with `dask worker tcp://10.0.0.5:8786`"
