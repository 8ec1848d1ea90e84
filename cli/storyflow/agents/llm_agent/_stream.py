"""A streamed reply: its Server-Sent Events read as they arrive, and the watch on its silence.

Asked with ``"stream": true``, an OpenAI-compatible server answers ``text/event-stream``:
one ``data: {chat.completion.chunk}`` event per piece of the reply (the text in
``choices[0].delta.content``, ``finish_reason`` in the last choice), with
``stream_options.include_usage`` a last chunk of empty ``choices`` and the ``usage``,
then ``data: [DONE]``. `Events` is fed the body's bytes and hands each piece of text on
at once; `Watch` turns a reply that never begins, or goes silent, into `Expired`.

No aiohttp here: `_http` feeds it the body's bytes and translates transport failures. Nor
an SSE library: one would save the ~40 lines of `Events.feed`, a new dependency for that.
The SSE readers measured (httpx-sse) read text lines — decoding and line splitting in
more generator layers, ~60 µs a call more than the raw bytes for a 10-chunk reply
(bench/bench_llm.py's S workload) — then make an event object per event, where this
splits bytes and decodes only the chunk's JSON; and they raise their own error for a
``Content-Type`` that is not ``text/event-stream``: the very answer this agent must take
as a plain completion (a server that ignores ``stream``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from types import TracebackType
from typing import Any

from storyflow.agents.llm_agent._request import as_text
from storyflow.errors import InvalidOutput, TransientError

_EXCERPT_CHARS = 300
_BOM = b"\xef\xbb\xbf"
_decode = json.JSONDecoder().raw_decode
"""`json.loads` without its whitespace scans (a chunk is stripped): a third faster."""


class Events:
    """The events of one streamed reply; `feed` it the body's bytes, then ask `result`."""

    __slots__ = ("_on_text", "_parts", "_pending", "_refusal", "_rest", "_where", "done",
                 "finish", "usage")

    def __init__(self, on_text: Callable[[str], None], where: str) -> None:
        self._on_text = on_text
        self._where = where
        self._parts: list[str] = []
        self._refusal: list[str] = []
        self._rest = b""
        """The bytes after the last line break: a line still arriving."""
        self._pending: bytes | None = None
        """The data of an event whose blank line has not come yet."""
        self.done = False
        """``data: [DONE]`` came."""
        self.finish: Any = None
        """The last ``finish_reason`` sent."""
        self.usage: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """The reply is whole: ``[DONE]`` came, or a ``finish_reason``."""
        return self.done or self.finish is not None

    @property
    def chars(self) -> int:
        """Characters of text so far."""
        return sum(map(len, self._parts))

    def feed(self, data: bytes) -> None:
        """Read the complete lines in ``data`` (and in what came before it)."""
        if not self._rest and self._pending is None and data[:6] == b"data: " and \
                data[-2:] == b"\n\n" and data.count(b"\n") == 2:  # one whole event: most reads
            self._event(data[6:-2].strip())
            return
        data = self._rest + data if self._rest else data  # begins a line
        cr = b""
        if b"\r" in data:  # CRLF, or a CR alone, ends a line too
            if data[-1:] == b"\r":  # maybe half a CRLF: the next read tells
                data, cr = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if data[:3] == _BOM:  # may begin the stream
            data = data[3:]
        lines = data.split(b"\n")
        self._rest = lines.pop() + cr
        for line in lines:
            if line[:5] == b"data:":
                payload = line[5:].strip()  # the space after the colon
                pending = self._pending
                self._pending = payload if pending is None else pending + b"\n" + payload
            elif not line:  # a blank line ends the event
                if self._pending is not None:
                    payload, self._pending = self._pending, None
                    self._event(payload)
            # event:, id:, retry: and ": comments" (keep-alives) say nothing of the reply

    def result(self) -> tuple[str, Any, dict[str, Any]]:
        """The text, finish_reason and usage (``{}`` when none came) of a stream that
        ended; one cut short — no ``[DONE]`` nor ``finish_reason`` — is transient."""
        if self._rest:
            self.feed(b"\n")
        if self._pending is not None:  # the last event lacked its blank line: take it
            payload, self._pending = self._pending, None
            self._event(payload)
        if not self.complete:
            raise TransientError(
                f"the stream from the LLM server at {self._where} ended before the reply "
                f"was complete (after {self.chars} characters)")
        if not self._parts and self._refusal:
            raise Refused("".join(self._refusal), self.usage or {})
        return "".join(self._parts), self.finish, self.usage or {}

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        if not data:  # ``data:`` alone: a keep-alive
            return
        text = None
        try:
            doc = data.decode()  # UnicodeDecodeError is a ValueError
            chunk, end = _decode(doc)
            if end != len(doc):
                raise ValueError("more after the JSON")
            choices = chunk.get("choices")
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    text = delta.get("content")
                    if text is not None and not isinstance(text, str):
                        raise TypeError("content is not text")
                    refusal = delta.get("refusal")
                    if refusal:
                        self._refusal.append(as_text(refusal))
                finish = choice.get("finish_reason")
                if finish is not None:
                    self.finish = finish
            usage = chunk.get("usage")
            if usage:
                self.usage = usage if isinstance(usage, dict) else None
            elif not choices and chunk.get("error"):
                raise TransientError(f"the LLM server at {self._where} failed mid-stream: "
                                     f"{_said(chunk['error'])}")
        except (ValueError, AttributeError, TypeError, IndexError, KeyError) as exc:
            excerpt = data[:_EXCERPT_CHARS].decode("utf-8", "replace")
            raise TransientError(
                f"the LLM server at {self._where} sent a stream chunk that is not a chat "
                f"completion chunk: {excerpt}") from exc
        if text:
            self._parts.append(text)
            self._on_text(text)


class Refused(InvalidOutput):
    """The model refused: the refusal's ``text`` and the ``usage`` the server reported
    (``{}`` when none) go with the failure, so that the call is metered — the prompt and
    the refusal were generated, and a provider bills them. ``streamed``: counted from the
    text when the server reported no usage, as any stream is; a whole reply without
    usage counts no tokens, as any whole reply does."""

    def __init__(self, text: str, usage: dict[str, Any], *, streamed: bool = True) -> None:
        super().__init__(f"the model refused: {text[:_EXCERPT_CHARS]}")
        self.text = text
        self.usage = usage
        self.streamed = streamed


def _said(error: Any) -> str:
    if isinstance(error, dict):
        error = error.get("message") or error
    text = " ".join(as_text(error).split())
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…"


class Expired(Exception):
    """A `Watch` ran out: ``idle`` when the reply had begun and then went silent."""

    def __init__(self, idle: bool, seconds: float) -> None:
        super().__init__("idle" if idle else "no reply")
        self.idle = idle
        self.seconds = seconds


class Watch:
    """Cancels the task it is entered in when a deadline passes — ``first_s`` for the
    reply to begin, then, once `begin` was called, ``idle_s`` after the last `beat` — and
    turns that cancellation into `Expired` on the way out.

    One timer, not one per beat: a beat only notes the time, and the timer — set for the
    earlier of the two limits — when it fires before the deadline, sets itself for the
    deadline; so a chunk costs one clock read. A cancellation from outside (the engine's
    step timeout) passes through untouched, as `asyncio.timeout` lets it."""

    __slots__ = ("_cancelling", "_first_s", "_handle", "_idle_s", "_loop", "_start", "_task",
                 "_time", "began", "expired", "last")

    def __init__(self, first_s: float, idle_s: float) -> None:
        self._first_s = first_s
        self._idle_s = idle_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._time: Callable[[], float] = _never
        self._cancelling = 0
        self._start = 0.0
        self.began = False
        """The reply began: the idle limit applies."""
        self.expired: Expired | None = None
        self.last = 0.0
        """Loop time of the last sign of life."""

    def __enter__(self) -> Watch:
        loop = self._loop = asyncio.get_running_loop()
        task = self._task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Watch must be used inside a task")
        self._cancelling = task.cancelling()
        self._time = loop.time
        self._start = self.last = loop.time()
        self._handle = loop.call_at(self._start + min(self._first_s, self._idle_s), self._due)
        return self

    def begin(self) -> None:
        """The reply began: from now on it may be silent for ``idle_s`` at most."""
        self.began = True
        self.last = self._time()

    def beat(self) -> None:
        """Something arrived."""
        self.last = self._time()

    def _due(self) -> None:
        assert self._loop is not None and self._task is not None
        limit = self._idle_s if self.began else self._first_s
        when = (self.last if self.began else self._start) + limit
        if self._time() < when:
            self._handle = self._loop.call_at(when, self._due)
            return
        self.expired = Expired(self.began, limit)
        self._task.cancel()

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
        expired = self.expired
        if expired is None or self._task is None:
            return
        if self._task.uncancel() <= self._cancelling and et is not None and issubclass(
                et, asyncio.CancelledError):
            raise expired


def _never() -> float:
    raise RuntimeError("Watch used before it was entered")
