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
