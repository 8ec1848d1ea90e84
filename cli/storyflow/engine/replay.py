"""Replay: answer a run's agent calls from an earlier run's record.

Every attempt records its *request* on the step's record — the agent kind, the rendered
``with`` (and ``prompt``), the ``output_schema`` and the run's seed, secrets redacted
(`request_of`).
`storyflow replay RUN` runs the workflow again as a new run with a `ReplayBook` of RUN:
an attempt whose request equals one RUN recorded for a step that succeeded gets that
step's output without calling its agent (no network, no subprocess); any other runs
live, or with ``--strict`` fails as ``replay_miss`` naming the first difference from
what RUN recorded for the same step.

Requests are compared in their redacted form, as stored: the book digests each
recorded request once when it loads, and each new request once when it is asked.
A call is answered by what the recorded run answered *the same step instance* with
that request (two iterations of a loop may ask the same and get different answers);
failing that, by the first recorded step, in display order, that made the same
request and succeeded. A call that the same instance made and that did not succeed
in the recorded run is not answered by another step's output: it runs live.

A ``workflow`` step (`NESTED_KINDS`) is not answered whole: its child run replays
against the recorded run's child of the same step (`ReplayBook.nested`), so a change
inside the child file is checked too; its counts add up in the outer book. Only when
the recorded run has no such child (gone) is the step answered whole, by its request.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from storyflow.engine.plan import digest
from storyflow.errors import ReplayMiss
from storyflow.store import StepRecord, redact

_OK = ("succeeded", "cached")
_REDACTED = "redacted"
_SNIPPET = 40


def request_of(uses: str | None, inputs: dict[str, Any],
               output_schema: dict[str, Any] | None, seed: int | None) -> dict[str, Any]:
    """What an attempt asks of its agent: equal requests get equal answers (the run's
    seed included: seeded agents answer by it). Stored with the step's record, so it is
    JSON: a rendered value JSON cannot hold (a ``dict_items``) is kept as its repr."""
    for value in inputs.values():
        if type(value) not in _SCALARS:  # nested or odd: through JSON (rare, small)
            inputs = json.loads(json.dumps(inputs, default=repr, allow_nan=True))
            break
    else:
        inputs = dict(inputs)  # an agent that changes its inputs does not change this
    return {"uses": uses, "inputs": inputs, "output_schema": output_schema, "seed": seed}


_SCALARS = frozenset({str, int, float, bool, type(None)})


NESTED_KINDS = frozenset({"workflow"})
"""Agent kinds whose calls replay inside (a child run answering from the recorded
child run), never from their recorded output as a whole."""


@dataclass(slots=True)
class ReplayBook:
    """The answers of one recorded run, by request; counts what was answered how."""

    source: str
    """The recorded run's id."""
    strict: bool = False
    """A call with no recorded answer fails (``replay_miss``) instead of running live."""
    answers: dict[str, Any] = field(default_factory=dict)
    """Digest of a recorded request → the output it got (the first in display order)."""
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Instance id → the request the recorded run made for it (for miss messages)."""
    own: dict[str, tuple[str, str, Any]] = field(default_factory=dict)
    """Instance id → the digest of its recorded request, its recorded status
    (``redacted`` for an output that cannot be handed back) and its output."""
    outer: ReplayBook | None = None
    """The book of the run this child run replays inside: its counts include ours."""
    answered: int = 0
    live: int = 0
    missed: int = 0

    @classmethod
    def of(cls, source: str, records: Iterable[StepRecord], *, strict: bool = False,
           outer: ReplayBook | None = None) -> ReplayBook:
        """The book of a run from its step records (a map's items, a loop's iterations
        included). An output stored redacted cannot be handed back: it is not an answer."""
        book = cls(source, strict, outer=outer)
        for rec in records:
            if rec.request is None:
                continue
            book.recorded[rec.id] = rec.request
            key = digest(rec.request)
            ok = rec.status in _OK and not rec.meta.get("redacted")
            book.own[rec.id] = (key, rec.status if ok or rec.status not in _OK
                                else _REDACTED, rec.output)
            if ok:
                book.answers.setdefault(key, rec.output)
        return book

    def nested(self, source: str, records: Iterable[StepRecord]) -> ReplayBook:
        """The book of a child run: ``records`` of the recorded run's child ``source``."""
        return ReplayBook.of(source, records, strict=self.strict, outer=self)

    @property
    def size(self) -> int:
        """How many recorded calls can be handed back."""
        return sum(1 for _, state, _ in self.own.values() if state in _OK)

    def answer(self, step_id: str, request: dict[str, Any], secret_values: list[str]
               ) -> tuple[bool, Any]:
        """``(True, output)`` when the recorded run answered this request; else
        ``(False, None)`` — or `ReplayMiss` when strict."""
        shown = redact(request, secret_values) if secret_values else request
        key = digest(shown)
        own = self.own.get(step_id)
        if own is not None and own[0] == key:
            if own[1] in _OK:
                self._count("answered")
                return True, own[2]
            # The recorded run made this very call and got no answer it can give back.
            why = ("its output was stored redacted (it held a secret)" if own[1] == _REDACTED
                   else f"it did not succeed ({own[1]})")
            message = (f"replay of run {self.source}: step {step_id} made this call there "
                       f"and {why}, so the record has no answer for it")
        elif key in self.answers:
            self._count("answered")
            return True, self.answers[key]
        elif not self.recorded:
            message = (f"replay of run {self.source}: that run has no recorded requests (it "
                       "ran before storyflow recorded them, or none of its steps reached an "
                       "agent), so nothing can be answered from it")
        else:
            message = (f"replay of run {self.source}: no recorded call has this request; "
                       + first_difference(self.recorded.get(step_id), shown, step_id))
        if self.strict:
            self._count("missed")
            raise ReplayMiss(
                message,
                hint=(f"`storyflow show {self.source} --step {shlex.quote(step_id)}` prints "
                      "the recorded request; " if step_id in self.recorded else "")
                + "without --strict the call runs live",
            )
        self._count("live")
        return False, None

    def _count(self, what: str) -> None:
        book: ReplayBook | None = self
        while book is not None:
            setattr(book, what, getattr(book, what) + 1)
            book = book.outer

    def counts(self) -> dict[str, Any]:
        """``{"source", "answered", "live", "missed"}``: for the record and the summary."""
        return {"source": self.source, "answered": self.answered, "live": self.live,
                "missed": self.missed}


def first_difference(recorded: Any, now: Any, step_id: str) -> str:
    """Where a request first differs from the one recorded for the same step, in words."""
    if recorded is None:
        return f"the recorded run made no call for step {step_id}"
    path, a, b = _first(recorded, now, "")
    where = path.lstrip(".") or "the request"
    return f"{where} differs: recorded {_show(a, b)}, now {_show(b, a)}"


_MISSING = object()


def _first(a: Any, b: Any, path: str) -> tuple[str, Any, Any]:
    if isinstance(a, dict) and isinstance(b, dict):
        # In the recorded order (``uses`` before ``inputs``), then the new keys.
        for key in [*a, *(k for k in b if k not in a)]:
            x, y = a.get(key, _MISSING), b.get(key, _MISSING)
            if x != y:
                return _first(x, y, f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and a != b:
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return _first(x, y, f"{path}[{i}]")
        return f"{path}[{min(len(a), len(b))}]", (
            a[len(b)] if len(a) > len(b) else _MISSING), (
            b[len(a)] if len(b) > len(a) else _MISSING)
    return path, a, b


def _show(value: Any, other: Any) -> str:
    """``value`` short: for two texts, the part around where they first differ."""
    if value is _MISSING:
        return "(absent)"
    if isinstance(value, str) and isinstance(other, str):
        at = next((i for i, (x, y) in enumerate(zip(value, other, strict=False)) if x != y),
                  min(len(value), len(other)))
        start = max(0, at - _SNIPPET // 2)
        piece = value[start:start + _SNIPPET]
        return repr(("…" if start else "") + piece + ("…" if start + _SNIPPET < len(value)
                                                      else ""))
    text = repr(value)
    return text if len(text) <= _SNIPPET else text[:_SNIPPET - 1] + "…"
