"""`for_each` maps: one instance per item, the output the list of item outputs.

Most tests drive the real `Runner` and `Store` in-process with async python agents
(a module written into a temporary folder) that record executions and how many items
run at once; a few drive the command line. Every event is validated against
``schemas/events.schema.json``, every ``show --json`` document against
``schemas/show.schema.json``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli_env, new_run_record
from storyflow.agents.registry import kinds
from storyflow.engine.plan import Plan, plan
from storyflow.engine.runner import Options, Result, Runner
from storyflow.events import RunStatus
from storyflow.spec import load_workflow
from storyflow.spec.model import Workflow
from storyflow.store import RunRecord, Store

REPO = Path(__file__).resolve().parents[1]
EVENTS = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas" / "events.schema.json").read_text(encoding="utf-8"))
)
SHOW = jsonschema.Draft202012Validator(
    json.loads((REPO / "schemas" / "show.schema.json").read_text(encoding="utf-8"))
)
MODULE = "sf_maps_agents"
AGENTS = '''\
import asyncio
from collections import Counter

EXECUTIONS = Counter()
FAIL = set()
STATE = {"running": 0, "peak": 0}
ORDER = []


async def work(me, item=None, index=None, previous=None, delay=0.0):
    EXECUTIONS[me] += 1
    STATE["running"] += 1
    STATE["peak"] = max(STATE["peak"], STATE["running"])
    ORDER.append(("start", me))
    try:
        await asyncio.sleep(delay)
    finally:
        STATE["running"] -= 1
        ORDER.append(("end", me))
    if me in FAIL:
        raise ValueError(f"boom in {me}")
    return {"me": me, "item": item, "index": index, "previous": previous}


async def sections(n=3):
    EXECUTIONS["sections"] += 1
    return [f"s{i}" for i in range(n)]
'''
RUN_ID = "20250101-000000-ma9s00"


def agents() -> Any:
    return sys.modules[MODULE]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("maps")
    (folder / f"{MODULE}.py").write_text(AGENTS, encoding="utf-8")
    sys.path.insert(0, str(folder))
    __import__(MODULE)
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


@pytest.fixture(autouse=True)
def fresh_agents(workdir: Path) -> None:
    mod = agents()
    mod.EXECUTIONS.clear()
    mod.FAIL.clear()
    mod.ORDER.clear()
    mod.STATE.update(running=0, peak=0)


def compile_workflow(folder: Path, text: str) -> tuple[Workflow, Plan]:
    path = folder / "maps.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    wf = load_workflow(path, kinds=kinds())
    return wf, plan(wf)


def new_run(store: Store, wf: Workflow, compiled: Plan) -> RunRecord:
    record: RunRecord = new_run_record(store, wf, compiled, run_id=RUN_ID)
    return record


def execute(wf: Workflow, compiled: Plan, store: Store, record: RunRecord,
            events: list[dict[str, Any]], **options: Any) -> Result:
    def sink(event: dict[str, Any]) -> None:
        errors = list(EVENTS.iter_errors(event))
        assert not errors, (errors[0].message, event)
        events.append(event)

    runner = Runner(wf, compiled, store, record, sink, Options(**options))
    return asyncio.run(runner.execute())


def run_once(folder: Path, text: str, **options: Any) -> tuple[Result, list[dict[str, Any]]]:
    wf, compiled = compile_workflow(folder, text)
    events: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp)) as store:
        result = execute(wf, compiled, store, new_run(store, wf, compiled), events, **options)
    return result, events


def steps_of(events: list[dict[str, Any]], type_: str) -> list[str]:
    return [e["step"] for e in events if e["type"] == type_]


def map_workflow(items: Any, *, extra: str = "", with_extra: str = "") -> str:
    return f"""
    apiVersion: storyflow/v1
    name: maps
    steps:
      draft:
        uses: python
        for_each: {json.dumps(items)}
        {extra}
        with:
          callable: "{MODULE}:work"
          me: "d{{{{ index }}}}"
          item: "{{{{ item }}}}"
          index: "{{{{ index }}}}"
          {with_extra}
    outputs:
      all: "{{{{ steps.draft.output }}}}"
    """


# --- outputs and order --------------------------------------------------------------


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    delays=st.lists(st.sampled_from([0.0, 0.0005, 0.001, 0.002, 0.004]), max_size=9),
    limit=st.one_of(st.none(), st.integers(1, 4)),
    run_limit=st.integers(1, 6),
)
def test_outputs_are_in_item_order_whatever_the_completion_order(
        workdir: Path, delays: list[float], limit: int | None, run_limit: int) -> None:
    agents().STATE.update(running=0, peak=0)
    items = [{"n": i, "d": d} for i, d in enumerate(delays)]
    extra = f"max_parallel: {limit}" if limit is not None else ""
    result, events = run_once(
        workdir, map_workflow(items, extra=extra, with_extra='delay: "{{ item.d }}"'),
        max_parallel=run_limit,
    )
    assert result.status is RunStatus.SUCCEEDED, result
    out = result.outputs["all"]
    assert [o["item"] for o in out] == items
    assert [o["index"] for o in out] == list(range(len(items)))
    assert agents().STATE["peak"] <= min(limit or run_limit, run_limit)
    assert steps_of(events, "step.succeeded")[-1] == "draft"
    assert sorted(steps_of(events, "step.succeeded")[:-1]) == sorted(
        f"draft[{i}]" for i in range(len(items)))


def test_max_parallel_bounds_the_items_running_at_once(workdir: Path) -> None:
    items = list(range(8))
    result, _ = run_once(workdir, map_workflow(items, extra="max_parallel: 2",
                                               with_extra="delay: 0.005"), max_parallel=8)
    assert result.status is RunStatus.SUCCEEDED
    assert agents().STATE["peak"] == 2
    assert [o["item"] for o in result.outputs["all"]] == items


def test_as_names_the_item_and_index_is_in_scope(workdir: Path) -> None:
    text = f"""
    apiVersion: storyflow/v1
    name: maps
    steps:
      plot:
        uses: python
        with: {{callable: "{MODULE}:sections", n: 3}}
      scene:
        uses: python
        for_each: steps.plot.output
        as: section
        with:
          callable: "{MODULE}:work"
          me: "{{{{ section }}}}-{{{{ index }}}}"
          item: "{{{{ section }}}}"
          index: "{{{{ index }}}}"
      after:
        uses: template
        with: {{template: "{{{{ steps.scene.output | length }}}} scenes"}}
    outputs:
      scenes: "{{{{ steps.scene.output }}}}"
      after: "{{{{ steps.after.output }}}}"
    """
    result, events = run_once(workdir, text)
    assert result.status is RunStatus.SUCCEEDED, result
    assert [(o["me"], o["item"], o["index"]) for o in result.outputs["scenes"]] == [
        ("s0-0", "s0", 0), ("s1-1", "s1", 1), ("s2-2", "s2", 2)]
    assert result.outputs["after"] == "3 scenes"
    started = steps_of(events, "step.started")
    assert started[0] == "plot" and started[1] == "scene"
    assert set(started[2:5]) == {"scene[0]", "scene[1]", "scene[2]"}
    assert steps_of(events, "step.succeeded")[-2:] == ["scene", "after"]


def test_previous_runs_the_items_in_order_with_the_prior_output(workdir: Path) -> None:
    items = ["a", "b", "c", "d"]
    text = map_workflow(items, with_extra='previous: "{{ previous }}"\n          delay: 0.001')
    wf, _ = compile_workflow(workdir, text)
    assert wf.step("draft").sequential
    result, _ = run_once(workdir, text, max_parallel=8)
    assert result.status is RunStatus.SUCCEEDED, result
    out = result.outputs["all"]
    assert out[0]["previous"] is None
    for i in range(1, len(items)):
        assert out[i]["previous"] == out[i - 1]
    assert agents().STATE["peak"] == 1
    assert agents().ORDER == [(kind, f"d{i}") for i in range(4) for kind in ("start", "end")]


def test_an_empty_list_gives_an_empty_output(workdir: Path) -> None:
    result, events = run_once(workdir, map_workflow([]))
    assert result.status is RunStatus.SUCCEEDED
    assert result.outputs["all"] == []
    assert steps_of(events, "step.started") == ["draft"]
    assert steps_of(events, "step.succeeded") == ["draft"]
    assert not agents().EXECUTIONS


def test_for_each_that_is_not_a_list_fails_the_step(workdir: Path) -> None:
    result, events = run_once(workdir, map_workflow("1 + 1"))
    assert result.status is RunStatus.FAILED
    assert "not a list" in (result.error or {})["message"]
    assert steps_of(events, "step.failed") == ["draft"]


def test_when_is_evaluated_once_for_the_whole_map(workdir: Path) -> None:
    result, events = run_once(workdir, map_workflow([1, 2], extra="when: false"))
    assert result.status is RunStatus.SUCCEEDED
    assert steps_of(events, "step.skipped") == ["draft"]
    assert not agents().EXECUTIONS


def test_one_failing_item_fails_the_map_after_the_others_finish(workdir: Path) -> None:
    agents().FAIL.add("d1")
    result, events = run_once(workdir, map_workflow([0, 1, 2, 3], extra="max_parallel: 2",
                                                   with_extra="delay: 0.002"))
    assert result.status is RunStatus.FAILED
    assert "draft" in (result.error or {})["message"]
    assert "boom in d1" in (result.error or {})["message"]
    assert agents().EXECUTIONS == Counter({"d0": 1, "d1": 1, "d2": 1, "d3": 1})
    assert steps_of(events, "step.failed") == ["draft[1]", "draft"]
    last = [e for e in events if e["type"].startswith("step.")][-1]
    assert last["type"] == "step.failed" and last["step"] == "draft"


def test_allow_failure_lets_the_run_succeed_with_the_failed_item_as_null(
        workdir: Path) -> None:
    agents().FAIL.add("d0")
    result, _ = run_once(workdir, map_workflow([0, 1], extra="allow_failure: true"))
    assert result.status is RunStatus.SUCCEEDED, result
    out = result.outputs["all"]
    assert out[0] is None and out[1]["item"] == 1


def test_resume_after_a_failure_reruns_only_the_failed_item(workdir: Path) -> None:
    text = map_workflow(["a", "b", "c"])
    wf, compiled = compile_workflow(workdir, text)
    agents().FAIL.add("d1")
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp)) as store:
        record = new_run(store, wf, compiled)
        first: list[dict[str, Any]] = []
        result = execute(wf, compiled, store, record, first)
        assert result.status is RunStatus.FAILED
        assert store.get_steps(RUN_ID, ["draft"])["draft"].meta["items"] == 3

        agents().FAIL.clear()
        previous = store.get_steps(RUN_ID, compiled.order)
        second: list[dict[str, Any]] = []
        result = execute(wf, compiled, store, record, second, previous=previous)
        assert result.status is RunStatus.SUCCEEDED, result
        assert agents().EXECUTIONS == Counter({"d0": 1, "d1": 2, "d2": 1})
        assert steps_of(second, "step.kept") == ["draft[0]", "draft[2]"]
        assert [o["item"] for o in result.outputs["all"]] == ["a", "b", "c"]

        # A third process keeps every item; --from the map re-runs them all.
        third: list[dict[str, Any]] = []
        previous = store.get_steps(RUN_ID, compiled.order)
        execute(wf, compiled, store, record, third, previous=previous)
        assert agents().EXECUTIONS == Counter({"d0": 1, "d1": 2, "d2": 1})
        execute(wf, compiled, store, record, [], previous=previous,
                forced=frozenset({"draft"}))
        assert agents().EXECUTIONS == Counter({"d0": 2, "d1": 3, "d2": 2})


def test_sequential_resume_keeps_the_items_before_the_failure(workdir: Path) -> None:
    text = map_workflow(["a", "b", "c"], with_extra='previous: "{{ previous }}"')
    wf, compiled = compile_workflow(workdir, text)
    agents().FAIL.add("d1")
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp)) as store:
        record = new_run(store, wf, compiled)
        assert execute(wf, compiled, store, record, []).status is RunStatus.FAILED
        agents().FAIL.clear()
        previous = store.get_steps(RUN_ID, compiled.order)
        result = execute(wf, compiled, store, record, [], previous=previous)
        assert result.status is RunStatus.SUCCEEDED, result
        # d2 ran after the failed d1 the first time; d1's output changed, so it re-runs.
        assert agents().EXECUTIONS == Counter({"d0": 1, "d1": 2, "d2": 2})
        out = result.outputs["all"]
        assert out[2]["previous"] == out[1]


def test_many_items_under_a_small_run_limit(workdir: Path) -> None:
    items = list(range(200))
    result, _ = run_once(workdir, map_workflow(items), max_parallel=3)
    assert result.status is RunStatus.SUCCEEDED
    assert [o["item"] for o in result.outputs["all"]] == items
    assert result.counts == {"succeeded": 201}
    assert agents().STATE["peak"] <= 3


# --- the command line -------------------------------------------------------------------


CLI_AGENTS = '''\
import os


def item(me, value):
    with open(os.environ["SF_EXEC_LOG"], "a", encoding="utf-8") as f:
        f.write(me + "\\n")
    if os.path.exists(os.environ["SF_FAIL"]) and me == "d1":
        raise ValueError("boom in " + me)
    return f"{me}={value}"
'''


def _cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    import subprocess

    env = cli_env(tmp_path / "state", {
        "SF_EXEC_LOG": str(tmp_path / "exec.log"),
        "SF_FAIL": str(tmp_path / "fail"),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    proc = subprocess.run([sys.executable, "-m", "storyflow", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=60,
                          check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _events(stdout: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for event in events:
        errors = list(EVENTS.iter_errors(event))
        assert not errors, (errors[0].message, event)
    return events


def test_cli_run_show_and_resume_of_a_map(tmp_path: Path) -> None:
    (tmp_path / "cli_map_agents.py").write_text(CLI_AGENTS, encoding="utf-8")
    (tmp_path / "fail").write_text("", encoding="utf-8")
    (tmp_path / "wf.yaml").write_text(textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: climap
        steps:
          draft:
            uses: python
            for_each: [x, y, z]
            max_parallel: 2
            with: {callable: "cli_map_agents:item", me: "d{{ index }}", value: "{{ item }}"}
          join:
            uses: template
            with: {template: "{{ steps.draft.output | join(',') }}"}
        outputs:
          joined: "{{ steps.join.output }}"
        """), encoding="utf-8")
    code, out, err = _cli(tmp_path, "run", "wf.yaml", "--json")
    assert code == 1, (out, err)
    events = _events(out)
    run_id = events[0]["run_id"]
    assert [e["step"] for e in events if e["type"] == "step.failed"] == ["draft[1]", "draft"]
    assert events[-1]["steps"]["failed"] == 1  # the map, a top-level step
    assert events[-1]["instances"]["failed"] == 2  # the map and its item

    code, out, err = _cli(tmp_path, "show", run_id, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert not list(SHOW.iter_errors(doc))
    assert [(s["id"], s["status"]) for s in doc["steps"]] == [
        ("draft", "failed"), ("draft[0]", "succeeded"), ("draft[1]", "failed"),
        ("draft[2]", "succeeded"), ("join", "skipped")]
    code, out, err = _cli(tmp_path, "show", run_id, "--step", "draft[2]", "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == "d2=z"

    (tmp_path / "fail").unlink()
    code, out, err = _cli(tmp_path, "resume", run_id, "--json")
    assert code == 0, (out, err)
    events = _events(out)
    assert sorted(e["step"] for e in events if e["type"] == "step.kept") == [
        "draft[0]", "draft[2]"]
    assert events[-1]["outputs"] == {"joined": "d0=x,d1=y,d2=z"}
    runs = Counter((tmp_path / "exec.log").read_text(encoding="utf-8").splitlines())
    assert runs == Counter({"d0": 1, "d1": 2, "d2": 1})
    code, out, err = _cli(tmp_path, "show", run_id, "--json")
    doc = json.loads(out)
    assert not list(SHOW.iter_errors(doc))
    assert all(s["status"] == "succeeded" for s in doc["steps"])
    assert doc["steps"][0]["output"] == ["d0=x", "d1=y", "d2=z"]


def test_an_interrupted_map_is_cancelled_and_resume_finishes_it(workdir: Path) -> None:
    text = map_workflow(["a", "b", "c", "d"], extra="max_parallel: 2",
                        with_extra="delay: 0.05")
    wf, compiled = compile_workflow(workdir, text)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp)) as store:
        record = new_run(store, wf, compiled)
        events: list[dict[str, Any]] = []
        runner = Runner(wf, compiled, store, record, events.append, Options())

        async def main() -> Result:
            asyncio.get_running_loop().call_later(0.02, runner.interrupt, 2)
            return await runner.execute()

        result = asyncio.run(main())
        assert result.status is RunStatus.INTERRUPTED
        for event in events:
            assert not list(EVENTS.iter_errors(event))
        assert sorted(steps_of(events, "step.cancelled")) == ["draft", "draft[0]", "draft[1]"]
        recs = store.get_steps(RUN_ID, ["draft", "draft[0]", "draft[1]", "draft[2]"])
        assert recs["draft"].status == "cancelled" and recs["draft"].meta["items"] == 4
        assert "draft[2]" not in recs  # never made ready: still pending

        previous = store.get_steps(RUN_ID, compiled.order)
        result = execute(wf, compiled, store, record, [], previous=previous)
        assert result.status is RunStatus.SUCCEEDED, result
        assert [o["item"] for o in result.outputs["all"]] == ["a", "b", "c", "d"]
