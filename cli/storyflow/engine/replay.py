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
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from storyflow.engine.plan import digest
from storyflow.errors import ReplayMiss
from storyflow.store import StepRecord, redact

_OK = ("succeeded", "cached")
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


@dataclass(slots=True)
class ReplayBook:
    """The answers of one recorded run, by request; counts what was answered how."""

    source: str
    """The recorded run's id."""
    strict: bool = False
    """A call with no recorded answer fails (``replay_miss``) instead of running live."""
    answers: dict[str, Any] = field(default_factory=dict)
    """Digest of a recorded request → the output it got."""
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Instance id → the request the recorded run made for it (for miss messages)."""
    answered: int = 0
    live: int = 0
    missed: int = 0

    @classmethod
    def of(cls, source: str, records: Iterable[StepRecord], *, strict: bool = False
           ) -> ReplayBook:
        """The book of a run from its step records (a map's items, a loop's iterations
        included). An output stored redacted cannot be handed back: it is not an answer."""
        book = cls(source, strict)
        for rec in records:
            if rec.request is None:
                continue
            book.recorded[rec.id] = rec.request
            if rec.status in _OK and not rec.meta.get("redacted"):
                book.answers.setdefault(digest(rec.request), rec.output)
        return book

    def answer(self, step_id: str, request: dict[str, Any], secret_values: list[str]
               ) -> tuple[bool, Any]:
        """``(True, output)`` when the recorded run answered this request; else
        ``(False, None)`` — or `ReplayMiss` when strict."""
        shown = redact(request, secret_values) if secret_values else request
        key = digest(shown)
        if key in self.answers:
            self.answered += 1
            return True, self.answers[key]
        if self.strict:
            self.missed += 1
            raise ReplayMiss(
                f"replay of run {self.source}: no recorded call has this request; "
                + first_difference(self.recorded.get(step_id), shown, step_id),
                hint=f"`storyflow show {self.source} --step {step_id}` prints the recorded "
                "request; without --strict a changed call runs live",
            )
        self.live += 1
        return False, None

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
        for key in sorted(set(a) | set(b), key=str):
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
