"""`storyflow report`: the pure computation on made-up timings, then the real command.

The critical path, waits, retries and per-agent latencies are checked on records and
events built here with known times (no clock, no sleep). The command is driven in
subprocesses: its JSON is validated against ``schemas/report.schema.json``, its JUnit
parsed with ``xml.etree``, its HTML searched for anything external.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import SCHEMAS
from storyflow.report import (
    build_report,
    percentile,
    render_html,
    render_junit,
    to_document,
)
from storyflow.store import RunRecord, StepRecord

Cli = Callable[..., Any]
T0 = 1_700_000_000.0


def _schema() -> dict[str, Any]:
    with (SCHEMAS / "report.schema.json").open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


REPORT_SCHEMA = _schema()
VALIDATOR = jsonschema.Draft202012Validator(REPORT_SCHEMA)


# --- made-up runs -------------------------------------------------------------------------


def run_record(ended: float, status: str = "succeeded") -> RunRecord:
    return RunRecord(
        run_id="20231114-221320-abcdef", workflow="diamond", workflow_path="/gone.yaml",
        workflow_version="1", source_hash="x", status=status, inputs={}, environment=None,
        sets=[], created_at=T0, updated_at=T0 + ended, ended_at=T0 + ended,
    )


def step(sid: str, ready: float, start: float, end: float, *, agent: str | None = None,
         status: str = "succeeded", attempts: int = 1, **meta: Any) -> StepRecord:
    return StepRecord(
        id=sid, status=status, attempts=attempts, ready_at=T0 + ready, started_at=T0 + start,
        ended_at=T0 + end, agent=agent, meta=meta,
    )


def ev(type_: str, at: float, step_id: str | None = None, **fields: Any) -> dict[str, Any]:
    event = {"type": type_, "run_id": "r", "ts": T0 + at, **fields}
    if step_id is not None:
        event["step"] = step_id
    return event


def attempt(sid: str, start: float, end: float, n: int = 1) -> list[dict[str, Any]]:
    return [
        ev("step.started", start, sid, attempt=n),
        ev("step.succeeded", end, sid, attempt=n, duration_s=end - start),
    ]


def diamond() -> tuple[RunRecord, dict[str, StepRecord], list[dict[str, Any]]]:
    """a → (b, c) → d. c waits 0.5s for a slot, fails once (transient, 0.5s backoff)."""
    records = {
        "a": step("a", 0.0, 0.0, 1.0, agent="fast"),
        "b": step("b", 1.0, 1.0, 2.0, agent="fast"),
        "c": step("c", 1.0, 2.5, 4.0, agent="slow", attempts=2, queued="max_parallel",
                  usage={"input_tokens": 100, "output_tokens": 50, "cost": 0.25, "calls": 2}),
        "d": step("d", 4.0, 4.0, 5.0, agent="fast"),
    }
    events = [
        ev("run.started", 0.0, workflow="diamond", steps=4, inputs={}, workflow_version="1"),
        *attempt("a", 0.0, 1.0),
        *attempt("b", 1.0, 2.0),
        ev("step.started", 1.5, "c", attempt=1),
        ev("step.retrying", 2.0, "c", attempt=1, delay_s=0.5,
           error={"class": "transient", "message": "503"}),
        ev("breaker.opened", 2.0, agent="slow", failures=1, trial=False, cooldown_s=1),
        *attempt("c", 2.5, 4.0, n=2),
        *attempt("d", 4.0, 5.0),
        ev("run.succeeded", 5.0, status="succeeded", duration_s=5.0),
    ]
    return run_record(5.0), records, events


DIAMOND_DEPS = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


@pytest.mark.parametrize("deps", [DIAMOND_DEPS, None], ids=["plan", "timings"])
def test_critical_path_of_a_diamond_goes_through_the_slower_branch(
    deps: dict[str, list[str]] | None,
) -> None:
    run, records, events = diamond()
    report = build_report(run, records, events, now=T0 + 99, order=["a", "b", "c", "d"],
                          deps=deps)
    path = report.critical_path
    assert [e.id for e in path.entries] == ["a", "c", "d"]
    assert path.source == ("plan" if deps else "timings")
    assert report.wall_s == pytest.approx(5.0)
    shares = [round(report.share_pct(e.segment_s), 6) for e in path.entries]
    assert shares == [20.0, 60.0, 20.0]
    c = path.entries[1]
    assert (c.gap_s, c.wait_s, c.retry_s, c.run_s) == pytest.approx((0.0, 0.5, 1.0, 1.5))
    assert path.wait_s == pytest.approx(0.5)
    assert path.retry_s == pytest.approx(1.0)
    assert path.tail_s == pytest.approx(0.0)

    doc = to_document(report)
    VALIDATOR.validate(doc)
    bottlenecks = doc["critical_path"]["bottlenecks"]
    assert bottlenecks == {"wait_s": 0.5, "wait_share_pct": 10.0, "retry_s": 1.0,
                           "retry_share_pct": 20.0, "latency_s": 0.0, "latency_share_pct": 0.0,
                           "wait_by_limit": {"max_parallel": 0.5},
                           "advice": [bottlenecks["advice"][0], bottlenecks["advice"][1]]}
    assert bottlenecks["advice"][0].startswith("retries 1.0s (20.0%)")
    assert bottlenecks["advice"][1].startswith("raise --max-parallel: it was full")
    assert [e["share_pct"] for e in doc["critical_path"]["instances"]] == [20.0, 60.0, 20.0]


def test_instances_and_agents_from_records_and_events() -> None:
    run, records, events = diamond()
    doc = to_document(build_report(run, records, events, now=T0 + 99, order=list(records)))
    c = next(s for s in doc["steps"] if s["id"] == "c")
    assert c["wait_s"] == 0.5
    assert c["retry_s"] == 1.0
    assert c["run_s"] == 1.5
    assert c["duration_s"] == 2.5
    assert c["retries"] == {"transient": 1}
    assert (c["tokens"], c["cost"], c["model_calls"]) == (150, 0.25, 2)
    a = next(s for s in doc["steps"] if s["id"] == "a")
    assert (a["tokens"], a["cost"]) == (0, 0.0)  # no usage recorded: zero, not an error

    agents = {x["agent"]: x for x in doc["agents"]}
    assert agents["slow"]["calls"] == 2
    assert agents["slow"]["failures"] == {"transient": 1}
    assert agents["slow"]["breaker_openings"] == 1
    assert agents["slow"]["p50_s"] == 1.0  # attempts took 0.5s and 1.5s
    assert agents["slow"]["p95_s"] == pytest.approx(1.45)
    assert agents["fast"]["calls"] == 3
    assert agents["fast"]["p95_s"] == 1.0
    totals = doc["totals"]
    assert (totals["attempts"], totals["retries"], totals["tokens"]) == (5, 1, 150)
    assert totals["steps"] == {"succeeded": 4}


def test_map_items_belong_to_their_map_and_chain_when_bounded() -> None:
    """plan → draft (3 items, one at a time) → end: the path runs through every item."""
    records = {
        "plan": step("plan", 0.0, 0.0, 1.0, agent="w"),
        "draft": step("draft", 1.0, 1.0, 4.0, items=3),
        "draft[0]": step("draft[0]", 1.0, 1.0, 2.0, agent="w"),
        "draft[1]": step("draft[1]", 2.0, 2.0, 3.0, agent="w"),
        "draft[2]": step("draft[2]", 3.0, 3.0, 4.0, agent="w"),
        "side": step("side", 0.0, 0.0, 3.5, agent="w"),
        "end": step("end", 4.0, 4.0, 4.5, agent="w"),
    }
    events = [e for sid, r in records.items() if sid != "draft"
              for e in attempt(sid, (r.started_at or 0) - T0, (r.ended_at or 0) - T0)]
    deps = {"plan": [], "draft": ["plan"], "side": [], "end": ["draft", "side"]}
    for plan_deps in (deps, None):
        report = build_report(run_record(4.5), records, events, now=T0, deps=plan_deps,
                              order=list(records))
        ids = [e.id for e in report.critical_path.entries]
        assert ids == ["plan", "draft[0]", "draft[1]", "draft[2]", "end"]
    kinds = {i.id: i.kind for i in report.instances}
    assert kinds["draft"] == "map" and kinds["draft[1]"] == "task"
    assert {a.agent: a.calls for a in report.agents} == {"w": 6}  # the map itself calls none


def test_loop_iterations_follow_each_other() -> None:
    records = {
        "polish": step("polish", 0.0, 0.0, 4.0, iterations=2, body=["critique", "revise"]),
        "polish#1.critique": step("polish#1.critique", 0.0, 0.0, 1.0, agent="e"),
        "polish#1.revise": step("polish#1.revise", 1.0, 1.0, 2.0, agent="w"),
        "polish#2.critique": step("polish#2.critique", 2.0, 2.0, 3.0, agent="e"),
        "polish#2.revise": step("polish#2.revise", 3.0, 3.0, 4.0, agent="w"),
    }
    deps = {"polish": [], "polish#1.critique": [], "polish#1.revise": ["polish#1.critique"],
            "polish#2.revise": ["polish#2.critique"]}
    report = build_report(run_record(4.0), records, [], now=T0, deps=deps, order=list(records))
    assert [e.id for e in report.critical_path.entries] == [
        "polish#1.critique", "polish#1.revise", "polish#2.critique", "polish#2.revise"]
    assert {i.id: i.step for i in report.instances}["polish#2.revise"] == "polish"


def test_fallback_attempts_are_credited_to_each_agent() -> None:
    records = {"s": StepRecord(id="s", status="succeeded", attempts=2, ready_at=T0,
                               started_at=T0 + 1, ended_at=T0 + 3, agent="backup",
                               degraded=True)}
    events = [
        ev("step.started", 0.0, "s", attempt=1),
        ev("step.fallback", 1.0, "s", attempt=1, agent="primary", fallback="backup",
           error={"class": "timeout", "message": "slow"}),
        ev("step.started", 1.0, "s", attempt=2, agent="backup", degraded=True),
        ev("step.succeeded", 3.0, "s", attempt=2, duration_s=2.0, agent="backup",
           degraded=True),
    ]
    report = build_report(run_record(3.0), records, events, now=T0)
    agents = {a.agent: a for a in report.agents}
    assert agents["primary"].calls == 1 and agents["primary"].failures == {"timeout": 1}
    assert agents["backup"].calls == 1 and agents["backup"].latencies_s == (2.0,)
    assert report.instances[0].agent == "backup" and report.instances[0].degraded


def test_percentile_interpolates() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


def test_html_and_junit_escape_what_they_show() -> None:
    run, records, events = diamond()
    records["b"] = step("b", 1.0, 1.0, 2.0, status="failed",
                        agent="<script>alert(1)</script>")
    records["b"].error = {"class": "permanent", "message": "see https://evil.example/x & \x00"}
    report = build_report(run, records, events, now=T0, order=list(records))
    page = render_html(report)
    assert "<script" not in page and "https://" not in page and "http://" not in page
    assert "&lt;script&gt;" in page
    suite = ET.fromstring(render_junit(report))
    failure = suite.find("testcase[@name='b']/failure")
    assert failure is not None and failure.get("type") == "permanent"


def _walk(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return
    yield path, node
    for kw in ("properties", "$defs"):
        for key, sub in node.get(kw, {}).items():
            yield from _walk(sub, f"{path}/{kw}/{key}")
    for kw in ("additionalProperties", "items", "propertyNames"):
        if isinstance(node.get(kw), dict):
            yield from _walk(node[kw], f"{path}/{kw}")


def test_report_schema_is_draft_2020_12_and_documented() -> None:
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    assert REPORT_SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    nodes = list(_walk(REPORT_SCHEMA))
    assert len(nodes) > 60
    assert [p for p, n in nodes if not str(n.get("description", "")).strip()] == []


# --- the real command ---------------------------------------------------------------------

AGENTS = '''\
import time


def work(me, pause=0.0):
    time.sleep(pause)
    return me


def broken(me):
    raise ValueError(f"{me} broke, see http://example.invalid/help")
'''

DIAMOND = """\
apiVersion: storyflow/v1
name: diamond
steps:
  a: {uses: python, with: {callable: "agents:work", me: a}}
  b: {uses: python, with: {callable: "agents:work", me: "{{ steps.a.output }}b"}}
  c: {uses: python, with: {callable: "agents:work", me: "{{ steps.a.output }}c", pause: 0.4}}
  d:
    uses: python
    with: {callable: "agents:work", me: "{{ steps.b.output }}{{ steps.c.output }}"}
"""

MAPPED = """\
apiVersion: storyflow/v1
name: mapped
agents:
  worker: {uses: python, with: {callable: "agents:work"}}
steps:
  items: {uses: template, with: {template: "{{ ['x', 'y', 'z'] }}"}}
  draft:
    for_each: steps.items.output
    as: item
    agent: worker
    with: {me: "{{ item }}"}
  flaky: {uses: python, with: {callable: "agents:broken", me: f}, allow_failure: true}
  end: {uses: template, with: {template: "{{ steps.draft.output | join(',') }}"}}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "agents.py").write_text(AGENTS, encoding="utf-8")
    return tmp_path


def _run(cli: Cli, path: Path) -> str:
    result = cli("run", path, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    run_id: str = summary["run_id"]
    return run_id


def test_report_json_of_a_real_run(cli: Cli, folder: Path) -> None:
    path = folder / "diamond.yaml"
    path.write_text(DIAMOND, encoding="utf-8")
    run_id = _run(cli, path)
    result = cli("report", run_id[:12], "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    VALIDATOR.validate(doc)
    assert doc["run_id"] == run_id and doc["status"] == "succeeded"
    path_doc = doc["critical_path"]
    assert path_doc["source"] == "plan"
    assert [e["id"] for e in path_doc["instances"]] == ["a", "c", "d"]
    c = next(e for e in path_doc["instances"] if e["id"] == "c")
    assert c["run_s"] >= 0.4
    assert c["share_pct"] > 50
    assert sum(e["segment_s"] for e in path_doc["instances"]) + path_doc["tail_s"] == (
        pytest.approx(doc["wall_s"], abs=1e-4)
    )
    assert {a["agent"]: a["calls"] for a in doc["agents"]} == {"python": 4}

    table = cli("report", "--last")
    assert table.returncode == 0, table.stderr
    assert "critical path" in table.stdout and "\x1b[" not in table.stdout


def test_junit_and_html_of_a_run_with_a_map_and_an_allowed_failure(
    cli: Cli, folder: Path, tmp_path: Path
) -> None:
    path = folder / "mapped.yaml"
    path.write_text(MAPPED, encoding="utf-8")
    run_id = _run(cli, path)
    doc = json.loads(cli("report", run_id, "--format", "json").stdout)
    ids = [s["id"] for s in doc["steps"]]
    assert {"draft", "draft[0]", "draft[1]", "draft[2]", "flaky"} <= set(ids)

    out = tmp_path / "junit.xml"
    result = cli("report", run_id, "--format", "junit", "-o", out)
    assert result.returncode == 0, result.stderr
    suite = ET.parse(out).getroot()
    assert suite.tag == "testsuite" and suite.get("name") == "mapped"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ids
    assert {c.get("classname") for c in cases} == {"mapped"}
    assert suite.get("tests") == str(len(ids)) and suite.get("failures") == "1"
    failure = suite.find("testcase[@name='flaky']/failure")
    assert failure is not None and failure.get("type") == "permanent"
    assert "f broke" in (failure.get("message") or "")
    assert all(float(c.get("time") or "x") >= 0 for c in cases)

    page = cli("report", run_id, "--format", "html").stdout
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    for external in ("http://", "https://", "src=", "<link", "<script"):
        assert external not in page, external
    assert "draft[2]" in page
    assert "f broke, see http:&#47;&#47;example.invalid" in page


PRICED = """\
apiVersion: storyflow/v1
name: priced
config:
  prices: {tiny: {input: 1000, output: 2000}}
agents:
  writer: {uses: llm, with: {model: tiny, base_url: "@URL@"}}
steps:
  one: {agent: writer, prompt: "Say hello"}
  two: {agent: writer, prompt: "Again: {{ steps.one.output }}"}
  glue: {uses: template, with: {template: "{{ steps.two.output }}"}}
"""


def test_tokens_and_cost_of_llm_steps(cli: Cli, tmp_path: Path) -> None:
    from llm_server import FakeLLM

    path = tmp_path / "priced.yaml"
    with FakeLLM() as server:  # every reply reports 10 prompt and 5 completion tokens
        path.write_text(PRICED.replace("@URL@", server.url), encoding="utf-8")
        run_id = _run(cli, path)
    doc = json.loads(cli("report", run_id, "--format", "json").stdout)
    VALIDATOR.validate(doc)
    steps = {s["id"]: s for s in doc["steps"]}
    for sid in ("one", "two"):
        assert (steps[sid]["input_tokens"], steps[sid]["output_tokens"]) == (10, 5)
        assert steps[sid]["cost"] == pytest.approx(0.02)  # 10 x 1000/1M + 5 x 2000/1M
        assert steps[sid]["model_calls"] == 1
    assert (steps["glue"]["tokens"], steps["glue"]["cost"]) == (0, 0.0)
    assert (doc["totals"]["tokens"], doc["totals"]["cost"]) == (30, pytest.approx(0.04))
    writer = next(a for a in doc["agents"] if a["agent"] == "writer")
    assert (writer["calls"], writer["tokens"]) == (2, 30)


def test_unknown_run_fails_like_show(cli: Cli) -> None:
    cli("runs")  # creates the store
    report = cli("report", "nope")
    show = cli("show", "nope")
    assert report.returncode == show.returncode == 2
    assert report.stderr == show.stderr
    assert cli("report", "--format", "pdf", "--last").returncode == 2
