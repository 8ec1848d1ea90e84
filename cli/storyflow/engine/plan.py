"""The plan: a pure function of the typed workflow. Order, dependents, fingerprints.

A step's *definition fingerprint* covers everything in the file that can change
its output (agent kind, merged ``with``, prompt, schema, map and loop shape). The
engine adds the rendered inputs at run time, so a changed upstream output changes
every downstream fingerprint without the plan knowing about outputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from storyflow.spec.model import Step, Workflow


@dataclass(frozen=True, slots=True)
class Node:
    """One step of the plan with its place in the graph."""

    step: Step
    deps: tuple[str, ...]
    """Steps of the same scope this one waits for."""
    dependents: tuple[str, ...]
    """Steps of the same scope that wait for this one."""
    level: int
    """Longest chain of dependencies before it (0 = can start at once)."""
    fingerprint: str
    """Hash of the step's definition."""
    body: Plan | None = None
    """For a loop: the plan of one iteration."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Steps in a topological order (ties broken by file order)."""

    nodes: dict[str, Node]
    order: tuple[str, ...]

    def __len__(self) -> int:
        """The plan's *steps*: its top-level steps, a map or a loop counting once.

        This is the one step count a user sees (``run --dry-run``, ``run.started``, the
        summary's ``steps``); a run's *instances* (map items, loop iterations' steps
        included) are counted as the run makes them."""
        return len(self.nodes)

    def downstream(self, roots: Iterable[str]) -> set[str]:
        """``roots`` and every step that (transitively) depends on one of them."""
        out: set[str] = set()
        stack = [r for r in roots if r in self.nodes]
        while stack:
            sid = stack.pop()
            if sid in out:
                continue
            out.add(sid)
            stack.extend(self.nodes[sid].dependents)
        return out

    def levels(self) -> list[list[str]]:
        grouped: dict[int, list[str]] = {}
        for sid in self.order:
            grouped.setdefault(self.nodes[sid].level, []).append(sid)
        return [grouped[k] for k in sorted(grouped)]

    def count_all(self) -> int:
        """Step definitions in the file, loop bodies included once: the file's size, not
        a count shown for a run (see `__len__`)."""
        return sum(1 + (n.body.count_all() if n.body else 0) for n in self.nodes.values())


def plan(workflow: Workflow) -> Plan:
    """Compile the workflow's steps into a plan."""
    return _plan(workflow.steps)


def _plan(steps: tuple[Step, ...]) -> Plan:
    by_id = {s.id: s for s in steps}
    dependents: dict[str, list[str]] = {s.id: [] for s in steps}
    for s in steps:
        for d in s.deps:
            if d in dependents:
                dependents[d].append(s.id)
    # Kahn's algorithm, taking ready steps in file order; the validator rejected cycles.
    indegree = {s.id: sum(1 for d in s.deps if d in by_id) for s in steps}
    level = dict.fromkeys(indegree, 0)
    position = {s.id: i for i, s in enumerate(steps)}
    import heapq

    ready = [(position[sid], sid) for sid, n in indegree.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, sid = heapq.heappop(ready)
        order.append(sid)
        for child in dependents[sid]:
            level[child] = max(level[child], level[sid] + 1)
            indegree[child] -= 1
            if indegree[child] == 0:
                heapq.heappush(ready, (position[child], child))
    if len(order) != len(steps):  # pragma: no cover - the validator rejects cycles
        raise ValueError("dependency cycle among: " + ", ".join(s for s in by_id if s not in order))
    nodes = {}
    for sid in order:
        step = by_id[sid]
        body = _plan(step.loop.steps) if step.loop is not None else None
        nodes[sid] = Node(
            step=step,
            deps=tuple(d for d in step.deps if d in by_id),
            dependents=tuple(dependents[sid]),
            level=level[sid],
            fingerprint=fingerprint(step),
            body=body,
        )
    return Plan(nodes=nodes, order=tuple(order))


def definition(step: Step) -> dict[str, Any]:
    """The parts of a step that decide its output."""
    out: dict[str, Any] = {
        "uses": step.uses,
        "with": step.with_,
        "prompt": step.prompt,
        "output_schema": step.output_schema,
        "for_each": step.for_each,
        "as": step.as_,
        "when": step.when,
    }
    if step.loop is not None:
        out["loop"] = {
            "steps": [definition(s) | {"id": s.id} for s in step.loop.steps],
            "until": step.loop.until,
            "max_iterations": step.loop.max_iterations,
            "best_by": step.loop.best_by,
        }
    return out


def fingerprint(step: Step) -> str:
    return digest(definition(step))


def digest(value: Any) -> str:
    """A short stable hash of a JSON-like value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
