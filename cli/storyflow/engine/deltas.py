"""An attempt's streamed text as ``step.delta`` events, coalesced.

A streaming agent (``llm``) hands each chunk of its reply to ``call.delta`` as it
arrives. `Deltas` buffers the chunks and emits them as one ``step.delta`` event (``text``:
what arrived since the last one; ``tokens``: chunks so far in this attempt) at most once
per `EVERY_S` per attempt — a 10,000-token chapter is a few hundred events, not 10,000
— and what is left when the attempt ends, before the step's own end event.

Secret values are redacted from events by the journal; a secret split between two
events would escape that, so with secrets to redact the last ``len(longest) - 1``
characters wait for the next event (or the attempt's end).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from storyflow.events import EventType

if TYPE_CHECKING:
    from storyflow.engine.commit import Journal

EVERY_S = 0.1
"""At most one ``step.delta`` event per attempt in this many seconds."""


class Deltas:
    """``call.delta`` of one attempt: chunks in, coalesced ``step.delta`` events out."""

    __slots__ = ("attempt", "chunks", "handle", "hold", "journal", "parts", "step")

    def __init__(self, journal: Journal, step: str, attempt: int) -> None:
        self.journal = journal
        self.step = step
        self.attempt = attempt
        self.parts: list[str] = []
        self.chunks = 0
        self.handle: asyncio.TimerHandle | None = None
        secrets = journal.secret_values
        self.hold = max(map(len, secrets)) - 1 if secrets else 0

    def __call__(self, text: str) -> None:
        self.chunks += 1
        self.parts.append(text)
        if self.handle is None:
            self.handle = asyncio.get_running_loop().call_later(EVERY_S, self._emit)

    def _emit(self, *, last: bool = False) -> None:
        self.handle = None
        if not self.parts:
            return
        text = "".join(self.parts)
        self.parts.clear()
        if self.hold and not last:
            text, kept = text[: -self.hold], text[-self.hold:]
            if kept:
                self.parts.append(kept)
            if not text:
                return
        self.journal.emit(EventType.STEP_DELTA, step=self.step, attempt=self.attempt,
                          text=text, tokens=self.chunks)
        self.journal.schedule_flush()

    def close(self) -> None:
        """The attempt ended: emit what is left."""
        if self.handle is not None:
            self.handle.cancel()
        self._emit(last=True)
