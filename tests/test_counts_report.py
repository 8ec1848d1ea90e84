"""One step count everywhere, progress that measures planned work, slot waits told apart
from scheduling latency, and an HTML report that draws the run (issue #12, items 7, 8, 16).

- *steps* are the plan's top-level steps (a map or a loop counts once): ``run --dry-run``,
  ``run.started`` and the summary's ``steps`` agree; *instances* (map items and loop
  iterations' steps included) are the summary's ``instances``.
- The live view's bar counts instances settled over instances known and never reads
  100% while anything is unsettled or after a run that did not succeed.
- ``report`` calls ready → started *waiting for a slot* only for an instance queued
  behind a full limit (the engine records ``meta["queued"]``), *scheduling latency*
  otherwise, and its advice names the cause.
- The HTML page uses the window's width, shows failures in red with their errors, draws
  the workflow graph as an SVG and links a sub-workflow step to its child run's section.

Runs go through the real CLI in subprocesses; the live view is the real `LiveSink` fed
with the real ``--json`` events.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from rich.console import Console

from conftest import SCHEMAS, WORKFLOWS
from storyflow.ui.live import LiveSink
from storyflow.ui.progress import summary_line

Cli = Callable[..., Any]

EVENTS = jsonschema.Draft202012Validator(
    json.loads((SCHEMAS / "events.schema.json").read_text(encoding="utf-8"))
)
REPORT = jsonschema.Draft202012Validator(
    json.loads((SCHEMAS / "report.schema.json").read_text(encoding="utf-8"))
)
SHORT_STORY = WORKFLOWS / "short-story.yaml"

AGENTS = '''\
import os
import signal
import time
from pathlib import Path

from storyflow import TransientError


def work(me, pause=0.0):
    time.sleep(pause)
    return me


def flaky(me):
    mark = Path(__file__).with_name("flaky.count")
    n = int(mark.read_text()) if mark.exists() else 0
    mark.write_text(str(n + 1))
    if n < 2:
        raise TransientError(f"the service answered 503 (try {n + 1})")
    return me


def broken(me):
    raise ValueError(f"{me}: the outline has no ending")


def stop(me):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    return me
'''


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "agents.py").write_text(AGENTS, encoding="utf-8")
    return tmp_path


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def events_of(stdout: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for event in events:
        EVENTS.validate(event)
    return events


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def live_sink() -> LiveSink:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    return LiveSink(console, clock=Clock(), refresh_per_second=0.01)


def bar_line(sink: LiveSink) -> str:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    console.print(sink.render())
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    return next(line for line in lines if "instances " in line and "/" in line).strip()


def bars(events: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(event type, the live view's progress text after it) for each event."""
    sink = live_sink()
    out = []
    try:
        for event in events:
            sink(event)
            out.append((event["type"], bar_line(sink).lstrip("━╸ ")))
    finally:
        sink.close()
    return out


# -- item 7: one count of steps, one of instances -------------------------------------------


def test_dry_run_run_started_summary_and_report_count_the_same_steps(
    cli: Cli, tmp_path: Path
) -> None:
    dry = cli("run", SHORT_STORY, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == "short-story: valid, 14 steps"

    result = cli("run", SHORT_STORY, "--json")
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert events[0]["type"] == "run.started" and events[0]["steps"] == 14
    summary = events[-1]
    assert summary["steps"] == {"succeeded": 14}
    assert summary["instances"] == {"succeeded": 24, "skipped": 2}
    line = summary_line(summary)
    assert line.startswith(
        "summary: succeeded · 14 steps (14 succeeded) · 26 instances (24 succeeded, 2 skipped) · "
    )

    plain = cli("run", SHORT_STORY, "--no-progress")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert "run.started short-story (14 steps) run " in lines[0]
    last = next(x for x in reversed(lines) if x.startswith("summary:"))
    assert last.startswith("summary: succeeded · 14 steps (14 succeeded) · 26 instances")

    doc = json.loads(cli("report", summary["run_id"], "--format", "json").stdout)
    REPORT.validate(doc)
    totals = doc["totals"]
    assert totals["steps"] == {"succeeded": 14}
    assert (totals["instances"], totals["instances_by_status"]) == (
        26, {"succeeded": 24, "skipped": 2}
    )
    table = cli("report", summary["run_id"]).stdout
    assert "14 steps: 14 succeeded · 26 instances: 2 skipped, 24 succeeded" in table


def test_live_progress_of_a_real_run_counts_instances_and_reads_100_only_at_success(
    cli: Cli,
) -> None:
    result = cli("run", SHORT_STORY, "--json")
    assert result.returncode == 0, result.stderr
    seen = bars(events_of(result.stdout))
    succeeded = next(i for i, (kind, _) in enumerate(seen) if kind == "run.succeeded")
    for kind, text in seen[:succeeded]:
        assert "(100%)" not in text, (kind, text)
        assert text.startswith("steps ") and "/14 · instances " in text, text
    assert seen[-1][1] == "steps 14/14 · instances 26/26 (100%)"
    # the denominator only grows as maps and loops make instances; it never shrinks
    totals = [int(re.search(r"instances \d+/(\d+)", t).group(1)) for _, t in seen]  # type: ignore[union-attr]
    assert totals == sorted(totals) and totals[0] == 14


def test_an_interrupted_map_never_reads_100_percent() -> None:
    """The case reported: a map's items and the map itself counted against the plan's
    steps showed ``6/6 (100%)`` while ``end`` was still pending."""

    def ev(type_: str, step: str | None = None, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, "run_id": "r", "ts": 1.0, **fields}
        return event if step is None else {**event, "step": step}

    events = [ev("run.started", workflow="w", steps=2, inputs={}, workflow_version=None),
              ev("step.started", "draft", attempt=1)]
    for i in range(5):
        events.append(ev("step.started", f"draft[{i}]", attempt=1))
        events.append(ev("step.succeeded", f"draft[{i}]", attempt=1, duration_s=0.1))
    events.append(ev("step.succeeded", "draft", attempt=1, duration_s=0.5))
    seen = bars(events)
    assert seen[-1][1] == "steps 1/2 · instances 6/7 (85%)"
    seen = bars([*events, ev("run.interrupted", status="interrupted", duration_s=1.0)])
    assert seen[-1][1] == "steps 1/2 · instances 6/7"  # no percentage once it stopped short
    assert all("(100%)" not in text for _, text in seen)


def test_announced_map_items_and_iteration_steps_set_the_total_at_once() -> None:
    """With the map's ``items`` and an iteration's ``steps`` (events.schema.json), the
    total is known when the map expands and when each iteration begins."""

    def ev(type_: str, step: str | None = None, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, "run_id": "r", "ts": 1.0, **fields}
        return event if step is None else {**event, "step": step}

    events = [
        ev("run.started", workflow="w", steps=3, inputs={}, workflow_version=None),
        ev("step.started", "draft", attempt=1, items=4),
        *[ev("step.started", f"draft[{i}]", attempt=1) for i in range(2)],
        *[ev("step.succeeded", f"draft[{i}]", attempt=1, duration_s=0.1) for i in range(2)],
        *[ev("step.started", f"draft[{i}]", attempt=1) for i in range(2, 4)],
        *[ev("step.succeeded", f"draft[{i}]", attempt=1, duration_s=0.1) for i in range(2, 4)],
        ev("step.succeeded", "draft", attempt=1, duration_s=0.5),
        ev("step.started", "polish", attempt=1),
        ev("loop.iteration", "polish", iteration=1, steps=2),
        ev("step.started", "polish#1.critique", attempt=1),
    ]
    for event in events:
        EVENTS.validate(event)
    seen = bars(events)
    assert seen[1][1] == "steps 0/3 · instances 0/7 (0%)"  # the map's 4 items, at once
    assert all(text.endswith(")") and "/7 (" in text for _, text in seen[1:12])
    assert seen[10][1] == "steps 1/3 · instances 5/7 (71%)"
    assert seen[12][1] == "steps 1/3 · instances 5/9 (55%)"  # iteration 1: 2 more


def test_an_interrupted_real_run_lists_its_pending_steps_and_never_reads_100(
    cli: Cli, folder: Path
) -> None:
    path = write(folder, "stops.yaml", """\
apiVersion: storyflow/v1
name: stops
steps:
  first: {uses: python, with: {callable: "agents:work", me: a}}
  halt: {uses: python, with: {callable: "agents:stop", me: "{{ steps.first.output }}"}}
  after: {uses: python, with: {callable: "agents:work", me: "{{ steps.halt.output }}"}}
""")
    result = cli("run", path, "--json")
    assert result.returncode == 130, result.stderr
    events = events_of(result.stdout)
    summary = events[-1]
    assert summary["status"] == "interrupted"
    assert summary["steps"] == {"succeeded": 1, "cancelled": 1, "pending": 1}
    assert summary_line(summary).startswith(
        "summary: interrupted · 3 steps (1 pending, 1 succeeded, 1 cancelled) · "
    )
    seen = bars(events)
    assert all("(100%)" not in text for _, text in seen)
    assert seen[-1][1] == "steps 2/3 · instances 2/3"


def test_the_engine_announces_map_items_and_iteration_steps(cli: Cli, folder: Path) -> None:
    path = write(folder, "shapes.yaml", """\
apiVersion: storyflow/v1
name: shapes
steps:
  items: {uses: template, with: {template: "{{ [1, 2, 3] }}"}}
  draft:
    for_each: steps.items.output
    max_parallel: 1
    uses: python
    with: {callable: "agents:work", me: "{{ item }}"}
  polish:
    loop:
      max_iterations: 2
      steps:
        critique: {uses: template, with: {template: "{{ steps.draft.output }}"}}
        revise: {uses: template, with: {template: "{{ steps.critique.output }}"}}
""")
    result = cli("run", path, "--json", "--max-parallel", "1")
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    expanded = next(e for e in events if e["type"] == "step.started" and e["step"] == "draft")
    if "items" not in expanded:
        pytest.skip("the engine does not announce a map's items yet (engine/maps.py)")
    assert expanded["items"] == 3
    assert [e.get("steps") for e in events if e["type"] == "loop.iteration"] == [2, 2]
    totals = [int(re.search(r"instances \d+/(\d+)", t).group(1))  # type: ignore[union-attr]
              for _, t in bars(events)]
    # 3 steps; + 3 items when the map expands (the map still counts); + 2 per iteration
    assert totals == sorted(totals) and set(totals) == {3, 6, 8, 10}


# -- item 8: waiting for a slot, or scheduling latency ----------------------------------------

TWO = """\
apiVersion: storyflow/v1
name: two
@POOLS@
steps:
  a: {@USES@, with: {me: a, pause: 0.4}}
  b: {@USES@, with: {me: b, pause: 0.4}}
"""


def _two(folder: Path, *, pool: bool) -> Path:
    text = TWO.replace(
        "@POOLS@",
        "pools: {narrow: {concurrency: 1}}\n"
        "agents: {slow: {uses: python, with: {callable: 'agents:work'}, pool: narrow}}"
        if pool else "agents: {slow: {uses: python, with: {callable: 'agents:work'}}}",
    ).replace("@USES@", "agent: slow")
    return write(folder, "two.yaml", text)


def _report(cli: Cli, run_id: str) -> dict[str, Any]:
    result = cli("report", run_id, "--format", "json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    REPORT.validate(doc)
    return doc


def _run_id(result: Any) -> str:
    assert result.returncode == 0, result.stderr
    return str(events_of(result.stdout)[-1]["run_id"])


@pytest.mark.parametrize(
    ("pool", "args", "limit", "advice"),
    [
        (False, ("--max-parallel", "1"), "max_parallel", "raise --max-parallel: it was full"),
        (True, (), "pool:narrow", "raise pool narrow's concurrency (or its rate): it was full"),
    ],
    ids=["max-parallel", "pool"],
)
def test_a_full_limit_is_waiting_for_a_slot_and_the_advice_names_it(
    cli: Cli, folder: Path, pool: bool, args: tuple[str, ...], limit: str, advice: str
) -> None:
    run_id = _run_id(cli("run", _two(folder, pool=pool), "--json", *args))
    doc = _report(cli, run_id)
    steps = {s["id"]: s for s in doc["steps"]}
    first, second = sorted(steps.values(), key=lambda s: s["started_at"])
    assert first["queued"] is None and first["wait_s"] == 0
    assert second["queued"] == limit
    assert second["wait_s"] >= 0.3 and second["latency_s"] == 0
    bottlenecks = doc["critical_path"]["bottlenecks"]
    assert set(bottlenecks["wait_by_limit"]) == {limit}
    assert bottlenecks["advice"][0].startswith(advice)
    table = cli("report", run_id).stdout
    assert f"advice: {advice}" in table


def test_no_full_limit_means_scheduling_latency_not_waiting_for_a_slot(
    cli: Cli, folder: Path
) -> None:
    for run_id in (_run_id(cli("run", _two(folder, pool=False), "--json")),
                   _run_id(cli("run", SHORT_STORY, "--json"))):
        doc = _report(cli, run_id)
        assert all(s["queued"] is None and s["wait_s"] in (0, None) for s in doc["steps"])
        bottlenecks = doc["critical_path"]["bottlenecks"]
        assert (bottlenecks["wait_s"], bottlenecks["wait_by_limit"]) == (0, {})
        assert not any("raise" in tip for tip in bottlenecks["advice"])
        assert all(e["wait_s"] == 0 for e in doc["critical_path"]["instances"])
        assert sum(e["latency_s"] for e in doc["critical_path"]["instances"]) == pytest.approx(
            bottlenecks["latency_s"], abs=1e-5
        )
        text = cli("report", run_id).stdout
        assert "waiting for a slot 0ms (0.0%)" in text and "raise --max-parallel" not in text


# -- item 16: the HTML page -------------------------------------------------------------------

CHILD = """\
apiVersion: storyflow/v1
name: chapter
inputs:
  topic: {type: string, default: x}
steps:
  outline: {uses: python, with: {callable: "agents:work", me: "{{ inputs.topic }}"}}
  write: {uses: python, with: {callable: "agents:work", me: "{{ steps.outline.output }}!"}}
outputs:
  text: "{{ steps.write.output }}"
"""

DEMO = """\
apiVersion: storyflow/v1
name: demo
steps:
  premise: {uses: python, with: {callable: "agents:work", me: p}}
  items: {uses: template, with: {template: "{{ ['a', 'b', 'c'] }}"}}
  draft:
    for_each: steps.items.output
    uses: python
    with: {callable: "agents:work", me: "{{ item }}"}
  flaky:
    uses: python
    with: {callable: "agents:flaky", me: "{{ steps.premise.output }}"}
    retry: {attempts: 3, delay: 0.05s, jitter: false}
  broken:
    uses: python
    with: {callable: "agents:broken", me: "{{ steps.premise.output }}"}
    allow_failure: true
  polish:
    loop:
      max_iterations: 2
      steps:
        critique: {uses: python, with: {callable: "agents:work", me: "{{ steps.draft.output }}"}}
        revise: {uses: python, with: {callable: "agents:work", me: "{{ steps.critique.output }}"}}
  chapter: {uses: workflow, with: {path: child.yaml, inputs: {topic: "{{ steps.flaky.output }}"}}}
  end:
    uses: template
    with: {template: "{{ steps.polish.output.revise }} {{ steps.chapter.output.text }}"}
"""


class Page(HTMLParser):
    """The elements of a page: (tag, attributes, the svg it is in, its text), and a check
    that every element opened is closed in order."""

    VOID = frozenset({"meta", "br", "rect", "line", "path", "stop", "input", "img", "hr"})

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[dict[str, Any]] = []
        self.stack: list[dict[str, Any]] = []
        self.unbalanced: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        svg = next((el for el in reversed(self.stack) if el["tag"] == "svg"), None)
        element = {"tag": tag, "attrs": dict(attrs), "svg": svg, "text": "", "parents":
                   list(self.stack)}
        self.elements.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        svg = next((el for el in reversed(self.stack) if el["tag"] == "svg"), None)
        self.elements.append({"tag": tag, "attrs": dict(attrs), "svg": svg, "text": "",
                              "parents": list(self.stack)})

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1]["tag"] != tag:
            self.unbalanced.append(tag)
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        for element in self.stack:
            element["text"] += data

    def find(self, tag: str, **attrs: str) -> list[dict[str, Any]]:
        return [el for el in self.elements if el["tag"] == tag
                and all(el["attrs"].get(k) == v for k, v in attrs.items())]


def test_the_html_page_draws_the_run(cli: Cli, folder: Path, tmp_path: Path) -> None:
    write(folder, "child.yaml", CHILD)
    path = write(folder, "demo.yaml", DEMO)
    result = cli("run", path, "--json")
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    run_id = events[-1]["run_id"]
    doc = _report(cli, run_id)
    child_id = next(s["child_run"] for s in doc["steps"] if s["id"] == "chapter")

    out = tmp_path / "report.html"
    assert cli("report", run_id, "--format", "html", "-o", out).returncode == 0
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert page.unbalanced == [] and page.stack == []

    # self-contained: no script, no external resource, no URL; links stay in the page
    for external in ("http://", "https://", "src=", "<link", "<script", "@import"):
        assert external not in text, external
    assert all(str(el["attrs"]["href"]).startswith("#") for el in page.elements
               if "href" in el["attrs"])
    assert set(re.findall(r"url\((.)", text)) <= {"#"}
    # the page's width: no max-width on the page, a timeline as wide as the window
    css = page.find("style")[0]["text"]
    assert not re.search(r"body\{[^}]*max-width", css)
    timeline = page.find("svg", **{"aria-label": "timeline"})[0]
    assert (timeline["attrs"]["width"], timeline["attrs"]["preserveaspectratio"]) == (
        "100%", "none"
    )

    # failures are unmissable: a red row with its error, a failures box, red attempt bars
    failed_rows = [el for el in page.find("tr") if "failed" in (el["attrs"].get("class") or "")]
    assert any("broken" in row["text"] and "the outline has no ending" in row["text"]
               for row in failed_rows)
    box = [el for el in page.find("div", **{"class": "failures"})]
    assert box and "attempt 1 failed" in box[0]["text"] and "503 (try 1)" in box[0]["text"]
    assert "the outline has no ending" in box[0]["text"]
    failed_bars = [el for el in page.find("rect") if el["svg"] is timeline
                   and "att-failed" in (el["attrs"].get("class") or "")]
    assert len(failed_bars) >= 3  # flaky's two failed attempts, broken's one

    # the workflow graph is a picture: boxes, arrows, a map's items, a loop's iterations
    graph = page.find("svg", **{"aria-label": "workflow graph"})[0]
    in_graph = [el for el in page.elements if el["svg"] is graph]
    texts = [el["text"] for el in in_graph if el["tag"] == "text"]
    for step in ("premise", "items", "flaky", "broken", "chapter", "end"):
        assert any(t.startswith(step) for t in texts), step
    assert {"[0]", "[1]", "[2]", "#1", "#2"} <= set(texts)
    assert sum(1 for el in in_graph if el["tag"] == "path"
               and el["attrs"].get("class") == "edge") >= 6
    assert any(el["tag"] == "rect" and "bad" in (el["attrs"].get("class") or "")
               for el in in_graph)  # the failed step's box
    assert "<pre>" not in text  # not a text listing

    # the child run has its own section, and the parent's bar, row and box link to it
    anchor = "run-" + child_id
    assert page.find("section", id=anchor)
    links = [el for el in page.elements if el["attrs"].get("href") == "#" + anchor]
    assert any(el["svg"] is timeline for el in links)
    assert any(el["svg"] is graph for el in links)
    assert any(el["svg"] is None for el in links)
    child_section = page.find("section", id=anchor)[0]
    assert "outline" in child_section["text"] and "write" in child_section["text"]
