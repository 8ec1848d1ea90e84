"""The diff's value types: what differs between two runs, A and B.

Every pair of figures is a `Pair` (``a``, ``b``); a side that has no value (a step only
in one run, a duration not known) holds None. Times are epoch seconds (``*_at``) or
durations in seconds (``*_s``), as the store holds them; the renderers format them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

Segment = tuple[str, str]
"""One piece of a text diff: ``("=", text)`` in both, ``("-", text)`` only in A,
``("+", text)`` only in B. A's text is the ``=`` and ``-`` pieces joined, B's the ``=``
and ``+`` pieces."""


@dataclass(frozen=True, slots=True)
class Pair(Generic[T]):
    """One figure of both runs."""

    a: T
    """Run A's."""
    b: T
    """Run B's."""

    @property
    def same(self) -> bool:
        return bool(self.a == self.b)


@dataclass(frozen=True, slots=True)
class TextDiff:
    """Two texts compared word by word (or line by line, for very long ones)."""

    unit: str
    """``word`` or ``line``: what was matched."""
    segments: tuple[Segment, ...]
    """The pieces, in order."""

    @property
    def removed(self) -> int:
        """Words (or lines) only in A."""
        return sum(_units(t, self.unit) for op, t in self.segments if op == "-")

    @property
    def added(self) -> int:
        """Words (or lines) only in B."""
        return sum(_units(t, self.unit) for op, t in self.segments if op == "+")


def _units(text: str, unit: str) -> int:
    return len(text.split()) if unit == "word" else max(1, text.count("\n"))


@dataclass(frozen=True, slots=True)
class Change:
    """One difference inside two JSON values."""

    path: str
    """Where, as a JSON pointer (``/plot/complications/2``; ``""`` is the whole value)."""
    change: str
    """``added`` (only in B), ``removed`` (only in A) or ``changed``."""
    a: Any = None
    """A's value there (None when added)."""
    b: Any = None
    """B's value there (None when removed)."""


@dataclass(frozen=True, slots=True)
class ValueDiff:
    """Two values (step outputs) compared."""

    same: bool
    """Equal, JSON types included (``1`` is not ``true``)."""
    kind: str = "same"
    """``same``; ``text`` when both are strings (see `text`); else ``json`` (see
    `changes`)."""
    text: TextDiff | None = None
    """The word diff of two strings."""
    changes: tuple[Change, ...] = ()
    """The structural diff of two JSON values."""


SAME = ValueDiff(same=True)


@dataclass(frozen=True, slots=True)
class StepDiff:
    """One step instance, in either run or both."""

    id: str
    """The instance id: ``plot``, ``draft[3]``, ``polish#2.revise``."""
    change: str
    """``equal``, ``changed``, ``only_a`` or ``only_b``. Equal: same status, output,
    error, and (when both runs know them) fingerprint and request; attempts, time,
    tokens and cost are shown but do not count."""
    origin: str
    """``kept`` (one run's fork copied the other's record, or both copied the same
    parent's), ``rerun`` (both ran it), ``only_a`` or ``only_b``."""
    kind: str
    """``task``, or ``map`` / ``loop`` for a step made of other instances (A's; B's
    when only B has a record of it)."""
    kinds: Pair[str]
    """Each run's own kind of it: runs of different workflows may have a map in one
    and a task of the same id in the other (totals count each run's tasks)."""
    status: Pair[str | None]
    fingerprint: str | None
    """``same``, ``different``, or None when a side has none."""
    request: str | None
    """``same``, ``different``, or None when a side has none."""
    output: ValueDiff
    error: Pair[dict[str, Any] | None]
    attempts: Pair[int | None]
    duration_s: Pair[float | None]
    tokens: Pair[int | None]
    """None: no usage reported."""
    cost: Pair[float | None]
    """None: no usage reported, or a cost not known (a model with no price)."""

    @property
    def equal(self) -> bool:
        return self.change == "equal"


@dataclass(frozen=True, slots=True)
class RunSide:
    """One of the two runs, as the diff names it."""

    run_id: str
    workflow: str
    workflow_version: str | None
    workflow_path: str
    source_hash: str
    status: str
    environment: str | None
    inputs: dict[str, Any]
    sets: tuple[str, ...]
    created_at: float
    ended_at: float | None
    wall_s: float | None
    """``ended_at - created_at``; None while it runs."""
    forked_from: str | None
    fork: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """A run-level field that differs (workflow, file, source, environment, status)."""

    name: str
    a: Any
    b: Any


@dataclass(frozen=True, slots=True)
class Lineage:
    """How the two runs are related through ``storyflow fork`` / ``replay``."""

    relation: str
    """``b_from_a`` (B was made from A), ``a_from_b``, ``siblings`` (both made from
    the same run) or ``unrelated``."""
    parent: str | None = None
    """The run made from (A, B or the common parent)."""
    kind: str | None = None
    """``fork`` or ``replay`` (of the child; None for siblings and unrelated runs)."""
    steps: tuple[str, ...] = ()
    """The steps the fork was asked to re-run from (``--from``)."""
    inputs: tuple[str, ...] = ()
    """The inputs the fork changed."""
    sets: tuple[str, ...] = ()
    """The ``--set`` overrides the fork added."""
    file: str | None = None
    """The workflow file the fork ran instead (``--file``)."""


@dataclass(frozen=True, slots=True)
class Totals:
    """One run's figures over the step instances compared."""

    instances: int
    attempts: int
    tokens: int
    cost: float
    """The known costs, summed."""
    cost_known: bool
    """False when some instance reported usage with no cost (a model with no price)."""
    duration_s: float
    """The instances' running times, summed (maps and loops not counted twice)."""


@dataclass(frozen=True, slots=True)
class ArtifactDiff:
    """One file of the run folders."""

    name: str
    """Its path under the run folder, with ``/``."""
    change: str
    """``same``, ``changed``, ``only_a`` or ``only_b``."""
    size: Pair[int | None]
    """Bytes."""
    text: Pair[str | None]
    """Its content, when it is UTF-8 text small enough to show."""
    diff: TextDiff | None = None
    """The word (or line) diff of a changed text file."""


@dataclass(frozen=True, slots=True)
class Summary:
    equal: int
    changed: int
    only_a: int
    only_b: int
    kept: int
    """Instances one run's fork kept from the other."""
    outputs_differ: tuple[str, ...]
    """Instance ids whose outputs differ (an instance missing from a run has none)."""
    differs: bool
    """Whether anything differs: run fields, inputs, sets, steps or artifacts (ids and
    times always differ and do not count)."""


@dataclass(frozen=True, slots=True)
class RunDiff:
    """Everything `storyflow diff` says."""

    a: RunSide
    b: RunSide
    fields: tuple[FieldDiff, ...]
    """Run-level fields that differ."""
    inputs: tuple[Change, ...]
    """Inputs added, removed or changed (paths ``/name...``)."""
    sets: tuple[Change, ...]
    """``--set`` overrides by path (``seed``): added, removed or changed (values as given)."""
    lineage: Lineage
    step: str | None
    """The ``--step`` the steps were limited to, or None."""
    steps: tuple[StepDiff, ...]
    totals: Pair[Totals]
    artifacts: tuple[ArtifactDiff, ...]
    summary: Summary
