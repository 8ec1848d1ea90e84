"""The engine through the real command line: run, resume, show, logs, runs.

Every test drives `python -m storyflow` in subprocesses, with its state directory and
its python agents (a module written into ``tmp_path``) private to the test. Agents
record every execution by appending one line to a log file (``SF_EXEC_LOG``); that
log is how the tests count executions across processes, crashes included.

Every ``--json`` line these tests read is validated against ``schemas/events.schema.json``,
every ``show --json`` document against ``schemas/show.schema.json`` and every
``runs --json`` list against ``schemas/runs.schema.json``.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import CLI_TIMEOUT_S, cli_env

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas"

SECRET = "supersecretvalue"

AGENTS = '''\
"""Python agents for the engine tests. Each logs one line per execution."""
import asyncio
import hashlib
import json
import os
import time

from storyflow import TransientError


def _log(me):
    with open(os.environ["SF_EXEC_LOG"], "a", encoding="utf-8") as f:
        f.write(me + "\\n")


def _count(me):
    try:
        with open(os.environ["SF_EXEC_LOG"], encoding="utf-8") as f:
            return sum(1 for line in f if line.rstrip("\\n") == me)
    except FileNotFoundError:
        return 0


def _digest(me, deps, extra=None):
    text = json.dumps([me, sorted(str(d) for d in deps), extra], sort_keys=True)
    return me + ":" + hashlib.sha256(text.encode()).hexdigest()[:12]


def step(me, deps=(), tone=None, pause=0.0):
    _log(me)
    if pause:
        time.sleep(pause)
    return _digest(me, deps, tone)


def broken(me, deps=()):
    _log(me)
    raise ValueError(f"boom in {me}")


def flaky(me, failures=2):
    _log(me)
    if _count(me) <= failures:
        raise TransientError(f"{me} is not ready yet")
    return _digest(me, ())


async def slow(me, deps=()):
    _log(me)
    if os.environ.get("SF_SLOW"):
        gate = os.environ.get("SF_GATE", "")
        for _ in range(1200):  # at most about a minute
            if gate and os.path.exists(gate):
                break
            await asyncio.sleep(0.05)
    return _digest(me, deps)


def leak(me, token):
    _log(me)
    return f"{me} saw token={token}"
'''

BROKEN_BODY = '    raise ValueError(f"boom in {me}")\n'
FIXED_BODY = "    return _digest(me, deps)\n"


# --- schemas ------------------------------------------------------------------------


def _load(name: str) -> dict[str, Any]:
    with (SCHEMAS / name).open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


EVENTS_SCHEMA = _load("events.schema.json")
SHOW_SCHEMA = _load("show.schema.json")
RUNS_SCHEMA = _load("runs.schema.json")
EVENTS = jsonschema.Draft202012Validator(EVENTS_SCHEMA)
SHOW = jsonschema.Draft202012Validator(SHOW_SCHEMA)
RUNS = jsonschema.Draft202012Validator(RUNS_SCHEMA)
SHOW_STEP = jsonschema.Draft202012Validator(
    {"$schema": SHOW_SCHEMA["$schema"], "$defs": SHOW_SCHEMA["$defs"], "$ref": "#/$defs/step"}
)


def valid(validator: jsonschema.Draft202012Validator, doc: Any) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]
    ) + f"\nin {json.dumps(doc)[:600]}"


def parse_events(stdout: str) -> list[dict[str, Any]]:
    """Every line of a --json stream, each validated against events.schema.json."""
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for event in events:
        valid(EVENTS, event)
    return events


def of_type(events: list[dict[str, Any]], type_: str,
            step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_ and (step is None or e.get("step") == step)]


# --- the project: a workflow folder, its agents, its state dir, the CLI ------------------


class LiveRun:
    """A CLI process whose --json stdout is read line by line while it runs."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path, stderr: Path) -> None:
        self._stderr_path = stderr
        self._stderr = stderr.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, encoding="utf-8",
        )
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._lines.put(line)
        except (ValueError, OSError):  # the pipe was closed under us: that is the end
            pass
        self._lines.put(None)

    def next_event(self, timeout: float = CLI_TIMEOUT_S) -> dict[str, Any] | None:
        """The next event, or None at the end of the stream."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout}s; so far: {self.events}") from None
        if line is None:
            self._lines.put(None)  # stay at the end
            return None
        event = json.loads(line)
        valid(EVENTS, event)
        self.events.append(event)
        return event

    def wait_for(self, pred: Callable[[dict[str, Any]], bool],
                 timeout: float = CLI_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.1, deadline - time.monotonic()))
            if event is None:
                raise AssertionError(f"the stream ended first; events: {self.events}\n"
                                     f"stderr: {self.stderr()}")
            if pred(event):
                return event

    def finish(self, timeout: float = CLI_TIMEOUT_S) -> int:
        """Wait for the exit and read the rest of stdout; the exit code."""
        code = self.proc.wait(timeout=timeout)
        while self.next_event(timeout) is not None:
            pass
        self._reader.join(timeout)
        return code

    def stderr(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text(encoding="utf-8")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=CLI_TIMEOUT_S)
        # The process is gone, so the reader reaches EOF: let it finish before the pipe
        # is closed, or it may read from a closed file.
        self._reader.join(CLI_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


class Project:
    """A workflow folder with an ``agents`` module, a state dir and the CLI to drive them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.log = root / "exec.log"
        self.gate = root / "gate"
        (root / "agents.py").write_text(AGENTS, encoding="utf-8")
        self._live: list[LiveRun] = []

    # files
    def workflow(self, text: str, name: str = "workflow.yaml") -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    def edit_agents(self, old: str, new: str) -> None:
        path = self.root / "agents.py"
        text = path.read_text(encoding="utf-8")
        assert old in text
        path.write_text(text.replace(old, new), encoding="utf-8")

    def executions(self, log: Path | None = None) -> Counter[str]:
        path = log or self.log
        if not path.exists():
            return Counter()
        return Counter(path.read_text(encoding="utf-8").splitlines())

    # processes
    def env(self, extra: Mapping[str, str | None] | None = None,
            state: Path | None = None) -> dict[str, str]:
        env = cli_env(state or self.state, {
            "SF_EXEC_LOG": str(self.log),
            "SF_GATE": str(self.gate),
            "PYTHONDONTWRITEBYTECODE": "1",  # the tests edit agents.py between runs
        })
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def argv(self, *args: str | os.PathLike[str]) -> list[str]:
        return [sys.executable, "-m", "storyflow", *map(str, args)]

    def cli(self, *args: str | os.PathLike[str], env: Mapping[str, str | None] | None = None,
            state: Path | None = None, merge_stderr: bool = False,
            timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), cwd=self.root, env=self.env(env, state),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True, encoding="utf-8", timeout=timeout, check=False,
        )

    def live(self, *args: str | os.PathLike[str], env: Mapping[str, str | None] | None = None,
             state: Path | None = None) -> LiveRun:
        run = LiveRun(self.argv(*args), env=self.env(env, state), cwd=self.root,
                      stderr=self.root / f"stderr-{len(self._live)}.txt")
        self._live.append(run)
        return run

    def close(self) -> None:
        for run in self._live:
            run.close()

    # documents
    def run_json(self, *args: str | os.PathLike[str], code: int = 0,
                 env: Mapping[str, str | None] | None = None,
                 state: Path | None = None) -> list[dict[str, Any]]:
        """``run/resume ... --json``: the validated events; asserts the exit code."""
        result = self.cli(*args, "--json", env=env, state=state)
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        events = parse_events(result.stdout)
        assert events and events[-1]["type"] == "run.summary", events
        return events

    def show(self, run_id: str, state: Path | None = None) -> dict[str, Any]:
        result = self.cli("show", run_id, "--json", state=state)
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        valid(SHOW, doc)
        return doc

    def runs(self) -> list[dict[str, Any]]:
        result = self.cli("runs", "--json")
        assert result.returncode == 0, result.stderr
        doc: list[dict[str, Any]] = json.loads(result.stdout)
        valid(RUNS, doc)
        return doc


def steps_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in doc["steps"]}


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path)
    yield p
    p.close()


def py(me: str, *deps: str, fn: str = "step", extra: str = "") -> str:
    """A python step as a YAML flow mapping whose output depends on ``deps``' outputs."""
    dep_list = ", ".join(f'"{{{{ steps.{d}.output }}}}"' for d in deps)
    more = f", {extra}" if extra else ""
    call = f'callable: "agents:{fn}", me: {me}, deps: [{dep_list}]{more}'
    return f"{{uses: python, with: {{{call}}}}}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


# --- the schemas themselves ----------------------------------------------------------


def _property_schemas(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return
    for kw in ("properties", "$defs"):
        for key, sub in node.get(kw, {}).items():
            if isinstance(sub, dict):
                yield f"{path}/{kw}/{key}", sub
                yield from _property_schemas(sub, f"{path}/{kw}/{key}")
    for kw in ("items", "additionalProperties", "propertyNames"):
        sub = node.get(kw)
        if isinstance(sub, dict):
            yield f"{path}/{kw}", sub
            yield from _property_schemas(sub, f"{path}/{kw}")


@pytest.mark.parametrize("name", ["events.schema.json", "show.schema.json", "runs.schema.json",
                                  "gc.schema.json", "diff.schema.json"])
def test_output_schemas_are_valid_2020_12_and_documented(name: str) -> None:
    schema = _load(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema.get("description")
    undocumented = [p for p, sub in _property_schemas(schema) if not sub.get("description")]
    assert not undocumented, undocumented


def test_event_schema_types_and_statuses_match_the_code() -> None:
    from storyflow.events import ErrorClass, EventType, RunStatus, StepStatus

    assert set(EVENTS_SCHEMA["properties"]["type"]["enum"]) == {e.value for e in EventType}
    summary = EVENTS_SCHEMA["$defs"]["run.summary"]["properties"]
    assert set(summary["steps"]["propertyNames"]["enum"]) == {s.value for s in StepStatus}
    assert set(summary["status"]["enum"]) == {s.value for s in RunStatus} - {"running"}
    assert set(SHOW_SCHEMA["properties"]["status"]["enum"]) == {s.value for s in RunStatus}
    assert set(SHOW_SCHEMA["$defs"]["step"]["properties"]["status"]["enum"]) == {
        s.value for s in StepStatus}
    assert set(EVENTS_SCHEMA["$defs"]["error"]["properties"]["class"]["enum"]) == {
        c.value for c in ErrorClass}
    # strict: an unknown field or a step event without its step is rejected
    base = {"type": "step.started", "run_id": "r", "ts": 1.0, "step": "a", "attempt": 1}
    valid(EVENTS, base)
    assert not EVENTS.is_valid({**base, "surprise": 1})
    assert not EVENTS.is_valid({k: v for k, v in base.items() if k != "step"})
    assert not EVENTS.is_valid({k: v for k, v in base.items() if k != "attempt"})
    assert not EVENTS.is_valid({**base, "type": "step.exploded"})


# --- a run that succeeds --------------------------------------------------------------


CHAIN = f"""
apiVersion: storyflow/v1
name: chain
inputs:
  premise: {{type: string, default: "a lighthouse"}}
steps:
  outline:
    uses: python
    with: {{callable: "agents:step", me: outline, deps: ["{{{{ inputs.premise }}}}"]}}
  draft: {py("draft", "outline")}
  notes: {py("notes", "outline")}
  story:
    uses: template
    with:
      template: |-
        # {{{{ inputs.premise }}}}
        {{{{ steps.draft.output }}}} / {{{{ steps.notes.output }}}}
outputs:
  story: "{{{{ steps.story.output }}}}"
  parts: "{{{{ [steps.draft.output, steps.notes.output] }}}}"
artifacts:
  story.md: "{{{{ steps.story.output }}}}"
"""


def test_run_succeeds_with_outputs_artifact_and_valid_json_documents(project: Project) -> None:
    wf = project.workflow(CHAIN)
    events = project.run_json("run", wf)
    assert events[0]["type"] == "run.started"
    run_id = events[0]["run_id"]
    assert all(e["run_id"] == run_id for e in events)
    summary = events[-1]
    assert summary["status"] == "succeeded"
    assert summary["steps"] == {"succeeded": 4}
    story = summary["outputs"]["story"]
    assert story.startswith("# a lighthouse\ndraft:") and " / notes:" in story
    assert isinstance(summary["outputs"]["parts"], list)
    assert {e["step"] for e in of_type(events, "step.succeeded")} == {
        "outline", "draft", "notes", "story"}
    assert project.executions() == Counter({"outline": 1, "draft": 1, "notes": 1})

    doc = project.show(run_id)
    assert doc["status"] == "succeeded" and doc["run_id"] == run_id
    assert doc["outputs"] == summary["outputs"]
    assert [s["id"] for s in doc["steps"]] == ["outline", "draft", "notes", "story"]
    assert all(s["status"] == "succeeded" and s["attempts"] == 1 and s["error"] is None
               for s in doc["steps"])
    run_dir = Path(doc["run_dir"])
    assert run_dir == Path(summary["run_dir"])
    assert (run_dir / "story.md").read_text(encoding="utf-8") == story

    # the event log backs the stream: same events, each a valid line
    logged = parse_events((run_dir / "events.jsonl").read_text(encoding="utf-8"))
    assert [e["type"] for e in logged] == [e["type"] for e in events]
    result = project.cli("logs", run_id, "--json")
    assert result.returncode == 0, result.stderr
    assert [e["type"] for e in parse_events(result.stdout)] == [e["type"] for e in events]

    one = project.cli("show", run_id, "--step", "draft", "--json")
    assert one.returncode == 0, one.stderr
    step_doc = json.loads(one.stdout)
    valid(SHOW_STEP, step_doc)
    assert step_doc["output"] == steps_of(doc)["draft"]["output"]
    raw = project.cli("show", run_id[:12], "--output", "story")
    assert raw.returncode == 0 and raw.stdout == story + "\n"

    runs = project.runs()
    assert [(r["run_id"], r["workflow"], r["status"]) for r in runs] == [
        (run_id, "chain", "succeeded")]


# --- failure and resume -----------------------------------------------------------------


FAILING = f"""
apiVersion: storyflow/v1
name: failing
steps:
  plan: {py("plan")}
  write: {py("write", "plan", fn="broken")}
  edit: {py("edit", "write")}
  publish: {py("publish", "edit")}
  side: {py("side", "plan")}
outputs:
  book: "{{{{ steps.publish.output }}}}"
"""


def test_failed_run_resumes_by_prefix_after_a_fix_without_redoing_work(project: Project) -> None:
    wf = project.workflow(FAILING)
    events = project.run_json("run", wf, code=1)
    run_id = events[0]["run_id"]
    failed = of_type(events, "step.failed", "write")
    assert len(failed) == 1 and failed[0]["final"] is True
    assert failed[0]["error"]["class"] == "permanent"
    assert {e["step"] for e in of_type(events, "step.skipped")} == {"edit", "publish"}
    assert events[-1]["status"] == "failed" and events[-1]["outputs"] == {}

    doc = project.show(run_id)
    steps = steps_of(doc)
    assert doc["status"] == "failed"
    assert doc["error"]["class"] == "permanent" and "write" in doc["error"]["message"]
    assert steps["write"]["status"] == "failed"
    assert steps["write"]["error"]["class"] == "permanent"
    assert "ValueError" in steps["write"]["error"]["message"]
    assert "boom in write" in steps["write"]["error"]["message"]
    assert steps["edit"]["status"] == steps["publish"]["status"] == "skipped"
    assert steps["side"]["status"] == "succeeded"  # an independent branch still ran
    assert project.executions() == Counter({"plan": 1, "write": 1, "side": 1})

    project.edit_agents(BROKEN_BODY, FIXED_BODY)
    prefix = run_id[: len(run_id) - 3]
    resumed = project.run_json("resume", prefix)
    assert resumed[0]["type"] == "run.resumed" and resumed[0]["run_id"] == run_id
    assert set(resumed[0]["kept"]) == {"plan", "side"}
    assert {e["step"] for e in of_type(resumed, "step.kept")} == {"plan", "side"}
    assert resumed[-1]["status"] == "succeeded"
    assert resumed[-1]["outputs"]["book"].startswith("publish:")
    # succeeded steps ran exactly once in total; the failed one once more
    assert project.executions() == Counter(
        {"plan": 1, "side": 1, "write": 2, "edit": 1, "publish": 1})
    doc = project.show(run_id)
    assert doc["status"] == "succeeded" and doc["error"] is None
    assert all(s["status"] == "succeeded" for s in doc["steps"])

    again = project.run_json("resume", "--last")
    assert again[0]["run_id"] == run_id
    assert {e["step"] for e in of_type(again, "step.kept")} == set(steps)
    assert not of_type(again, "step.started")
    assert again[-1]["outputs"] == resumed[-1]["outputs"]
    assert project.executions() == Counter(
        {"plan": 1, "side": 1, "write": 2, "edit": 1, "publish": 1})
    assert [r["status"] for r in project.runs()] == ["succeeded"]


EDITABLE = f"""
apiVersion: storyflow/v1
name: editable
steps:
  outline: {py("outline")}
  draft: {py("draft", "outline", extra="tone: calm")}
  polish: {py("polish", "draft")}
  cast: {py("cast", "outline")}
  title: {py("title")}
outputs:
  story: "{{{{ steps.polish.output }}}}"
"""


def test_changed_step_and_its_downstream_rerun_and_the_plan_is_printed_first(
        project: Project) -> None:
    wf = project.workflow(EDITABLE)
    first = project.run_json("run", wf)
    run_id = first[0]["run_id"]
    before = project.show(run_id)

    wf.write_text(wf.read_text(encoding="utf-8").replace("tone: calm", "tone: wild"),
                  encoding="utf-8")
    result = project.cli("resume", run_id, "--no-progress", merge_stderr=True)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    plan_at = next(i for i, line in enumerate(lines) if "changed steps: draft" in line)
    first_step_at = next(i for i, line in enumerate(lines)
                         if re.search(r"\bdraft attempt 2\b", line))
    assert plan_at < first_step_at, result.stdout
    assert any("re-run or run: draft, polish" in line for line in lines[:first_step_at]), lines
    assert project.executions() == Counter(
        {"outline": 1, "cast": 1, "title": 1, "draft": 2, "polish": 2})
    after = project.show(run_id)
    old, new = steps_of(before), steps_of(after)
    for kept in ("outline", "cast", "title"):
        assert new[kept]["output"] == old[kept]["output"]
        assert new[kept]["started_at"] == old[kept]["started_at"]
    assert new["draft"]["output"] != old["draft"]["output"]
    assert after["outputs"]["story"] == new["polish"]["output"] != before["outputs"]["story"]

    # the same, machine-readable: run.resumed carries the plan before any step starts
    wf.write_text(wf.read_text(encoding="utf-8").replace("tone: wild", "tone: dry"),
                  encoding="utf-8")
    resumed = project.run_json("resume", run_id)
    head = resumed[0]
    assert head["type"] == "run.resumed"
    assert head["changed"] == ["draft"]
    assert set(head["rerun"]) == {"draft", "polish"}
    assert set(head["kept"]) == {"outline", "cast", "title"}
    assert {e["step"] for e in of_type(resumed, "step.started")} == {"draft", "polish"}
    assert project.executions() == Counter(
        {"outline": 1, "cast": 1, "title": 1, "draft": 3, "polish": 3})


def test_resume_from_step_reruns_it_and_its_dependents_only(project: Project) -> None:
    wf = project.workflow(EDITABLE)
    run_id = project.run_json("run", wf)[0]["run_id"]
    result = project.cli("resume", run_id, "--from", "draft", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "re-run or run: draft, polish" in result.stderr
    assert project.executions() == Counter(
        {"outline": 1, "cast": 1, "title": 1, "draft": 2, "polish": 2})
    bad = project.cli("resume", run_id, "--from", "drafts")
    assert bad.returncode == 2 and "draft" in bad.stderr


def test_cache_true_step_is_reused_by_a_later_run(project: Project) -> None:
    wf = project.workflow(f"""
        apiVersion: storyflow/v1
        name: cached
        steps:
          research:
            uses: python
            with: {{callable: "agents:step", me: research, deps: []}}
            cache: true
          write: {py("write", "research")}
        outputs:
          text: "{{{{ steps.write.output }}}}"
        """)
    first = project.run_json("run", wf)
    assert of_type(first, "step.succeeded", "research")
    second = project.run_json("run", wf)
    assert second[0]["run_id"] != first[0]["run_id"]
    assert len(of_type(second, "step.cached", "research")) == 1
    assert not of_type(second, "step.started", "research")
    assert project.executions() == Counter({"research": 1, "write": 2})
    assert second[-1]["outputs"] == first[-1]["outputs"]
    assert second[-1]["steps"] == {"cached": 1, "succeeded": 1}
    assert steps_of(project.show(second[0]["run_id"]))["research"]["status"] == "cached"


# --- when / join / allow_failure ---------------------------------------------------------


def test_when_false_skips_the_step_and_its_downstream(project: Project) -> None:
    wf = project.workflow(f"""
        apiVersion: storyflow/v1
        name: gated
        inputs:
          illustrate: {{type: boolean, default: false}}
        steps:
          text: {py("text")}
          art:
            when: inputs.illustrate
            uses: python
            with: {{callable: "agents:step", me: art, deps: ["{{{{ steps.text.output }}}}"]}}
          caption: {py("caption", "art")}
          print: {py("print", "text")}
        """)
    events = project.run_json("run", wf)
    skipped = {e["step"]: e["reason"] for e in of_type(events, "step.skipped")}
    assert set(skipped) == {"art", "caption"}
    assert "when" in skipped["art"] and "art" in skipped["caption"]
    assert project.executions() == Counter({"text": 1, "print": 1})
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["steps"] == {"succeeded": 2, "skipped": 2}

    events = project.run_json("run", wf, "-i", "illustrate=true")
    assert not of_type(events, "step.skipped")
    assert project.executions() == Counter({"text": 2, "print": 2, "art": 1, "caption": 1})


def test_join_any_succeeded_runs_when_one_need_failed_with_allow_failure(
        project: Project) -> None:
    wf = project.workflow(f"""
        apiVersion: storyflow/v1
        name: alternatives
        steps:
          good: {py("good")}
          bad:
            uses: python
            with: {{callable: "agents:broken", me: bad}}
            allow_failure: true
          meet:
            join: any_succeeded
            needs: [good, bad]
            uses: python
            with: {{callable: "agents:step", me: meet}}
          strict:
            needs: [good, bad]
            uses: python
            with: {{callable: "agents:step", me: strict}}
        outputs:
          met: "{{{{ steps.meet.output }}}}"
        """)
    events = project.run_json("run", wf)
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["outputs"]["met"].startswith("meet:")
    assert project.executions() == Counter({"good": 1, "bad": 1, "meet": 1})
    steps = steps_of(project.show(events[0]["run_id"]))
    assert steps["bad"]["status"] == "failed" and steps["bad"]["error"]["class"] == "permanent"
    assert steps["meet"]["status"] == "succeeded"
    assert steps["strict"]["status"] == "skipped"  # the default join needs all of them


def test_join_all_done_runs_after_a_failure(project: Project) -> None:
    wf = project.workflow(f"""
        apiVersion: storyflow/v1
        name: cleanup
        steps:
          work: {py("work", fn="broken")}
          cleanup:
            join: all_done
            needs: [work]
            uses: python
            with: {{callable: "agents:step", me: cleanup}}
        """)
    events = project.run_json("run", wf, code=1)
    assert events[-1]["status"] == "failed"
    assert of_type(events, "step.succeeded", "cleanup")
    assert project.executions() == Counter({"work": 1, "cleanup": 1})
    doc = project.show(events[0]["run_id"])
    assert doc["status"] == "failed" and "work" in doc["error"]["message"]


def test_allow_failure_lets_the_run_succeed(project: Project) -> None:
    wf = project.workflow(f"""
        apiVersion: storyflow/v1
        name: tolerant
        steps:
          optional:
            uses: python
            with: {{callable: "agents:broken", me: optional}}
            allow_failure: true
          main: {py("main")}
        outputs:
          main: "{{{{ steps.main.output }}}}"
        """)
    events = project.run_json("run", wf)
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["steps"] == {"succeeded": 1, "failed": 1}
    doc = project.show(events[0]["run_id"])
    assert doc["status"] == "succeeded" and doc["error"] is None
    assert steps_of(doc)["optional"]["error"]["class"] == "permanent"


# --- retries, commands, timeouts -----------------------------------------------------------


def test_transient_python_error_is_retried_until_it_succeeds(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: flaky
        steps:
          fetch:
            uses: python
            with: {callable: "agents:flaky", me: fetch, failures: 2}
            retry: {attempts: 3, delay: 0}
          stubborn:
            uses: python
            with: {callable: "agents:broken", me: stubborn}
            retry: {attempts: 3, delay: 0}
            allow_failure: true
        """)
    events = project.run_json("run", wf)
    retrying = of_type(events, "step.retrying", "fetch")
    assert [e["attempt"] for e in retrying] == [1, 2]
    assert all(e["error"]["class"] == "transient" for e in retrying)
    assert [e["attempt"] for e in of_type(events, "step.started", "fetch")] == [1, 2, 3]
    assert of_type(events, "step.succeeded", "fetch")[0]["attempt"] == 3
    # a permanent error is not retried
    assert not of_type(events, "step.retrying", "stubborn")
    assert [e["attempt"] for e in of_type(events, "step.failed", "stubborn")] == [1]
    steps = steps_of(project.show(events[0]["run_id"]))
    assert steps["fetch"]["status"] == "succeeded" and steps["fetch"]["attempts"] == 3
    assert steps["stubborn"]["attempts"] == 1
    assert project.executions() == Counter({"fetch": 3, "stubborn": 1})


def test_command_exit_75_is_transient(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: tempfail
        steps:
          once:
            uses: command
            with:
              run: "if [ -e tried ]; then echo fine; else touch tried; echo busy >&2; exit 75; fi"
            retry: {attempts: 2, delay: 0}
          always:
            uses: command
            with: {run: "echo still busy >&2; exit 75"}
            allow_failure: true
          broken:
            uses: command
            with: {run: "echo nope >&2; exit 3"}
            retry: {attempts: 2, delay: 0}
            allow_failure: true
        outputs:
          once: "{{ steps.once.output }}"
        """)
    events = project.run_json("run", wf)
    (retry,) = of_type(events, "step.retrying", "once")
    assert retry["error"]["class"] == "transient" and "75" in retry["error"]["message"]
    assert events[-1]["outputs"] == {"once": "fine"}
    (always,) = of_type(events, "step.failed", "always")
    assert always["error"]["class"] == "transient"
    (broken,) = of_type(events, "step.failed", "broken")
    assert broken["error"]["class"] == "permanent" and "nope" in broken["error"]["message"]
    assert not of_type(events, "step.retrying", "broken")


def test_command_timeout_fails_with_class_timeout_and_kills_the_child(
        project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: slowcmd
        steps:
          nap:
            uses: command
            with: {run: "echo $$ > child.pid; exec sleep 5"}
            timeout: 0.5s
        """)
    events = project.run_json("run", wf, code=1)
    (failed,) = of_type(events, "step.failed", "nap")
    assert failed["error"]["class"] == "timeout"
    pid = int((project.root / "child.pid").read_text().strip())
    assert not _alive(pid), f"the command's process {pid} outlived its step"
    steps = steps_of(project.show(events[0]["run_id"]))
    assert steps["nap"]["error"]["class"] == "timeout"


# --- signals and leases ---------------------------------------------------------------


SIGNALLED = f"""
apiVersion: storyflow/v1
name: signalled
steps:
  first: {py("first")}
  aside: {py("aside")}
  long: {py("long", "first", fn="slow")}
  last: {py("last", "long")}
outputs:
  last: "{{{{ steps.last.output }}}}"
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_the_run_and_resume_finishes_it(
        project: Project, signum: int, code: int) -> None:
    wf = project.workflow(SIGNALLED)
    live = project.live("run", wf, "--json", env={"SF_SLOW": "1"})
    run_id = live.wait_for(lambda e: e["type"] == "run.started")["run_id"]
    live.wait_for(lambda e: e["type"] == "step.started" and e["step"] == "long")
    live.proc.send_signal(signum)
    assert live.finish() == code, live.stderr()
    assert "Traceback" not in live.stderr()
    succeeded_before = {e["step"] for e in of_type(live.events, "step.succeeded")}
    assert "first" in succeeded_before
    assert of_type(live.events, "step.cancelled", "long")
    assert live.events[-1]["type"] == "run.summary"
    assert live.events[-1]["status"] == "interrupted"
    assert of_type(live.events, "run.interrupted")

    doc = project.show(run_id)
    assert doc["status"] == "interrupted"
    steps = steps_of(doc)
    assert steps["long"]["status"] == "cancelled"
    assert steps["long"]["error"]["class"] == "cancelled"
    assert steps["last"]["status"] == "pending"

    resumed = project.run_json("resume", run_id)
    assert resumed[-1]["status"] == "succeeded"
    counts = project.executions()
    for step in succeeded_before:
        assert counts[step] == 1, (step, counts)
    # `long` ran again (it may not have reached its first line before the signal)
    assert of_type(resumed, "step.succeeded", "long")
    assert 1 <= counts["long"] <= 2 and counts["last"] == 1
    assert set(counts) == {"first", "aside", "long", "last"}
    assert project.show(run_id)["status"] == "succeeded"


def test_a_second_resume_of_a_live_run_exits_4_naming_the_holder(project: Project) -> None:
    wf = project.workflow(SIGNALLED)
    live = project.live("run", wf, "--json", env={"SF_SLOW": "1"})
    run_id = live.wait_for(lambda e: e["type"] == "run.started")["run_id"]
    live.wait_for(lambda e: e["type"] == "step.started" and e["step"] == "long")
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while project.executions()["long"] == 0:  # `long` is inside its agent now
        assert time.monotonic() < deadline, "the step never started executing"
        time.sleep(0.02)

    held = project.cli("resume", run_id)
    assert held.returncode == 4, (held.stdout, held.stderr)
    assert f"process {live.proc.pid}" in held.stderr
    assert "Traceback" not in held.stderr
    assert project.executions()["long"] == 1  # the refused resume ran nothing
    assert "resuming run" not in held.stderr  # refused before printing a plan
    shown = json.loads(project.cli("show", run_id, "--json").stdout)
    assert shown["status"] == "running"  # and before touching the run record

    project.gate.touch()  # let the first process finish
    assert live.finish() == 0, live.stderr()
    assert live.events[-1]["status"] == "succeeded"
    resumed = project.run_json("resume", run_id)
    assert not of_type(resumed, "step.started")
    assert project.executions() == Counter({"first": 1, "aside": 1, "long": 1, "last": 1})


# --- kill -9 ----------------------------------------------------------------------------


def _forty_steps() -> tuple[str, list[str]]:
    """A 40-step workflow: a root, four chains of five, a fan-out of 14 and its fan-in,
    and a tail of four joining everything."""
    steps: dict[str, list[str]] = {"root": []}
    for c in range(4):
        for j in range(5):
            steps[f"c{c}_{j}"] = ["root"] if j == 0 else [f"c{c}_{j - 1}"]
    for f in range(14):
        steps[f"fan{f}"] = ["root"]
    steps["merge"] = [f"fan{f}" for f in range(14)]
    steps["tail0"] = ["merge", "c0_4", "c1_4"]
    steps["tail1"] = ["tail0", "c2_4"]
    steps["tail2"] = ["tail1", "c3_4"]
    steps["tail3"] = ["tail2"]
    assert len(steps) == 40
    body = "\n".join(f"  {sid}: {py(sid, *deps, extra='pause: 0.004')}"
                     for sid, deps in steps.items())
    text = (
        "apiVersion: storyflow/v1\nname: forty\nsteps:\n" + body + "\n"
        "outputs:\n"
        '  end: "{{ steps.tail3.output }}"\n'
        '  all: "{{ [' + ", ".join(f"steps.{s}.output" for s in steps) + '] }}"\n'
    )
    return text, list(steps)


@pytest.mark.slow
def test_kill_9_then_resume_reruns_only_the_attempts_in_flight(project: Project) -> None:
    text, ids = _forty_steps()
    wf = project.workflow(text)
    reference_log = project.root / "reference.log"
    ref = project.run_json("run", wf, state=project.root / "ref-state",
                           env={"SF_EXEC_LOG": str(reference_log)})
    assert project.executions(reference_log) == Counter(dict.fromkeys(ids, 1))
    expected = ref[-1]["outputs"]
    expected_steps = {s["id"]: s["output"] for s in
                      project.show(ref[0]["run_id"], state=project.root / "ref-state")["steps"]}

    rng = random.Random(0x5EED)
    for trial in range(5):
        kill_after = rng.randint(1, 60)
        state = project.root / f"state-{trial}"
        log = project.root / f"exec-{trial}.log"
        env = {"SF_EXEC_LOG": str(log)}
        where = f"trial {trial}, kill after {kill_after} step.succeeded"
        live = project.live("run", wf, "--json", state=state, env=env)
        run_id = live.wait_for(lambda e: e["type"] == "run.started")["run_id"]
        seen = 0
        while seen < kill_after:
            event = live.next_event()
            if event is None:
                break  # the run finished first: resume must then run nothing
            seen += event["type"] == "step.succeeded"
        live.proc.kill()
        live.proc.wait(timeout=CLI_TIMEOUT_S)
        succeeded_before = {e["step"] for e in of_type(live.events, "step.succeeded")}
        live.close()

        result = project.cli("resume", run_id, "--json", state=state, env=env)
        assert result.returncode == 0, (where, result.stdout, result.stderr)
        resumed = parse_events(result.stdout)
        assert resumed[-1]["status"] == "succeeded", where
        assert succeeded_before <= {e["step"] for e in of_type(resumed, "step.kept")}, where
        counts = project.executions(log)
        assert set(counts) == set(ids), where
        twice = {s: n for s, n in counts.items() if n > 1}
        assert not twice.keys() & succeeded_before, (where, twice)
        assert all(n <= 2 for n in counts.values()), (where, twice)
        assert resumed[-1]["outputs"] == expected, where
        got = {s["id"]: s["output"] for s in project.show(run_id, state=state)["steps"]}
        assert got == expected_steps, where


# --- errors a user sees --------------------------------------------------------------------


def test_invalid_workflow_exits_2_with_location_and_no_traceback(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: broken
        steps:
          a: {uses: template, with: {template: hi}, retyr: {attempts: 2}}
        """)
    result = project.cli("run", wf)
    assert result.returncode == 2
    assert re.search(r"workflow\.yaml:4:\d+: error: .*retyr", result.stderr), result.stderr
    assert "retry" in result.stderr  # did you mean
    assert "Traceback" not in result.stderr + result.stdout
    assert not project.state.exists() or project.runs() == []


def test_bad_inputs_exit_2_naming_the_input(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: inputs
        inputs:
          sections: {type: integer, default: 3}
        steps:
          a: {uses: template, with: {template: "{{ inputs.sections }}"}}
        """)
    unknown = project.cli("run", wf, "-i", "unknown=1")
    assert unknown.returncode == 2 and "unknown" in unknown.stderr
    typed = project.cli("run", wf, "-i", "sections=abc")
    assert typed.returncode == 2 and "sections" in typed.stderr
    for result in (unknown, typed):
        assert "Traceback" not in result.stderr
    assert project.runs() == []


def test_run_references_that_do_not_resolve_exit_2(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: refs
        steps:
          a: {uses: template, with: {template: "hello"}}
        outputs:
          greeting: "{{ steps.a.output }}"
        """)
    for rid in ("tale-1", "tale-2"):
        assert project.cli("run", wf, "--run-id", rid).returncode == 0
    checks = {
        "unknown run": (project.cli("resume", "nosuchrun"), "nosuchrun"),
        "ambiguous prefix": (project.cli("resume", "tale"), "tale-1"),
        "show unknown step": (project.cli("show", "tale-1", "--step", "b"), "'b'"),
        "show unknown output": (project.cli("show", "tale-1", "--output", "farewell"),
                                "farewell"),
        "reused --run-id": (project.cli("run", wf, "--run-id", "tale-2"), "tale-2"),
    }
    for what, (result, named) in checks.items():
        assert result.returncode == 2, (what, result.stdout, result.stderr)
        assert named in result.stderr, (what, result.stderr)
        assert "Traceback" not in result.stderr, what
    assert project.cli("show", "tale-1", "--output", "greeting").stdout == "hello\n"
    assert sorted(r["run_id"] for r in project.runs()) == ["tale-1", "tale-2"]


def test_run_id_cannot_leave_the_state_directory(project: Project) -> None:
    wf = project.workflow("""
        apiVersion: storyflow/v1
        name: escape
        steps:
          a: {uses: template, with: {template: "hello"}}
        """)
    result = project.cli("run", wf, "--run-id", "../../escaped")
    assert not (project.root / "escaped").exists()
    assert result.returncode == 2, result.stderr


# --- dry run, logs ----------------------------------------------------------------------------


def test_dry_run_runs_nothing(project: Project) -> None:
    wf = project.workflow(CHAIN)
    result = project.cli("run", wf, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "outline" in result.stdout and "story" in result.stdout
    assert project.executions() == Counter()
    assert project.runs() == []


def test_logs_prints_plain_lines_and_follow_ends_on_a_finished_run(project: Project) -> None:
    wf = project.workflow(CHAIN)
    run_id = project.run_json("run", wf)[0]["run_id"]
    colour = {"NO_COLOR": None, "FORCE_COLOR": "1", "TERM": "xterm-256color"}
    plain = project.cli("logs", run_id, env=colour)
    assert plain.returncode == 0, plain.stderr
    assert "\x1b" not in plain.stdout
    lines = plain.stdout.splitlines()
    assert len(lines) == len(parse_events(
        (project.state / "runs" / run_id / "events.jsonl").read_text(encoding="utf-8")))
    assert any("outline" in line for line in lines) and "summary: succeeded" in lines[-1]

    followed = project.cli("logs", run_id, "--follow", env=colour, timeout=30)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == plain.stdout

    only = project.cli("logs", run_id, "--step", "draft", "--json")
    assert only.returncode == 0
    assert {e.get("step") for e in parse_events(only.stdout)} == {None, "draft"}


# --- secrets ----------------------------------------------------------------------------------


SECRETIVE = """
apiVersion: storyflow/v1
name: secretive
agents:
  keeper:
    uses: python
    secrets: [MY_TOKEN]
steps:
  peek:
    agent: keeper
    with: {callable: "agents:leak", me: peek, token: "{{ secrets.MY_TOKEN }}"}%(cache)s
  echo: {uses: python, with: {callable: "agents:step", me: echo, deps: ["{{ steps.peek.output }}"]}}
%(extra)soutputs:
  seen: "{{ steps.peek.output }}"
artifacts:
  seen.txt: "{{ steps.peek.output }}"
"""


def test_secret_values_are_redacted_from_events_show_and_stdout(project: Project) -> None:
    wf = project.workflow(SECRETIVE % {"cache": "", "extra": ""})
    env = {"MY_TOKEN": SECRET}
    result = project.cli("run", wf, "--json", env=env)
    assert result.returncode == 0, result.stderr
    events = parse_events(result.stdout)
    run_id = events[0]["run_id"]
    assert SECRET not in result.stdout + result.stderr
    assert events[-1]["outputs"]["seen"] == "peek saw token=***"
    run_dir = project.state / "runs" / run_id
    assert SECRET not in (run_dir / "events.jsonl").read_text(encoding="utf-8")
    assert SECRET not in (run_dir / "seen.txt").read_text(encoding="utf-8")
    shown = project.cli("show", run_id, "--json", env=env)
    assert shown.returncode == 0
    assert SECRET not in shown.stdout
    assert steps_of(json.loads(shown.stdout))["peek"]["output"] == "peek saw token=***"
    logs = project.cli("logs", run_id, env=env)
    assert SECRET not in logs.stdout
    for path in project.state.rglob("*"):  # nor in the store's checkpoints
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_secret_values_are_redacted_from_the_output_cache(project: Project) -> None:
    wf = project.workflow(SECRETIVE % {"cache": "\n    cache: true", "extra": ""})
    result = project.cli("run", wf, "--json", env={"MY_TOKEN": SECRET})
    assert result.returncode == 0, result.stderr
    leaked = [p for p in project.state.rglob("*")
              if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_resume_reruns_a_secret_bearing_step_and_keeps_its_dependents(
        project: Project) -> None:
    # The checkpoint holds only the redacted output, which cannot stand in for the real
    # one: `peek` runs again, and `echo`, whose inputs come out the same, is kept.
    late = f"  late: {py('late', 'echo', fn='broken')}\n"
    wf = project.workflow(SECRETIVE % {"cache": "", "extra": late})
    env = {"MY_TOKEN": SECRET}
    run_id = project.run_json("run", wf, code=1, env=env)[0]["run_id"]
    project.edit_agents(BROKEN_BODY, FIXED_BODY)
    resumed = project.run_json("resume", run_id, env=env)
    assert {e["step"] for e in of_type(resumed, "step.kept")} == {"echo"}
    assert project.executions() == Counter({"peek": 2, "echo": 1, "late": 2})


def test_resume_plan_matches_what_is_kept_when_an_output_was_redacted(
        project: Project) -> None:
    late = f"  late: {py('late', 'echo', fn='broken')}\n"
    wf = project.workflow(SECRETIVE % {"cache": "", "extra": late})
    env = {"MY_TOKEN": SECRET}
    run_id = project.run_json("run", wf, code=1, env=env)[0]["run_id"]
    project.edit_agents(BROKEN_BODY, FIXED_BODY)
    resumed = project.run_json("resume", run_id, env=env)
    planned = resumed[0]
    assert planned["type"] == "run.resumed"
    actually_kept = {e["step"] for e in of_type(resumed, "step.kept")}
    assert set(planned["kept"]) == actually_kept
    assert set(planned["rerun"]) == {e["step"] for e in of_type(resumed, "step.started")}


# --- stdout closed by the reader ---------------------------------------------------------------


def test_a_closed_stdout_does_not_crash_the_run(project: Project) -> None:
    wf = project.workflow(SIGNALLED)
    stderr_path = project.root / "stderr-epipe.txt"
    with stderr_path.open("w", encoding="utf-8") as stderr:
        proc = subprocess.Popen(
            project.argv("run", wf, "--json"), cwd=project.root,
            env=project.env({"SF_SLOW": "1"}), stdout=subprocess.PIPE, stderr=stderr,
            text=True, encoding="utf-8",
        )
        try:
            started = threading.Event()
            run_ids: list[str] = []

            def read() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    event = json.loads(line)
                    run_ids.append(event["run_id"])
                    if event["type"] == "step.started" and event["step"] == "long":
                        started.set()
                        return

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert started.wait(CLI_TIMEOUT_S), "`long` never started"
            reader.join(CLI_TIMEOUT_S)
            assert proc.stdout is not None
            proc.stdout.close()  # the reader is gone: the next write gets EPIPE
            project.gate.touch()
            proc.wait(timeout=CLI_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=CLI_TIMEOUT_S)
    assert "Traceback" not in stderr_path.read_text(encoding="utf-8")
    assert project.show(run_ids[0])["status"] != "running"
    assert project.cli("resume", run_ids[0]).returncode == 0


def test_a_skipped_root_settles_its_dependents_once(
    cli: Any, write_workflow: Any
) -> None:
    wf = write_workflow("""\
apiVersion: storyflow/v1
name: skip-root
steps:
  a: {uses: template, with: {template: "A"}, when: "false"}
  b: {uses: template, with: {template: "B {{ steps.a.output }}"}}
  c: {uses: template, with: {template: "C"}, needs: [a], join: all_done}
""")
    result = cli("run", wf, "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    skipped = [e["step"] for e in events if e["type"] == "step.skipped"]
    assert skipped == ["a", "b"]
    assert [e["step"] for e in events if e["type"] == "step.succeeded"] == ["c"]


def test_a_timed_out_sync_callable_does_not_hold_the_exit(
    cli: Any, write_workflow: Any, tmp_path: Path
) -> None:
    """Its worker thread cannot be stopped; the process leaves without waiting for it
    (the thread would sleep far past the test's subprocess timeout)."""
    (tmp_path / "sleepy.py").write_text(
        "import time\n\ndef nap(s):\n    time.sleep(s)\n    return s\n", encoding="utf-8"
    )
    wf = write_workflow(f"""\
apiVersion: storyflow/v1
name: sleepy
steps:
  nap:
    uses: python
    with: {{callable: "sleepy:nap", s: {CLI_TIMEOUT_S * 10}}}
    timeout: 0.2s
    retry: {{attempts: 1}}
""")
    result = cli("run", wf, "--no-progress")
    assert result.returncode == 1
    assert "timed out after 0.2s" in result.stdout


def test_show_logs_and_report_take_last(cli: Any, minimal_workflow: Path) -> None:
    assert cli("show", "--last").returncode == 2  # no runs yet: a message, not a crash
    run_id = json.loads(cli("run", minimal_workflow, "--json").stdout.splitlines()[0])["run_id"]
    shown = cli("show", "--last", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["run_id"] == run_id
    logs = cli("logs", "--last")
    assert logs.returncode == 0 and "run.succeeded" in logs.stdout
    both = cli("show", run_id, "--last")
    assert both.returncode == 2 and "not both" in both.stderr
    neither = cli("logs")
    assert neither.returncode == 2 and "--last" in neither.stderr
