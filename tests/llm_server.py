"""A fake OpenAI-compatible chat completions server for the ``llm`` agent's tests.

A real HTTP/1.1 server with keep-alive on 127.0.0.1 (an ephemeral port), served by
asyncio on a background thread, so a hundred concurrent connections cost little.
Each request takes the next scripted `Reply` (``push``), else the default one
(``GET .../models`` lists one model, ``m``); every request is recorded (`Request`:
method, path, headers, parsed body) for assertions.

    with FakeLLM() as server:
        server.push(error(429, "slow down", headers={"Retry-After": "7"}), ok("hello"))
        ...  # base_url=server.url
        assert server.requests[1].body["model"] == "m"

A request with ``"stream": true`` is answered as OpenAI does, in Server-Sent Events
over chunked transfer encoding: a first chunk with the role, the content in pieces
(`Reply.chunk_size` words, or characters with ``chunk_unit="chars"``,
`Reply.chunk_delay_s` apart), a chunk with the finish_reason, a usage chunk when
``stream_options.include_usage`` is set (and the Reply has usage), ``data: [DONE]``.
`Reply.cut_after` closes the connection after that many pieces, `Reply.idle_after`
stops sending without closing. ``FakeLLM(stream_mode=...)`` plays a server that does not
stream: ``ignore`` answers one JSON body, ``reject`` answers 400 to ``stream``,
``reject_options`` answers 400 to ``stream_options``. Replies with a status other than
200 or a raw ``body`` are sent as they are, streamed request or not.

``python tests/llm_server.py [--delay 0.05] [--content-chars N] [--chunk-chars N]
[--chunk-delay S]`` serves until stdin closes, after printing its base URL on the first
line (the benchmark runs it in its own process).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            408: "Request Timeout", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Request:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lowercased."""
    body: Any
    """The JSON body, parsed (None when empty or not JSON)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """How to answer one request."""

    status: int = 200
    content: str | None = "hello"
    finish_reason: str = "stop"
    usage: tuple[int, int] | None = (10, 5)
    """(prompt_tokens, completion_tokens), or None to send no usage block."""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    """A raw body that replaces the generated one."""
    delay_s: float = 0.0
    """Seconds to wait before answering."""
    hang_up: bool = False
    """Close the connection instead of answering."""
    content_type: str = "application/json"
    """The Content-Type of a raw ``body`` (``text/event-stream`` for a raw stream)."""
    chunk_size: int = 1
    """Streamed: words (or characters, see ``chunk_unit``) of content per chunk."""
    chunk_unit: Literal["words", "chars"] = "words"
    chunk_delay_s: float = 0.0
    """Streamed: seconds between chunks."""
    cut_after: int | None = None
    """Streamed: close the connection after this many content chunks."""
    idle_after: int | None = None
    """Streamed: send nothing more after this many content chunks, and keep the
    connection open (until the client closes it or the server stops)."""


def ok(content: str = "hello", **kw: Any) -> Reply:
    """A chat completion whose message content is ``content``."""
    return Reply(content=content, **kw)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    """An OpenAI-style error body ``{"error": {"message": ...}}``."""
    body = json.dumps({"error": {"message": message, "type": "error", "code": None}})
    return Reply(status=status, body=body.encode(), headers=headers or {})


def raw(body: bytes, status: int = 200, content_type: str = "application/json") -> Reply:
    """A body sent as it is, for broken envelopes (and broken streams)."""
    return Reply(status=status, body=body, content_type=content_type)


def sse(*events: Any) -> Reply:
    """A raw ``text/event-stream`` body of ``data:`` events: each a chunk dict (sent as
    JSON) or bytes (sent as they are, like ``b"[DONE]"``)."""
    lines = [b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
             for e in events]
    return raw(b"".join(lines), content_type="text/event-stream")


Behaviour = Reply | Callable[[Request], Reply]
StreamMode = Literal["sse", "ignore", "reject", "reject_options"]


class FakeLLM:
    """The server; a context manager that starts and stops its thread."""

    def __init__(self, default: Behaviour | None = None, *,
                 reject_response_format: bool = False, record: bool = True,
                 stream_mode: StreamMode = "sse") -> None:
        self.default: Behaviour = default if default is not None else ok()
        self.reject_response_format = reject_response_format
        """Answer 400 to any request that has a ``response_format``, like llama.cpp once did."""
        self.stream_mode = stream_mode
        """How a request to stream is answered: ``sse``; ``ignore`` (one JSON body);
        ``reject`` (400 naming ``stream``); ``reject_options`` (400 to a request with
        ``stream_options``, SSE without)."""
        self.record = record
        self.requests: list[Request] = []
        self._script: collections.deque[Reply] = collections.deque()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fake-llm")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL, ending in ``/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order."""
        self._script.extend(replies)

    def start(self) -> FakeLLM:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the server, on its own loop -----------------------------------------------------------
    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its reply; False when the connection should close."""
        line = await reader.readline()
        if not line:
            return False
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        data = await reader.readexactly(length) if length else b""
        try:
            body = json.loads(data) if data else None
        except ValueError:
            body = None
        request = Request(method, path, headers, body)
        if self.record:
            self.requests.append(request)
        reply = self._reply_to(request)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.hang_up:
            return False
        streamed = isinstance(body, dict) and body.get("stream") is True \
            and self.stream_mode != "ignore"
        if streamed and reply.status == 200 and reply.body is None:
            if not await _stream(writer, reply, request):
                return False
        else:
            writer.write(_encode(reply, request))
            await writer.drain()
        return headers.get("connection", "").lower() != "close"

    def _reply_to(self, request: Request) -> Reply:
        if request.method == "GET" and request.path.endswith("/models"):
            models = {"object": "list", "data": [{"id": "m", "object": "model"}]}
            return raw(json.dumps(models).encode())
        body = request.body if isinstance(request.body, dict) else {}
        if self.reject_response_format and "response_format" in body:
            return error(400, "'response_format' is not supported by this server")
        if body.get("stream") is True and self.stream_mode == "reject":
            return error(400, "'stream' is not supported by this server")
        if "stream_options" in body and self.stream_mode == "reject_options":
            return error(400, "Unrecognized request argument supplied: stream_options")
        if self._script:
            return self._script.popleft()
        default = self.default
        return default(request) if callable(default) else default


def _encode(reply: Reply, request: Request) -> bytes:
    payload = reply.body
    if payload is None:
        body = request.body if isinstance(request.body, dict) else {}
        doc: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "fake"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": reply.finish_reason,
            }],
        }
        if reply.usage is not None:
            p, c = reply.usage
            doc["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        payload = json.dumps(doc).encode()
    head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}",
            f"Content-Type: {reply.content_type}", f"Content-Length: {len(payload)}",
            "Connection: keep-alive"]
    head += [f"{k}: {v}" for k, v in reply.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


_PIECES = re.compile(r"\S+\s*|\s+")
"""A word and the space after it (or leading space): the pieces join to the text."""


def pieces(reply: Reply) -> list[str]:
    """The content of ``reply`` in its streamed chunks."""
    text, n = reply.content or "", max(reply.chunk_size, 1)
    if reply.chunk_unit == "chars":
        return [text[i : i + n] for i in range(0, len(text), n)]
    words = _PIECES.findall(text)
    return ["".join(words[i : i + n]) for i in range(0, len(words), n)]


async def _stream(writer: asyncio.StreamWriter, reply: Reply, request: Request) -> bool:
    """Answer as Server-Sent Events; False when the connection was cut on purpose."""
    body = request.body if isinstance(request.body, dict) else {}
    options = body.get("stream_options")
    usage = isinstance(options, dict) and options.get("include_usage") is True
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": body.get("model", "fake")}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            doc["usage"] = None
        return _event(json.dumps(doc).encode())

    head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Cache-Control: no-cache",
            "Transfer-Encoding: chunked", "Connection: keep-alive"]
    head += [f"{k}: {v}" for k, v in reply.headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    writer.write(chunk({"role": "assistant", "content": ""}))
    for i, piece in enumerate(pieces(reply)):
        if reply.cut_after is not None and i >= reply.cut_after:
            await writer.drain()
            return False
        if reply.idle_after is not None and i >= reply.idle_after:
            await writer.drain()
            await asyncio.Event().wait()  # until the client hangs up or the server stops
        if reply.chunk_delay_s:
            await writer.drain()
            await asyncio.sleep(reply.chunk_delay_s)
        writer.write(chunk({"content": piece}))
    writer.write(chunk({}, reply.finish_reason))
    if usage and reply.usage is not None:
        p, c = reply.usage
        doc = {**base, "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c,
                                                "total_tokens": p + c}}
        writer.write(_event(json.dumps(doc).encode()))
    writer.write(_event(b"[DONE]") + b"0\r\n\r\n")
    await writer.drain()
    return True


def _event(data: bytes) -> bytes:
    """One ``data:`` event, as one HTTP chunk."""
    payload = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def main(argv: list[str]) -> None:
    """Serve until stdin closes. ``--delay S`` delays every default reply;
    ``--content-chars N`` makes its content N characters of prose, streamed in chunks of
    ``--chunk-chars N`` (else one word) ``--chunk-delay S`` apart."""

    def option(name: str, default: float) -> float:
        return float(argv[argv.index(name) + 1]) if name in argv else default

    reply = replace(ok(), delay_s=option("--delay", 0.0),
                    chunk_delay_s=option("--chunk-delay", 0.0))
    chars = int(option("--content-chars", 0))
    if chars:
        words = "The keeper climbed the stairs at dusk and lit the lamp for the boats. "
        reply = replace(reply, content=(words * (chars // len(words) + 1))[:chars])
    if "--chunk-chars" in argv:
        reply = replace(reply, chunk_unit="chars", chunk_size=int(option("--chunk-chars", 1)))
    with FakeLLM(reply, record=False) as server:
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main(sys.argv[1:])
