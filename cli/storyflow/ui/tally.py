"""`Tally`: a run's steps and instances as its events tell them, each event in O(1).

Two counts, one definition each, the same wherever they are shown:

- *steps*: the plan's top-level steps (a map or a loop counts once), as
  ``run.started`` announces them (``run --dry-run`` prints the same number);
- *instances*: every step instance the run makes — the steps, each map's items
  (``draft[2]``), each loop iteration's steps (``polish#2.revise``), the maps and loops
  themselves included. They become known as the run goes: a map's items when it
  expands (its ``step.started`` carries ``items``), an iteration's steps when it begins
  (``loop.iteration`` carries ``steps``). From an event log without those fields, a
  part is counted when its first event arrives.

Progress is instances settled over instances known, and never reads 100% while an
instance is unsettled or the run ended any other way than ``succeeded``.
Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SETTLED", "Tally", "parent_of"]

SETTLED = frozenset(
    {"step.succeeded", "step.cached", "step.kept", "step.skipped", "step.cancelled"}
)
"""Events that settle an instance (besides a final ``step.failed``)."""


def parent_of(instance_id: str) -> str | None:
    """``draft[2]`` → ``draft``; ``polish#2.revise`` → ``polish``; ``plot`` → None."""
    if instance_id.endswith("]") and "[" in instance_id:
        return instance_id[: instance_id.rindex("[")]
    if "#" in instance_id:
        return instance_id[: instance_id.rindex("#")]
    return None


def _count(counts: dict[str, int], status: str) -> None:
    counts[status] = counts.get(status, 0) + 1


class Tally:
    """Steps and instances: planned, known, settled, by status."""

    __slots__ = (
        "containers",
        "counts",
        "done",
        "known",
        "open",
        "step_counts",
        "steps",
        "steps_done",
    )

    def __init__(self) -> None:
        self.steps = 0
        """Top-level steps of the plan (``run.started``)."""
        self.steps_done = 0
        """Top-level steps settled."""
        self.known = 0
        """Instances known so far: the steps, then the parts of maps and loops."""
        self.done = 0
        """Instances settled."""
        self.counts: dict[str, int] = {}
        """Settled instances by status (and paused ones as ``waiting``)."""
        self.step_counts: dict[str, int] = {}
        """Settled top-level steps by status (and paused ones as ``waiting``)."""
        self.open: set[str] = set()
        """Instances that started and have not settled (maps and loops until known as such)."""
        self.containers: dict[str, bool] = {}
        """Running maps and loops → whether their parts were announced (counted already)."""

    def add(self, event: Mapping[str, Any]) -> str | None:
        """Count one event. Returns the id of a step it showed to be a running map or
        loop (whose own row a display drops), else None."""
        type_ = event.get("type")
        if type_ in ("run.started", "run.resumed"):
            steps = event.get("steps")
            if isinstance(steps, int) and not isinstance(steps, bool):
                self.known += steps - self.steps
                self.steps = steps
            return None
        step = event.get("step")
        if not isinstance(step, str):
            return None
        if type_ == "step.started":
            revealed = self._seen(step)
            items = event.get("items")
            if isinstance(items, int) and not isinstance(items, bool):
                self.open.discard(step)
                if step not in self.containers:
                    self.known += items
                self.containers[step] = True
            elif step not in self.containers:
                self.open.add(step)
            return revealed
        if type_ == "loop.iteration":
            parts = event.get("steps")
            revealed = step if step in self.open else None
            self.open.discard(step)
            if isinstance(parts, int) and not isinstance(parts, bool):
                self.containers[step] = True
                self.known += parts
            else:
                self.containers[step] = False
            return revealed
        if type_ in SETTLED or (type_ == "step.failed" and event.get("final") is not False):
            revealed = self._seen(step)
            self.open.discard(step)
            self.containers.pop(step, None)
            status = str(type_).partition(".")[2]
            self.done += 1
            _count(self.counts, status)
            if parent_of(step) is None:
                self.steps_done += 1
                _count(self.step_counts, status)
            return revealed
        if type_ == "step.waiting":
            revealed = self._seen(step)
            if step in self.open:
                self.open.discard(step)
                _count(self.counts, "waiting")
                if parent_of(step) is None:
                    _count(self.step_counts, "waiting")
            return revealed
        return None

    def _seen(self, iid: str) -> str | None:
        """An event of ``iid``: count it if it is a part no one announced. Returns its
        parent when this shows the parent to be a map (its first item)."""
        if iid in self.open or iid in self.containers:
            return None  # under way: counted already
        parent = parent_of(iid)
        if parent is None:
            return None  # a top-level step: counted in `steps`
        announced = self.containers.get(parent)
        if announced is None:
            if parent not in self.open:
                return None  # its map never started here: nothing to add to
            self.open.discard(parent)
            self.containers[parent] = False
            self.known += 1
            return parent
        if not announced:
            self.known += 1
        return None

    @property
    def total(self) -> int:
        """Instances to settle, as far as the run knows them."""
        return max(self.known, self.done + len(self.open))

    def percent(self, status: str) -> int:
        """Instances settled as a percentage of `total`: 100 only for a run that
        succeeded with nothing unsettled."""
        total = self.total
        if total <= 0:
            return 100 if status == "succeeded" else 0
        pct = 100 * min(self.done, total) // total
        if pct >= 100 and (status != "succeeded" or self.open or self.containers):
            return 99
        return pct

    def label(self, status: str, sep: str, *, planned: int, percent: bool = True) -> str:
        """``steps 5/14 · instances 12/26 (46%)`` (no steps part before ``run.started``)."""
        text = f"steps {self.steps_done:,}/{self.steps:,}{sep}" if self.steps else ""
        text += f"instances {min(self.done, planned):,}/{planned:,}"
        return text + (f" ({self.percent(status)}%)" if percent else "")

    def summary(self) -> tuple[dict[str, int], dict[str, int]]:
        """Steps and instances by status, the unsettled as ``running`` (started) or
        ``pending`` (a summary made without the run's own ``run.summary``)."""
        steps = dict(self.step_counts)
        running = sum(1 for i in (*self.open, *self.containers) if parent_of(i) is None)
        if running:
            steps["running"] = running
        left = self.steps - sum(steps.values())
        if left > 0:
            steps["pending"] = left
        instances = dict(self.counts)
        if self.open or self.containers:
            instances["running"] = len(self.open) + len(self.containers)
        left = self.total - sum(instances.values())
        if left > 0:
            instances["pending"] = left
        return steps, instances
