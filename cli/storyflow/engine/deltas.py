"""An attempt's streamed text as ``step.delta`` events, coalesced.

A streaming agent (``llm``) hands each chunk of its reply to ``call.delta`` as it
arrives. `Deltas` buffers the chunks and emits them as one ``step.delta`` event (``text``:
what arrived since the last one; ``tokens``: chunks so far in this attempt) at most once
per `EVERY_S` per attempt — a 10,000-token chapter is a few hundred events, not 10,000
— and what is left when the attempt ends, before the step's own end event.

Secret values are redacted from events by the journal, one event at a time: a secret
split between two events would pass it in two halves. So with secrets to redact, the
buffered text is redacted whole here, and its end, when it could be the start of a
secret (`open_tail`), waits for the next event — or the attempt's end, when it is sent
as it is.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from storyflow.events import EventType
from storyflow.store import redact

if TYPE_CHECKING:
    from storyflow.engine.commit import Journal

EVERY_S = 0.1
"""At most one ``step.delta`` event per attempt in this many seconds."""


class Deltas:
    """``call.delta`` of one attempt: chunks in, coalesced ``step.delta`` events out."""

    __slots__ = ("attempt", "chunks", "handle", "journal", "parts", "secrets", "step")

    def __init__(self, journal: Journal, step: str, attempt: int) -> None:
        self.journal = journal
        self.step = step
        self.attempt = attempt
        self.parts: list[str] = []
        self.chunks = 0
        self.handle: asyncio.TimerHandle | None = None
        self.secrets = journal.secret_values

    def __call__(self, text: str) -> None:
        self.chunks += 1
        self.parts.append(text)
        if self.handle is None:
            self.handle = asyncio.get_running_loop().call_later(EVERY_S, self._emit)

    def _emit(self, *, last: bool = False) -> None:
        self.handle = None
        text = "".join(self.parts)
        self.parts.clear()
        if not text:
            return
        if self.secrets:
            text = redact(text, self.secrets)
            held = 0 if last else open_tail(text, self.secrets)
            if held:
                self.parts.append(text[-held:])
                text = text[:-held]
                if not text:
                    return
        self.journal.emit(EventType.STEP_DELTA, step=self.step, attempt=self.attempt,
                          text=text, tokens=self.chunks)
        self.journal.schedule_flush()

    def flush(self) -> None:
        """Emit what came so far now, without waiting for the timer (an end that may
        begin a secret still waits): before a line that must come after the text."""
        if self.handle is not None:
            self.handle.cancel()
        self._emit()

    def close(self) -> None:
        """The attempt ended: emit what is left."""
        if self.handle is not None:
            self.handle.cancel()
        self._emit(last=True)


def open_tail(text: str, secrets: list[str]) -> int:
    """The length of the longest end of ``text`` that begins one of ``secrets`` without
    being all of it: what must wait for more text to tell whether a secret goes on."""
    n, held = len(text), 0
    for secret in secrets:
        i = text.find(secret[0], max(n - len(secret) + 1, 0)) if secret else -1
        while 0 <= i and n - i > held:
            if secret.startswith(text[i:]):
                held = n - i
                break
            i = text.find(secret[0], i + 1)
    return held
