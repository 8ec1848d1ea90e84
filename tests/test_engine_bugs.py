"""An exception from the engine's own code during an attempt fails that step, clearly,
and the run goes on to its end (it never stays `running`)."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import new_run_record
from storyflow.agents.registry import kinds
from storyflow.engine.attempts import Attempts
from storyflow.engine.plan import plan
from storyflow.engine.runner import Options, Runner
from storyflow.events import RunStatus
from storyflow.spec import load_workflow
from storyflow.store import Store


def test_a_bug_inside_an_attempt_fails_that_step_and_the_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: bug
        steps:
          a: {uses: template, with: {template: "a"}}
          b: {uses: template, with: {template: "b"}}
          after: {needs: [b], uses: template, with: {template: "after"}}
    """), encoding="utf-8")
    real = Attempts._serve

    async def broken(self: Attempts, inst: Any, *args: Any, **kw: Any) -> Any:
        if inst.id == "b":
            raise RuntimeError("a bug in the engine")
        return await real(self, inst, *args, **kw)

    monkeypatch.setattr(Attempts, "_serve", broken)
    wf = load_workflow(path, kinds=kinds())
    compiled = plan(wf)
    events: list[dict[str, Any]] = []
    with Store(tmp_path / "state") as store:
        record = new_run_record(store, wf, compiled)
        runner = Runner(wf, compiled, store, record, events.append, Options())
        result = asyncio.run(runner.execute())
        steps = store.get_steps(record.run_id, ["a", "b", "after"])
    assert result.status is RunStatus.FAILED
    assert steps["a"].status == "succeeded"
    assert steps["b"].status == "failed"
    assert steps["b"].error is not None
    assert steps["b"].error["message"] == "internal error: RuntimeError: a bug in the engine"
    assert "report it" in steps["b"].error["hint"]
    assert steps["after"].status == "skipped"
    failed = [e for e in events if e["type"] == "step.failed"]
    assert [e["step"] for e in failed] == ["b"]


def test_a_finished_step_lets_its_task_go(tmp_path: Path) -> None:
    """A done task keeps its coroutine (~0.7 KB): held per step, 10,000 steps kept ~7 MB
    alive to the end of the run."""
    import gc
    import weakref

    lines = ["apiVersion: storyflow/v1", "name: many", "steps:"]
    lines += [f'  s{i}: {{uses: template, with: {{template: "{i}"}}}}' for i in range(30)]
    path = tmp_path / "wf.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    wf = load_workflow(path, kinds=kinds())
    compiled = plan(wf)
    seen: list[weakref.ref[Any]] = []
    real = Runner._launch

    def launch(self: Runner, inst: Any, prepared: Any) -> None:
        real(self, inst, prepared)
        seen.append(weakref.ref(inst.task))

    with Store(tmp_path / "state") as store:
        record = new_run_record(store, wf, compiled)
        runner = Runner(wf, compiled, store, record, lambda e: None, Options())
        runner._launch = launch.__get__(runner)  # type: ignore[method-assign]
        result = asyncio.run(runner.execute())
        gc.collect()
        assert result.status is RunStatus.SUCCEEDED
        assert len(seen) == 30
        assert all(inst.task is None for inst in runner.insts.values())
        assert [ref for ref in seen if ref() is not None] == []


@pytest.mark.parametrize("where", ["prepare", "when"])
def test_a_bug_while_a_later_step_becomes_ready_fails_it_and_the_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Preparing a step (rendering its inputs, keeping, the cache) and evaluating its
    `when:` run in the scheduler once its needs settle. A bug raised there fails that
    step as an internal error; before, the instance was dropped unsettled and the run
    waited for it for ever."""
    from storyflow.engine.prepare import Preparer
    from storyflow.spec.templates import Templates

    path = tmp_path / "wf.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: bug
        steps:
          a: {uses: template, with: {template: "a"}}
          b:
            uses: template
            when: steps.a.output == 'a'
            with: {template: "b after {{ steps.a.output }}"}
          after: {needs: [b], uses: template, with: {template: "after"}}
          other: {needs: [a], uses: template, with: {template: "other"}}
    """), encoding="utf-8")
    real_prepare, real_evaluate = Preparer._prepare, Templates.evaluate

    def prepare(self: Preparer, inst: Any) -> Any:
        if inst.id == "b" and where == "prepare":
            raise RuntimeError("a bug in the engine")
        return real_prepare(self, inst)

    def evaluate(self: Templates, expr: Any, scope: Any) -> Any:
        if expr == "steps.a.output == 'a'" and where == "when":
            raise RuntimeError("a bug in the engine")
        return real_evaluate(self, expr, scope)

    monkeypatch.setattr(Preparer, "_prepare", prepare)
    monkeypatch.setattr(Templates, "evaluate", evaluate)
    wf = load_workflow(path, kinds=kinds())
    compiled = plan(wf)
    events: list[dict[str, Any]] = []
    with Store(tmp_path / "state") as store:
        record = new_run_record(store, wf, compiled)
        runner = Runner(wf, compiled, store, record, events.append, Options())
        # A guard against the hang this test is about, not a timing goal.
        result = asyncio.run(asyncio.wait_for(runner.execute(), 60))
        steps = store.get_steps(record.run_id, ["a", "b", "after", "other"])
    assert result.status is RunStatus.FAILED
    assert steps["a"].status == steps["other"].status == "succeeded"
    assert steps["b"].status == "failed"
    assert steps["b"].attempts == 0  # it never started: no attempt was made
    assert steps["b"].error is not None
    assert steps["b"].error["message"] == "internal error: RuntimeError: a bug in the engine"
    assert "report it" in steps["b"].error["hint"]
    assert steps["after"].status == "skipped"
    assert [e["step"] for e in events if e["type"] == "step.failed"] == ["b"]
