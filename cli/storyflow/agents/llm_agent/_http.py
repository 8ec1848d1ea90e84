"""The fence around aiohttp: pooled sessions, one POST (streamed or not), its failures classified.

aiohttp is imported here and nowhere else in storyflow (yarl, its URLs, here and in
`_proxy`); its exceptions, non-2xx answers and broken envelopes leave this module as
storyflow's failures (chained with ``from``), never as aiohttp's own, and on one line in
its words (`_unreachable`, `_reason`), every URL in them `masked`. How they are
classified is drawn in the package docstring.

A streamed POST has no aiohttp read timeout: a `Watch` gives the reply ``timeout``
seconds to begin and ``idle_timeout`` seconds between chunks once it has, at the cost of
a clock read per chunk where a timeout per read would arm a timer.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import math
import os
import re
import socket
import ssl
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import aiohttp
from yarl import URL

from storyflow.agents.llm_agent._proxy import env_proxy, masked
from storyflow.agents.llm_agent._request import (
    BASE_URL_ENV,
    Request,
    as_text,
    reported_tokens,
)
from storyflow.agents.llm_agent._stream import Events, Expired, Refused, Watch
from storyflow.errors import (
    PermanentError,
    StepFailure,
    StepTimeout,
    TransientError,
)

CONNECTIONS = 100
"""Most connections per (event loop, base URL), each kept alive `KEEPALIVE_S` idle."""
KEEPALIVE_S = 30.0
_EXCERPT_CHARS = 300
_JSON = {"Content-Type": "application/json"}
_BAD_URL = (aiohttp.InvalidURL, getattr(aiohttp, "NonHttpUrlClientError", aiohttp.InvalidURL))
"""What aiohttp raises for a URL it cannot call (a scheme not http(s): aiohttp ≥ 3.10)."""
_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")


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


@dataclass(frozen=True, slots=True)
class Answer:
    """A non-2xx answer, read whole, for the caller to classify (`status_error`)."""

    status: int
    reason: str
    headers: Mapping[str, str]
    """Case-insensitive."""
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(slots=True)
class Client:
    """One aiohttp session to one base URL, the proxy (if any) it goes through, and the
    ``slots`` a call takes before its timeouts start: one per connection, so a call that
    waits for one is not spending its ``timeout`` (aiohttp's would count the wait)."""

    session: aiohttp.ClientSession
    proxy: URL | None
    proxy_headers: dict[str, str] | None
    slots: asyncio.Semaphore
    shown_proxy: str | None = None
    """The proxy's URL as messages show it (`masked`)."""

    @property
    def is_closed(self) -> bool:
        return self.session.closed


class ClientFactory:
    """Makes one agent's sessions, all sharing one SSL context (loaded on first use)."""

    def __init__(self) -> None:
        self._ssl: ssl.SSLContext | None = None

    def __call__(self, base_url: str, connections: int) -> Client:
        """A session of ``connections`` to ``base_url``; made in the loop it serves."""
        proxy = env_proxy(base_url)  # first: it may refuse the proxy
        tls: ssl.SSLContext | bool = True  # unused by plain-HTTP connections
        if base_url.startswith("https:") or (proxy is not None and proxy.url.scheme == "https"):
            if self._ssl is None:  # loading the CA bundle takes ~30 ms: once per agent
                self._ssl = _ssl_context()
            tls = self._ssl
        url, auth, shown = (proxy.url, proxy.headers, proxy.shown) if proxy is not None \
            else (None, None, None)
        headers = _JSON  # to an http:// server, the request itself goes to the proxy (aiohttp
        if auth is not None and base_url.startswith("http:"):  # sends proxy_headers on CONNECT)
            headers, auth = {**_JSON, **auth}, None
        connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=KEEPALIVE_S,
                                         ssl=tls)
        return Client(aiohttp.ClientSession(connector=connector, headers=headers), url, auth,
                      asyncio.Semaphore(connections), shown)


def _ssl_context() -> ssl.SSLContext:
    """The CAs an https call trusts: ``$SSL_CERT_FILE``, ``$SSL_CERT_DIR``, else certifi's
    bundle when it is installed, else the system's."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class Pool:
    """The connections of one base URL in one loop: one session, made on the first call.

    One connector of 100 connections spends no more CPU per call than 25 of 4 (L1 0.72 s
    either way, bench/bench_llm.py): aiohttp's pool takes and gives back a connection in
    constant time, where httpcore's scanned all of them."""

    __slots__ = ("_client", "_make")

    def __init__(self, make: Callable[[], Client]) -> None:
        self._make = make
        self._client: Client | None = None

    def client(self) -> Client:
        """Its session, made on the first call."""
        if self._client is None:
            self._client = self._make()
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.session.close()


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
               on_text: Callable[[str], None] | None = None) -> Reply | Answer:
    """POST ``body`` to the chat-completions URL: the `Reply`, or the server's non-2xx
    `Answer` for the caller to classify — `status_error`, or a retry without what the
    server does not support. With ``"stream": true`` in ``body`` the reply is read as
    its events arrive, each piece of text handed to ``on_text``. A failure to get an
    answer is translated."""
    url = f"{req.base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {req.key}"} if req.key else None
    client = pool.client()
    try:
        async with client.slots:
            if body.get("stream"):
                return await _streamed(client, url, req, body, headers, on_text)
            async with client.session.post(
                    url, data=json.dumps(body).encode(), headers=headers,
                    allow_redirects=False, timeout=_timeout(req.timeout_s), proxy=client.proxy,
                    proxy_headers=client.proxy_headers) as resp:
                data = await resp.read()
        return envelope(data, resp.reason, req) if 200 <= resp.status < 300 else \
            _answer(resp, data)
    except TimeoutError as exc:  # aiohttp's ServerTimeoutError is one
        raise TransientError(
            f"no reply from {masked(url)} within {req.timeout_s:g}s ({type(exc).__name__})",
            hint="raise `with.timeout` or the step's timeout for slow models",
        ) from exc
    except _BAD_URL as exc:  # aiohttp's own words are the URL: say why, when it knows
        why = exc.__cause__ or "not a valid http(s) URL"
        raise PermanentError(masked(f"cannot call {url}: {why}"), hint="check `base_url`") \
            from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise _unreachable(exc, req, client) from exc


async def _streamed(client: Client, url: str, req: Request, body: dict[str, Any],
                    headers: dict[str, str] | None,
                    on_text: Callable[[str], None] | None) -> Reply | Answer:
    """The streamed POST. Transport failures before the stream begins are left to `post`;
    once it has, a cut or a silence leaves no reply — unless the reply was complete
    (``[DONE]`` or a ``finish_reason``) and only the end of the body went missing."""
    events: Events | None = None
    watch = Watch(req.timeout_s, req.idle_timeout_s)
    try:
        with watch:
            async with client.session.post(
                    url, data=json.dumps(body).encode(), headers=headers,
                    allow_redirects=False, timeout=_timeout(req.timeout_s, True),
                    proxy=client.proxy, proxy_headers=client.proxy_headers) as resp:
                watch.begin()
                ok = 200 <= resp.status < 300
                if not ok or resp.headers.get("Content-Type", "").startswith(
                        "application/json"):  # an error, or a server that does not stream
                    data = await resp.read()
                    return envelope(data, resp.reason, req) if ok else _answer(resp, data)
                events = Events(on_text or _ignore, masked(req.base_url))
                beat, feed = watch.beat, events.feed
                async for data in resp.content.iter_any():  # decompressed, if it was
                    beat()
                    feed(data)
    except Expired as exc:
        if events is None or not events.complete:
            raise _expired(exc, url, req, events) from None
    except (aiohttp.ClientError, OSError) as exc:
        if events is None:
            raise
        if not events.complete:
            raise TransientError(
                f"the stream from the LLM server at {masked(req.base_url)} was cut after "
                f"{events.chars} characters: {_reason(exc)}",
            ) from exc
    content, finish, usage = events.result()
    return Reply(content, finish, reported_tokens(usage.get("prompt_tokens")),
                 reported_tokens(usage.get("completion_tokens")), streamed=True)


def _unreachable(exc: BaseException, req: Request, client: Client) -> TransientError:
    """A failure to get an answer, in storyflow's words on one line, with what to check."""
    where, proxy = f"the LLM server at {masked(req.base_url)}", client.proxy
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TransientError(f"the answer from {where} could not be read: {_reason(exc)}")
    if type(exc) is aiohttp.ClientResponseError:  # what came could not be parsed
        return TransientError(f"{where} did not answer in HTTP: {_reason(exc)}",
                              hint="check `base_url`: it names an OpenAI-compatible server")
    hint = f"is the server running? check `base_url` (or ${BASE_URL_ENV})"
    at = (exc.host, exc.port) if isinstance(exc, aiohttp.ClientConnectorError) else None
    if proxy is not None and (at == (proxy.host, proxy.port) or isinstance(
            exc, aiohttp.ClientHttpProxyError)):
        where = f"{where} through the proxy {client.shown_proxy or masked(str(proxy))}"
        hint = "check $HTTP_PROXY and $HTTPS_PROXY, or exempt the server in $NO_PROXY"
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        hint = "if a private CA signed it, point $SSL_CERT_FILE at that CA's certificate"
    elif isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        hint = "is it a plain-HTTP server? then `base_url` begins with http://"
    reason = "it closed the connection without answering" if isinstance(
        exc, aiohttp.ServerDisconnectedError) else _reason(exc)
    return TransientError(f"cannot reach {where}: {reason}", hint=hint)


def _reason(exc: BaseException) -> str:
    """What a transport failure says, on one line, without aiohttp's framing."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        return f"its TLS certificate is not trusted ({getattr(cert, 'verify_message', cert)})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, ssl.SSLError):
        what = exc.reason or _line(exc.strerror)
        return f"the TLS handshake failed ({what.lower().replace('_', ' ')})"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve its host name ({_line(exc.strerror)})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the proxy answered HTTP {exc.status}"
    said = getattr(exc, "message", None) or getattr(exc.__cause__, "message", None)
    if said:  # aiohttp's parser (not HTTP) or payload (cut, not decompressing) errors
        return _line(said)
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        text = os.strerror(exc.errno)  # "Connection refused", not "Connect call failed"
        return text[:1].lower() + text[1:]
    return _line(exc) or type(exc).__name__  # not aiohttp's class names


def _line(said: object) -> str:
    text = masked(" ".join(_SSL_SOURCE.sub("", str(said)).split()))
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…"


@functools.lru_cache(maxsize=16)
def _timeout(seconds: float, stream: bool = False) -> aiohttp.ClientTimeout:
    """aiohttp's limits: ``seconds`` to connect and, unless it is a ``stream`` (the `Watch`
    keeps those), between reads; none on the whole, nor for an infinite ``seconds``."""
    limit = seconds if math.isfinite(seconds) else None  # aiohttp would round inf: a crash
    return aiohttp.ClientTimeout(total=None, connect=limit, sock_connect=limit,
                                 sock_read=None if stream else limit)


def _answer(resp: aiohttp.ClientResponse, body: bytes) -> Answer:
    return Answer(resp.status, resp.reason or "", resp.headers, body)


def _expired(exc: Expired, url: str, req: Request, events: Events | None) -> StepFailure:
    if not exc.idle:
        return TransientError(
            f"no reply from {masked(url)} within {exc.seconds:g}s",
            hint="raise `with.timeout` or the step's timeout for slow models",
        )
    after = f" after {events.chars} characters" if events is not None else ""
    return StepTimeout(
        f"the stream from the LLM server at {masked(req.base_url)} went silent for "
        f"{exc.seconds:g}s{after}",
        hint="raise `with.idle_timeout` for a model that pauses mid-reply, "
        "or set `with.stream: false`",
    )


def _ignore(text: str) -> None:
    """The default ``on_text``: drops the text."""


def status_error(answer: Answer, req: Request, now: float) -> StepFailure:
    """The failure a non-2xx answer stands for."""
    status = answer.status
    message = f"the LLM server answered HTTP {status}: {_excerpt(answer.body, answer.reason)}"
    if status in (408, 429) or status >= 500:
        return TransientError(message, retry_after_s=_retry_after_s(answer.headers, now))
    hint = None
    if status in (401, 403):
        hint = (f"check the API key in secret {req.key_secret}" if req.key else
                f"no API key was sent: declare `secrets: [{req.key_secret}]` on the agent")
    elif status == 404:
        hint = f"check `base_url` ({masked(req.base_url)}; most servers end in /v1) and `model`"
    return PermanentError(message, hint=hint)


def envelope(body: bytes, reason: str | None, req: Request) -> Reply:
    """The reply in a 2xx JSON ``body``; a broken one is transient."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        message = choice["message"]
        content = message.get("content")
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise TransientError(
            f"the LLM server at {masked(req.base_url)} sent a reply that is not a chat "
            f"completion: {_excerpt(body, reason)}",
        ) from exc
    if not isinstance(content, str):
        refusal = message.get("refusal")
        if refusal:
            usage = data.get("usage")
            raise Refused(as_text(refusal), usage if isinstance(usage, dict) else {},
                          streamed=False)
        raise TransientError(
            f"the LLM server at {masked(req.base_url)} sent a reply without text")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Reply(content, finish, reported_tokens(usage.get("prompt_tokens")),
                 reported_tokens(usage.get("completion_tokens")))


def _excerpt(body: bytes, reason: str | None) -> str:
    """The server's error message, short and on one line."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail") or error
        text = error if isinstance(error, str) else json.dumps(error, ensure_ascii=False)
    text = " ".join(text.split()) or reason or "(empty body)"
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…"


def _retry_after_s(headers: Mapping[str, str], now: float) -> float | None:
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
