"""``for_each`` maps: items as instances of their own, released as the map's
``max_parallel`` (or order) allows; the map's output is their outputs in item order.

`Maps` works on the `Runner`'s state: it is the part of the scheduler that knows maps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storyflow.engine import lifecycle
from storyflow.engine.forking import earlier_records
from storyflow.engine.instance import OK, Instance, MapInstance
from storyflow.engine.plan import digest
from storyflow.errors import PermanentError, StepFailure
from storyflow.events import EventType, StepStatus

if TYPE_CHECKING:
    from storyflow.engine.runner import Runner


class Maps:
    """Expanding, releasing and closing the ``for_each`` maps of one run."""

    def __init__(self, runner: Runner) -> None:
        self.r = runner

    def expand(self, m: MapInstance) -> list[Instance]:
        """A map whose needs are met and whose ``when`` holds: evaluate ``for_each`` and
        make its first items ready; dependents ready at once if it settled here."""
        r = self.r
        step = m.node.step
        m.ready_at = r.opt.clock()
        try:
            scope = r.scope.for_step(None, m.extra)
            fe = step.for_each
            values = r.t.evaluate(fe, scope) if isinstance(fe, str) else r.t.render(fe, scope)
            if not isinstance(values, (list, tuple)):
                raise PermanentError(
                    f"for_each gave {type(values).__name__}, not a list",
                    hint="for_each must be an expression giving a list, or a literal list",
                )
        except StepFailure as exc:
            r.prep.fail_before_start(m, exc)
            return r.settled(m)
        values = list(values)
        m.fingerprint = digest([m.node.fingerprint, values])
        m.attempts = 1
        m.started_at = r.opt.clock()
        as_name = step.as_
        for i, value in enumerate(values):
            item = Instance(m.node)
            item.id = f"{m.id}[{i}]"
            item.parent = m
            item.extra = {**(m.extra or {}), as_name: value, "index": i, "previous": None}
            m.items.append(item)
            r.insts[item.id] = item
        r.unsettled += len(values)
        lifecycle.step_fire(m, "ready")
        r.move(m, "start")
        r.emit(EventType.STEP_STARTED, step=m.id, attempt=m.attempts, items=len(values))
        if not values:
            return self.close(m)
        if r.opt.previous and not r.forced(m):
            ids = [item.id for item in m.items]
            r.nested_previous.update(earlier_records(r.store, r.run, r.opt.origin, m, ids))
        self.release(m)
        return []

    def release(self, m: MapInstance) -> None:
        """Make ready the next items of ``m`` its ``max_parallel`` (or order) allows."""
        r = self.r
        items, limit = m.items, m.limit
        sequential = m.node.step.sequential
        while m.next < len(items) and (limit is None or m.active < limit):
            item = items[m.next]
            if sequential and m.next:
                assert item.extra is not None
                item.extra["previous"] = items[m.next - 1].output
            m.next += 1
            m.active += 1
            r.enqueue(item)

    def item_settled(self, item: Instance, m: MapInstance) -> list[Instance]:
        """A map item has settled: release the next, or settle the map after the last."""
        r = self.r
        r.unsettled -= 1
        m.active -= 1
        m.settled += 1
        if r.stop is not None or m.state != StepStatus.RUNNING.value:
            return []
        if m.settled == len(m.items):
            return self.close(m)
        self.release(m)
        return []

    def close(self, m: MapInstance) -> list[Instance]:
        """Every item of ``m`` has settled: its output is their outputs, in item order;
        it fails if an item did."""
        m.output = [item.output for item in m.items]
        failed = [item for item in m.items if item.state not in OK]
        error = None
        if failed:
            first = failed[0].error or {}
            error = {
                "class": first.get("class", "permanent"),
                "message": f"{len(failed)} of {len(m.items)} items failed; "
                f"{failed[0].id}: {first.get('message', '')}",
            }
        return self.r.end_container(m, error)
