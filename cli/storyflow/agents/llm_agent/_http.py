"""The fence around httpx: pooled clients, one POST (streamed or not), its failures classified.

httpx is imported here and nowhere else in storyflow; its exceptions, non-2xx answers and
broken envelopes leave this module as storyflow's failures (chained with ``from``), never
as httpx's own. How they are classified is drawn in the package docstring.

A streamed POST (``client.stream``) has no httpx read timeout: a `Watch` gives the reply
``timeout`` seconds to begin and ``idle_timeout`` seconds between chunks once it has, at
the cost of a clock read per chunk where a timeout per read would arm a timer.
"""

from __future__ import annotations

import email.utils
import functools
import json
import ssl
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import httpx

from storyflow.agents.llm_agent._request import BASE_URL_ENV, Request, as_text
from storyflow.agents.llm_agent._stream import Events, Expired, Watch
from storyflow.errors import (
    InvalidOutput,
    PermanentError,
    StepFailure,
    StepTimeout,
    TransientError,
)

CLIENTS = 25
"""Most clients (connection pools) per (event loop, base URL): 100 connections in all."""
LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)
"""Each client's pool, every connection kept alive (httpx's default Limits keep 20 of 100,
so a burst of 100 calls reconnects 80 times)."""
_EXCERPT_CHARS = 300


@dataclass(slots=True)
class Reply:
    """One completed chat completion."""

    content: str
    finish: Any
    """Its ``finish_reason`` (``length``: cut at max_tokens)."""
    input_tokens: int | None
    output_tokens: int | None
    streamed: bool = False
    """Read from an event stream; else one JSON body (not asked to stream, or the
    server answered a request to stream without streaming)."""


class ClientFactory:
    """Makes one agent's clients, all sharing one SSL context (loaded on first use)."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._limits = limits
        self._ssl: ssl.SSLContext | None = None

    def __call__(self) -> httpx.AsyncClient:
        if self._ssl is None:  # loading the CA bundle takes ~30 ms: once per agent
            self._ssl = httpx.create_ssl_context()
        return httpx.AsyncClient(limits=self._limits, verify=self._ssl)


class Pool:
    """The clients of one base URL in one loop; a call takes the least busy one."""

    def __init__(self, make: Callable[[], httpx.AsyncClient], size: int, most: int) -> None:
        self._make = make
        self._size = size
        self._most = most
        self.clients: list[httpx.AsyncClient] = []
        self._busy: list[int] = []

    def take(self) -> int:
        """Index of the client to use; give it back with `give`."""
        busy = self._busy
        i = min(range(len(busy)), key=busy.__getitem__) if busy else -1
        if i < 0 or (busy[i] >= self._size and len(busy) < self._most):
            self.clients.append(self._make())
            busy.append(0)
            i = len(busy) - 1
        busy[i] += 1
        return i

    def give(self, i: int) -> None:
        self._busy[i] -= 1

    async def aclose(self) -> None:
        self._busy.clear()
        while self.clients:
            await self.clients.pop().aclose()


@dataclass(slots=True)
class LoopClients:
    """The pools of one event loop, and the async generator that closes them."""

    pools: dict[str, Pool] = field(default_factory=dict)
    closer: AsyncGenerator[None, None] | None = None


async def close_at_shutdown(pools: dict[str, Pool]) -> AsyncGenerator[None, None]:
    """Yields once; closing it (``loop.shutdown_asyncgens`` or `aclose`) closes the pools."""
    try:
        yield
    finally:
        while pools:
            await pools.popitem()[1].aclose()


async def post(pool: Pool, req: Request, body: dict[str, Any],
               on_text: Callable[[str], None] | None = None) -> Reply | httpx.Response:
    """POST ``body`` to the chat-completions URL: the `Reply`, or the server's non-2xx
    answer (read) for the caller to classify — `status_error`, or a retry without what
    the server does not support. With ``"stream": true`` in ``body`` the reply is read as
    its events arrive, each piece of text handed to ``on_text``. A failure to get an
    answer is translated."""
    url = f"{req.base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {req.key}"} if req.key else None
    i = pool.take()
    try:
        if body.get("stream"):
            return await _streamed(pool.clients[i], url, req, body, headers, on_text)
        resp = await pool.clients[i].post(url, json=body, headers=headers, timeout=req.timeout_s)
        return envelope(resp, req) if resp.is_success else resp
    except httpx.TimeoutException as exc:
        raise TransientError(
            f"no reply from {url} within {req.timeout_s:g}s ({type(exc).__name__})",
            hint="raise `with.timeout` or the step's timeout for slow models",
        ) from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise PermanentError(f"cannot call {url}: {exc}", hint="check `base_url`") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise TransientError(
            f"cannot reach the LLM server at {req.base_url}: {type(exc).__name__}: {exc}",
            hint=f"is the server running? check `base_url` (or ${BASE_URL_ENV})",
        ) from exc
    finally:
        pool.give(i)


async def _streamed(client: httpx.AsyncClient, url: str, req: Request, body: dict[str, Any],
                    headers: dict[str, str] | None,
                    on_text: Callable[[str], None] | None) -> Reply | httpx.Response:
    """The streamed POST. Transport failures before the stream begins are left to `post`;
    once it has, a cut or a silence leaves no reply — unless the reply was complete
    (``[DONE]`` or a ``finish_reason``) and only the end of the body went missing."""
    events: Events | None = None
    watch = Watch(req.timeout_s, req.idle_timeout_s)
    try:
        with watch:
            async with client.stream("POST", url, json=body, headers=headers,
                                     timeout=_stream_timeout(req.timeout_s)) as resp:
                watch.begin()
                if not resp.is_success or resp.headers.get("content-type", "").startswith(
                        "application/json"):  # an error, or a server that does not stream
                    await resp.aread()
                    return envelope(resp, req) if resp.is_success else resp
                events = Events(on_text or _ignore, req.base_url)
                beat, feed = watch.beat, events.feed
                # aiter_raw unless compressed: aiter_bytes adds a decoder and a chunker a read
                chunks = resp.aiter_bytes() if "content-encoding" in resp.headers \
                    else resp.aiter_raw()
                async for data in chunks:
                    beat()
                    feed(data)
    except Expired as exc:
        if events is None or not events.complete:
            raise _expired(exc, url, req, events) from None
    except (httpx.TransportError, httpx.DecodingError) as exc:
        if events is None:
            raise
        if not events.complete:
            raise TransientError(
                f"the stream from the LLM server at {req.base_url} was cut after "
                f"{events.chars} characters: {type(exc).__name__}: {exc}",
            ) from exc
    content, finish, usage = events.result()
    return Reply(content, finish, _tokens(usage.get("prompt_tokens")),
                 _tokens(usage.get("completion_tokens")), streamed=True)


@functools.lru_cache(maxsize=16)
def _stream_timeout(seconds: float) -> httpx.Timeout:
    """httpx's limits for a stream: ``seconds`` to connect and send, no read limit (the
    `Watch` keeps those)."""
    return httpx.Timeout(seconds, read=None)


def _expired(exc: Expired, url: str, req: Request, events: Events | None) -> StepFailure:
    if not exc.idle:
        return TransientError(
            f"no reply from {url} within {exc.seconds:g}s",
            hint="raise `with.timeout` or the step's timeout for slow models",
        )
    after = f" after {events.chars} characters" if events is not None else ""
    return StepTimeout(
        f"the stream from the LLM server at {req.base_url} went silent for "
        f"{exc.seconds:g}s{after}",
        hint="raise `with.idle_timeout` for a model that pauses mid-reply, "
        "or set `with.stream: false`",
    )


def _ignore(text: str) -> None:
    """The default ``on_text``: drops the text."""


def status_error(resp: httpx.Response, req: Request, now: float) -> StepFailure:
    """The failure a non-2xx answer stands for."""
    status = resp.status_code
    message = f"the LLM server answered HTTP {status}: {_excerpt(resp)}"
    if status in (408, 429) or status >= 500:
        return TransientError(message, retry_after_s=_retry_after_s(resp.headers, now))
    hint = None
    if status in (401, 403):
        hint = (f"check the API key in secret {req.key_secret}" if req.key else
                f"no API key was sent: declare `secrets: [{req.key_secret}]` on the agent")
    elif status == 404:
        hint = f"check `base_url` ({req.base_url}; most servers end in /v1) and `model`"
    return PermanentError(message, hint=hint)


def envelope(resp: httpx.Response, req: Request) -> Reply:
    """The reply in a 2xx JSON body; a broken one is transient."""
    try:
        data = resp.json()
        choice = data["choices"][0]
        message = choice["message"]
        content = message.get("content")
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise TransientError(
            f"the LLM server at {req.base_url} sent a reply that is not a chat completion: "
            f"{_excerpt(resp)}",
        ) from exc
    if not isinstance(content, str):
        refusal = message.get("refusal")
        if refusal:
            raise InvalidOutput(f"the model refused: {as_text(refusal)[:_EXCERPT_CHARS]}")
        raise TransientError(f"the LLM server at {req.base_url} sent a reply without text")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Reply(content, finish, _tokens(usage.get("prompt_tokens")),
                 _tokens(usage.get("completion_tokens")))


def _excerpt(resp: httpx.Response) -> str:
    """The server's error message, short and on one line."""
    text = resp.text
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail") or error
        text = error if isinstance(error, str) else json.dumps(error, ensure_ascii=False)
    text = " ".join(text.split()) or resp.reason_phrase or "(empty body)"
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…"


def _retry_after_s(headers: httpx.Headers, now: float) -> float | None:
    """``Retry-After`` (seconds or an HTTP date), or OpenAI's ``retry-after-ms``."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _tokens(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
