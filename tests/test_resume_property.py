"""Property: a run that crashes after any number of store commits, then resumes, ends
exactly as an uninterrupted run, and never re-executes a step whose success was committed.

In-process and fast: random DAGs of python (async) and template steps, each combining
its dependencies' outputs deterministically, run on the real `Runner` and `Store`. A
crash is simulated by making `Store.put_steps` raise `SimulatedCrash` (a `SystemExit`
subclass, so asyncio lets it out of the event loop at once, as a dying process would)
on the (K+1)-th commit; from then on nothing reaches the store or the event sink. The
resume is built like `storyflow resume` builds it: ``previous`` from the store,
``forced`` from the changed definitions (none here).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import new_run_record
from storyflow.agents.registry import kinds
from storyflow.engine.plan import Plan, plan
from storyflow.engine.runner import Options, Result, Runner
from storyflow.events import RunStatus
from storyflow.spec import load_workflow
from storyflow.spec.model import Workflow
from storyflow.store import RunRecord, Store

MODULE = "sf_resume_prop_agents"
AGENTS = '''\
import hashlib
import json
from collections import Counter

EXECUTIONS = Counter()


async def combine(me, deps=()):
    EXECUTIONS[me] += 1
    text = json.dumps([me, sorted(deps)])
    return me + ":" + hashlib.sha256(text.encode()).hexdigest()[:12]
'''
RUN_ID = "20250101-000000-c0ffee"


class SimulatedCrash(SystemExit):
    """The process dies here: escapes the event loop, nothing after it is written."""


@dataclass(frozen=True)
class Dag:
    kinds: tuple[str, ...]
    """``python`` or ``template`` per step."""
    deps: tuple[tuple[int, ...], ...]
    """Data dependencies (earlier steps) per step."""
    needs: tuple[tuple[int, ...], ...]
    """Ordering-only dependencies per step."""
    max_parallel: int
    crash_after: int
    """Commits that succeed before the crash."""

    def yaml(self) -> str:
        lines = ["apiVersion: storyflow/v1", "name: prop", "steps:"]
        for i, (kind, deps, needs) in enumerate(zip(self.kinds, self.deps, self.needs,
                                                     strict=True)):
            me = f"s{i}"
            if kind == "python":
                refs = ", ".join(f'"{{{{ steps.s{d}.output }}}}"' for d in deps)
                call = f'callable: "{MODULE}:combine", me: {me}, deps: [{refs}]'
                body = f"uses: python, with: {{{call}}}"
            else:
                refs = "|".join(f"{{{{ steps.s{d}.output[:16] }}}}" for d in deps)
                body = f'uses: template, with: {{template: "{me}<{refs}>"}}'
            if needs:
                body += ", needs: [" + ", ".join(f"s{n}" for n in needs) + "]"
            lines.append(f"  {me}: {{{body}}}")
        lines.append("outputs:")
        every = ", ".join(f"steps.s{i}.output" for i in range(len(self.kinds)))
        lines.append(f'  all: "{{{{ [{every}] }}}}"')
        return "\n".join(lines) + "\n"


@st.composite
def dags(draw: st.DrawFn) -> Dag:
    n = draw(st.integers(5, 25))
    kinds_, deps, needs = [], [], []
    for i in range(n):
        kinds_.append(draw(st.sampled_from(["python", "python", "template"])))
        earlier = st.integers(0, i - 1) if i else st.nothing()
        data = draw(st.lists(earlier, max_size=min(i, 3), unique=True)) if i else []
        order = draw(st.lists(earlier, max_size=min(i, 1), unique=True)) if i else []
        deps.append(tuple(sorted(data)))
        needs.append(tuple(x for x in order if x not in data))
    return Dag(tuple(kinds_), tuple(deps), tuple(needs),
               max_parallel=draw(st.integers(1, 6)),
               crash_after=draw(st.integers(0, 2 * n + 2)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("resume-property")
    (folder / f"{MODULE}.py").write_text(AGENTS, encoding="utf-8")
    yield folder
    sys.modules.pop(MODULE, None)


def executions() -> Counter[str]:
    """The agent module's execution counter (imported by the python agent on first use)."""
    module = sys.modules.get(MODULE)
    return Counter() if module is None else module.EXECUTIONS


def compile_workflow(folder: Path, dag: Dag) -> tuple[Workflow, Plan]:
    path = folder / "prop.yaml"
    path.write_text(dag.yaml(), encoding="utf-8")
    wf = load_workflow(path, kinds=kinds())
    return wf, plan(wf)


def new_run(store: Store, wf: Workflow, compiled: Plan) -> RunRecord:
    record: RunRecord = new_run_record(store, wf, compiled, run_id=RUN_ID)
    return record


def drive(runner: Runner) -> Result | None:
    """Run to the end on a fresh loop; None if the process 'died' (SimulatedCrash).

    After a crash the loop is drained (remaining tasks cancelled and run to their end)
    so nothing leaks into later examples; the crashed store refuses every write, so the
    drain cannot change what was committed.
    """
    loop = asyncio.new_event_loop()
    result: Result | None = None
    seen: list[asyncio.Task[Any]] = []

    def task_factory(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop)
        seen.append(task)
        return task

    loop.set_task_factory(task_factory)
    try:
        main = loop.create_task(runner.execute())
        try:
            result = loop.run_until_complete(main)
        except SimulatedCrash:
            result = None
        for _ in range(10_000):
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            try:
                loop.run_until_complete(asyncio.wait(pending))
            except SimulatedCrash:
                pass
        # Retrieve every task's exception: an unretrieved one is logged (with a traceback
        # formatted through `ast`) whenever the garbage collector gets to it.
        for task in seen:
            assert task.done()
            if not task.cancelled():
                task.exception()
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    return result


def outputs_of(store: Store, compiled: Plan) -> dict[str, Any]:
    return {sid: rec.output for sid, rec in store.get_steps(RUN_ID, compiled.order).items()}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(dag=dags())
def test_crash_at_any_commit_then_resume_matches_an_uninterrupted_run(
        workdir: Path, dag: Dag) -> None:
    wf, compiled = compile_workflow(workdir, dag)
    assert len(compiled) == len(dag.kinds)
    python_steps = {f"s{i}" for i, k in enumerate(dag.kinds) if k == "python"}

    with tempfile.TemporaryDirectory() as tmp:
        # A: uninterrupted
        with Store(Path(tmp) / "a") as store:
            runner = Runner(wf, compiled, store, new_run(store, wf, compiled), lambda e: None,
                            Options(max_parallel=dag.max_parallel))
            before = executions().copy()
            a = drive(runner)
            assert a is not None and a.status is RunStatus.SUCCEEDED, a
            ran = executions() - before
            assert ran == Counter(dict.fromkeys(python_steps, 1))
            outputs_a, steps_a = a.outputs, outputs_of(store, compiled)

        with Store(Path(tmp) / "b") as store:
            # B1: crash after `crash_after` commits
            real_put_steps = store.put_steps
            commits: list[list[dict[str, Any]]] = []
            crashed = False

            def put_steps(run_id: str, recs: Any) -> None:
                nonlocal crashed
                if crashed or len(commits) >= dag.crash_after:
                    crashed = True
                    raise SimulatedCrash(137)
                recs = list(recs)
                real_put_steps(run_id, recs)
                commits.append([r.to_dict() for r in recs])

            delivered: list[dict[str, Any]] = []

            def sink(event: dict[str, Any]) -> None:
                if not crashed:  # a dead process prints nothing
                    delivered.append(event)

            store.put_steps = put_steps  # type: ignore[method-assign]
            record = new_run(store, wf, compiled)
            before = executions().copy()
            first = drive(Runner(wf, compiled, store, record, sink,
                                 Options(max_parallel=dag.max_parallel)))
            ran_first = executions() - before
            store.put_steps = real_put_steps  # type: ignore[method-assign]
            assert crashed == (first is None)
            event("crashed mid-run" if crashed else "finished before the crash point")

            # what was committed stays committed, nothing after the crash was written
            previous = store.get_steps(RUN_ID, compiled.order)
            expected: dict[str, dict[str, Any]] = {}
            for batch in commits:
                for rec in batch:
                    expected[rec["id"]] = rec
            assert {sid: rec.to_dict() for sid, rec in previous.items()} == expected
            committed_ok = {sid for sid, rec in previous.items() if rec.status == "succeeded"}
            # an event never runs ahead of the checkpoint that backs it
            announced = {e["step"] for e in delivered if e["type"] == "step.succeeded"}
            assert announced <= committed_ok

            # B2: resume as `storyflow resume` does
            changed = [sid for sid in compiled.order if sid in previous
                       and previous[sid].meta.get("def") != compiled.nodes[sid].fingerprint]
            assert changed == []
            forced = compiled.downstream(changed)
            resumed_events: list[dict[str, Any]] = []
            before = executions().copy()
            b = drive(Runner(wf, compiled, store, record, resumed_events.append,
                             Options(max_parallel=dag.max_parallel, forced=frozenset(forced),
                                     previous=previous)))
            ran_again = executions() - before
            assert b is not None and b.status is RunStatus.SUCCEEDED, b
            assert b.outputs == outputs_a
            assert outputs_of(store, compiled) == steps_a

    # no step whose success was committed before the crash executed again
    started = {e["step"] for e in resumed_events if e["type"] == "step.started"}
    assert not started & committed_ok, (started & committed_ok, dag)
    assert not ran_again.keys() & committed_ok
    kept = {e["step"] for e in resumed_events if e["type"] == "step.kept"}
    assert kept == committed_ok
    # every python step ran at least once overall, at most once per process
    total = ran_first + ran_again
    assert set(total) == python_steps
    assert all(n <= 2 for n in total.values()), total
    assert all(ran_first[s] == 1 for s in committed_ok & python_steps)


def test_the_generated_workflows_have_the_intended_shape(workdir: Path) -> None:
    dag = Dag(kinds=("python", "template", "python"), deps=((), (0,), (0, 1)),
              needs=((), (), ()), max_parallel=2, crash_after=0)
    _, compiled = compile_workflow(workdir, dag)
    assert compiled.order == ("s0", "s1", "s2")
    assert set(compiled.nodes["s2"].deps) == {"s0", "s1"}
    assert textwrap.dedent(dag.yaml()).startswith("apiVersion: storyflow/v1")
