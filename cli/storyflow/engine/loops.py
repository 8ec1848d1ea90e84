"""``loop`` steps: iterations of the nested steps as instances ``loop#N.step`` with
their own dependency counters; ``until`` after each iteration, ``best_by``,
``max_iterations`` and ``on_exhausted``; a finished loop is kept whole on resume.

`Loops` works on the `Runner`'s state: it is the part of the scheduler that knows loops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storyflow.engine import lifecycle
from storyflow.engine.forking import earlier_records
from storyflow.engine.instance import Instance, LoopInstance, new_instance
from storyflow.engine.plan import digest
from storyflow.errors import StepFailure
from storyflow.events import ErrorClass, EventType, StepStatus

if TYPE_CHECKING:
    from storyflow.engine.runner import Runner


class Loops:
    """Beginning, iterating and closing the ``loop`` steps of one run."""

    def __init__(self, runner: Runner) -> None:
        self.r = runner

    def begin(self, lp: LoopInstance) -> list[Instance]:
        """A loop whose needs are met and whose ``when`` holds: keep it whole when an
        earlier process finished it with the same inputs, else start its first iteration."""
        r = self.r
        lp.ready_at = r.opt.clock()
        steps = r.scope.steps
        lp.fingerprint = digest(
            [lp.node.fingerprint, {d: steps[d]["output"] for d in lp.node.deps if d in steps}]
        )
        lifecycle.step_fire(lp, "ready")
        prev = r.prep.keep(lp)
        if prev is not None:
            lp.iteration = int(prev.meta.get("iterations", 0))
            lp.scores = list(prev.meta.get("scores", []))
            lp.history = [{}] * lp.iteration  # only the count matters once it is kept
            if lp.forked_from is not None:
                r.journal.checkpoint(lp)  # a fork's copy, with its iterations
            return r.settled(lp)
        lp.attempts = 1
        lp.started_at = r.opt.clock()
        r.move(lp, "start")
        r.emit(EventType.STEP_STARTED, step=lp.id, attempt=lp.attempts)
        return self.next_iteration(lp)

    def next_iteration(self, lp: LoopInstance) -> list[Instance]:
        """Make the instances of the loop's next iteration; return those with no needs."""
        r = self.r
        body = lp.node.body
        assert body is not None
        lp.iteration += 1
        n = lp.iteration
        previous = lp.history[-1] if lp.history else dict.fromkeys(body.order)
        extra = {**(lp.extra or {}), "loop": {"iteration": n, "previous": previous}}
        lp.current = {}
        for sid in body.order:
            inner = new_instance(body.nodes[sid])
            inner.id = f"{lp.id}#{n}.{sid}"
            inner.parent = lp
            inner.extra = extra
            lp.current[sid] = inner
            r.insts[inner.id] = inner
        lp.needs = {sid: len(body.nodes[sid].deps) for sid in body.order}
        lp.left = len(body.order)
        r.unsettled += lp.left
        if r.opt.previous and not r.forced(lp):
            ids = [inner.id for inner in lp.current.values()]
            r.nested_previous.update(earlier_records(r.store, r.run, r.opt.origin, lp, ids))
        if n > 1:
            r.journal.checkpoint(lp)  # the iteration under way, for `show`
        r.emit(EventType.LOOP_ITERATION, step=lp.id, iteration=n, steps=lp.left)
        return [lp.current[sid] for sid in body.order if lp.needs[sid] == 0]

    def inner_settled(self, inst: Instance, lp: LoopInstance) -> list[Instance]:
        """A step of the iteration under way has settled: its dependents in the
        iteration may be ready; after the last, the iteration ends."""
        lp.left -= 1
        out: list[Instance] = []
        for dep_id in inst.node.dependents:
            lp.needs[dep_id] -= 1
            if lp.needs[dep_id] == 0:
                out.append(lp.current[dep_id])
        if lp.left == 0:
            out.extend(self.end_iteration(lp))
        return out

    def end_iteration(self, lp: LoopInstance) -> list[Instance]:
        """Every step of the iteration has settled: fail, end, or begin the next one."""
        r = self.r
        loop = lp.node.step.loop
        assert loop is not None
        n = lp.iteration
        lp.history.append({sid: inner.output for sid, inner in lp.current.items()})
        broken = [
            inner
            for inner in lp.current.values()
            if inner.state == StepStatus.CANCELLED.value
            or (inner.state == StepStatus.FAILED.value and not inner.node.step.allow_failure)
        ]
        if broken:
            err = broken[0].error or {}
            return self.close(
                lp,
                {
                    "class": err.get("class", ErrorClass.PERMANENT.value),
                    "message": f"iteration {n}: step {broken[0].node.step.id} failed: "
                    f"{err.get('message', '')}",
                },
            )
        scope = r.scope.for_step(None, lp.current[next(iter(lp.current))].extra)
        what = "best_by"
        try:
            if loop.best_by is not None:
                lp.scores.append(r.t.evaluate(loop.best_by, scope))
            what = "until"
            done = loop.until is not None and bool(r.t.evaluate(loop.until, scope))
        except StepFailure as exc:
            return self.close(
                lp, {"class": exc.error_class.value, "message": f"{what}: {exc.message}"}
            )
        r.emit(
            EventType.LOOP_ITERATED,
            step=lp.id,
            iteration=n,
            done=done,
            **({"score": lp.scores[-1]} if loop.best_by is not None else {}),
        )
        if done:
            return self.close(lp, None)
        if n >= loop.max_iterations:
            if loop.on_exhausted == "fail":
                cond = f" ({loop.until})" if loop.until else ""
                return self.close(
                    lp,
                    {
                        "class": ErrorClass.PERMANENT.value,
                        "message": f"until{cond} was still false after {n} iterations",
                    },
                )
            return self.close(lp, None)
        return self.next_iteration(lp)

    def close(self, lp: LoopInstance, error: dict[str, str] | None) -> list[Instance]:
        """Settle the loop: its output is the chosen iteration's outputs by step id."""
        if error is None:
            lp.output = lp.history[lp.best() - 1]
        else:
            lp.output = lp.history[-1] if lp.history else None
        return self.r.end_container(lp, error)
