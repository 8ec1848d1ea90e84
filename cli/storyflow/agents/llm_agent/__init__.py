"""The ``llm`` agent: one chat completion against any OpenAI-compatible endpoint.

``with:`` keys — ``model`` (required), ``base_url`` (default ``$STORYFLOW_LLM_BASE_URL``,
else OpenAI's), ``system``, ``prompt`` and/or ``messages``, ``temperature``,
``max_tokens``, ``seed``, ``timeout`` (seconds per HTTP call; for a stream, until it
begins), ``stream`` (default true), ``idle_timeout`` (seconds a stream may go silent,
default 60), ``api_key_secret`` (default ``OPENAI_API_KEY``), ``repair_attempts``
(default 2), ``cache``, ``sample``, ``json_mode`` and ``params`` (passed verbatim into
the request body). Any other key is an error, so a typo never silently drops a setting —
except the ``builtin/grammar`` agent's ``grammar``, ``start`` and ``vars``, ignored so
that an environment may switch a grammar agent to this kind.

The key comes only from the agent's declared secrets; without it no Authorization
header is sent (local servers need none). It never reaches a log line or an error. A
key holding a line break (or another control character), or one beside a ``base_url``
that carries user:password@ (sent as Basic auth), is a PermanentError before any call.

How failures are classified (aiohttp is fenced in `_http`; its errors stop there):

    connection errors, timeouts, HTTP 408/429/5xx,   TransientError (Retry-After honoured)
    a broken response envelope, a stream cut
    before its end or a chunk that does not parse
    a stream silent for ``idle_timeout``             StepTimeout (class ``timeout``)
    other HTTP 4xx                                   PermanentError with the server's words
    content failing ``output_schema`` after repairs  InvalidOutput

Replies stream (``with.stream``, default true): the request asks for Server-Sent
Events with a usage chunk at the end (``stream_options.include_usage``), and each piece
of text goes to ``call.delta`` as it arrives (`_stream`) — a repair's reply too, after
a blank line, so that it does not read as the end of the reply it corrects. A stream whose
server sent no usage is metered from its text (`text_tokens`: UTF-8 bytes at 4 a token)
and flagged ``"estimated": true``; so is a stream that fails once its text has begun —
cut, silent, or stopped by the step's timeout: its prompt and the text that arrived were
generated, and a provider bills them, so they count against the budgets (a stream that
fails before any text counts nothing). A streamed refusal (``invalid_output``, retried) is
metered too: the server's usage, else its prompt and refusal counted the same way. A
server that rejects ``stream`` (HTTP 400) is asked again without it; one that ignores it
and answers one JSON body is taken at its word; one that rejects only ``stream_options``
streams without it. Either way, as for a server that rejects ``response_format``, the
finding is remembered per base URL (`_quirks`).
Streamed or not, a call is the same request to the cache, the budgets and the repairs.

With an ``output_schema`` the request asks for JSON mode and the system message carries
the schema; a reply that does not parse or validate is answered with the validation
error, up to ``repair_attempts`` extra calls within the same attempt. A server that
rejects ``response_format`` is retried without it, and remembered.

Before each completion (the first call and each repair) the agent asks
``call.reserve`` for room with the call's estimate (`Request.estimate`: the prompt at
3 UTF-8 bytes a token, plus ``max_tokens`` or `DEFAULT_REPLY_TOKENS`); a refusal
(``budget_exceeded``) means the call is not sent. Every completed HTTP call, every
stream that failed after its text began and every streamed refusal is reported to
``call.meter``. With ``call.cache`` and caching on (``cache:``, else when ``temperature``
is 0 or a ``seed`` is set) a validated reply is stored under a hash of the request, and
served again without HTTP (no reservation, nothing spent).

Connections are pooled per (event loop, base URL) and shared by every call: one aiohttp
session of up to ``CONNECTIONS`` kept-alive connections; a call's ``timeout`` starts once
it has one, not while it waits for one. aiohttp, with its C HTTP parser, spends ~0.17 ms
of CPU per call where httpx spends ~0.7 ms (bench/bench_llm.py). ``$HTTP_PROXY`` and
``$HTTPS_PROXY`` (http:// or https:// proxies) and ``$NO_PROXY`` are honoured. The
sessions close when their loop shuts down its async generators (``asyncio.run`` does)
or on `LlmAgent.aclose`.

The package, in the order a call goes through it: `_request` (``with:`` keys → a checked
request, its cache key), `_quirks` (what each endpoint lacks; the body without it),
`_http` (pooled clients, the POST, failures classified), `_stream` (a streamed reply's
events; the watch on its silence), `_structured` (a reply's JSON, validated; repair
prompts), and here the agent that drives them, meters usage and keeps the key out of logs
and errors.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from storyflow.agents.base import Call
from storyflow.agents.llm_agent._http import (
    CONNECTIONS,
    ClientFactory,
    LoopClients,
    Pool,
    Reply,
    close_at_shutdown,
    post,
    status_error,
)
from storyflow.agents.llm_agent._quirks import NOTES, Quirks
from storyflow.agents.llm_agent._request import (
    BASE_URL_ENV,
    CACHE_FORMAT,
    DEFAULT_BASE_URL,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_KEY_SECRET,
    DEFAULT_REPAIRS,
    DEFAULT_REPLY_TOKENS,
    DEFAULT_TIMEOUT_S,
    KEYS,
    OFFLINE_KEYS,
    Request,
    canonical,
    reported_tokens,
    request_of,
    text_tokens,
)
from storyflow.agents.llm_agent._stream import Refused
from storyflow.agents.llm_agent._structured import checked, repair_prompt, validator_of
from storyflow.agents.urls import masked
from storyflow.errors import InvalidOutput, PermanentError, StepFailure

__all__ = [
    "BASE_URL_ENV",
    "CACHE_FORMAT",
    "CONNECTIONS",
    "DEFAULT_BASE_URL",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_KEY_SECRET",
    "DEFAULT_REPAIRS",
    "DEFAULT_REPLY_TOKENS",
    "DEFAULT_TIMEOUT_S",
    "KEYS",
    "OFFLINE_KEYS",
    "LlmAgent",
]


class LlmAgent:
    """Chat completions; the output is the reply text, or its JSON with an output_schema."""

    kind: str = "llm"
    required: tuple[str, ...] = ()
    environ_keys: tuple[str, ...] = (BASE_URL_ENV,)
    """What it reads of the environment; an executor sends the coordinator's values."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        connections: int = CONNECTIONS,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._connections = connections
        """Most connections per (event loop, base URL)."""
        self._new_client = ClientFactory()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopClients] = (
            weakref.WeakKeyDictionary()
        )
        self._quirks: dict[str, Quirks] = {}
        """Base URL → what its server was found to lack."""
        self._validators: dict[str, Any] = {}

    async def run(self, call: Call) -> Any:
        """Ask the model once (plus any repairs) and return its reply."""
        req = request_of(call, call.environ or self._environ)
        try:
            return await self._run(call, req)
        except StepFailure as exc:
            _scrub(exc, req.key)
            raise

    async def aclose(self) -> None:
        """Close this event loop's connections (the next call opens new ones)."""
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None and state.closer is not None:
            await state.closer.aclose()

    def cached(self, call: Call) -> tuple[bool, Any]:
        """``(True, output)`` when the call cache answers ``call`` (metered as a cached
        call), else ``(False, None)``: an executor asks before sending the call away."""
        try:
            req = request_of(call, call.environ or self._environ)
        except StepFailure:
            return False, None
        return self._from_cache(call, req)

    def estimate(self, call: Call) -> dict[str, Any] | None:
        """What one attempt of ``call`` may use at most — its first call and every repair
        call — for `Call.reserve`: an executor that runs the attempt elsewhere reserves
        it up front (a worker cannot ask the budgets). None for a call that cannot be
        made."""
        try:
            req = request_of(call, call.environ or self._environ)
        except StepFailure:
            return None
        return req.attempt_estimate(repairs=req.repairs if call.output_schema is not None else 0)

    def _from_cache(self, call: Call, req: Request) -> tuple[bool, Any]:
        cache = call.cache if req.cache else None
        if cache is None:
            return False, None
        schema = call.output_schema
        validator = self._validator(schema) if schema is not None else None
        hit, stored = cache.get(req.cache_key())
        if hit and isinstance(stored, dict) and "output" in stored and (
            validator is None or validator.is_valid(stored["output"])
        ):
            call.meter(_usage(req.model, stored.get("input_tokens"),
                              stored.get("output_tokens"), cached=True))
            return True, stored["output"]
        return False, None

    async def _run(self, call: Call, req: Request) -> Any:
        schema = call.output_schema
        validator = self._validator(schema) if schema is not None else None
        cache = call.cache if req.cache else None
        key = req.cache_key() if cache is not None else ""
        hit, output = self._from_cache(call, req)
        if hit:
            return output

        def log(line: str) -> None:
            call.log(_redact(line, req.key))

        messages = req.messages
        reply = await self._complete(req, messages, call, log)
        used_in, used_out = reply.input_tokens, reply.output_tokens
        attempt = 0
        while True:
            output, problem = checked(reply.content, validator)
            if problem is None:
                break
            if attempt == req.repairs:
                raise InvalidOutput(
                    f"the reply does not match output_schema"
                    f"{f' after {attempt} repair(s)' if attempt else ''}: {problem}",
                    hint="loosen output_schema, raise max_tokens or repair_attempts, "
                    "or use a model that follows JSON instructions",
                )
            attempt += 1
            log(f"the reply does not match output_schema ({problem}); "
                f"asking for a correction ({attempt}/{req.repairs})")
            messages = [*messages, {"role": "assistant", "content": reply.content},
                        {"role": "user", "content": repair_prompt(problem)}]
            if reply.streamed and reply.content:  # the correction streams after a blank line
                ends = len(reply.content) - len(reply.content.rstrip("\n"))
                if ends < 2:
                    call.delta("\n" * (2 - ends))
            reply = await self._complete(req, messages, call, log)
            used_in, used_out = _add(used_in, reply.input_tokens), _add(used_out,
                                                                        reply.output_tokens)
        if cache is not None:
            cache.put(key, {"output": output, "input_tokens": used_in, "output_tokens": used_out})
        return output

    async def _complete(self, req: Request, messages: list[dict[str, Any]], call: Call,
                        log: Callable[[str], None]) -> Reply:
        """One chat completion, streamed unless the step or the server says otherwise. A
        server that rejects a feature (``response_format``, ``stream``, ``stream_options``)
        is asked again without it: the rejected call used nothing, so all go under one
        reservation."""
        _sendable(req)
        release = await call.reserve(req.estimate(messages))  # BudgetExceeded: not sent
        try:
            pool = await self._pool(req.base_url)
            known = self._quirks.get(req.base_url)
            if known is None:
                known = self._quirks[req.base_url] = Quirks()
            quirks = known.copy()  # what this call asks for; calls beside it may find more

            def drop(feature: str) -> None:
                quirks.drop(feature)
                known.drop(feature)
                log(f"note: {masked(req.base_url)} {NOTES[feature]}")

            received: list[str] = []

            def on_text(text: str) -> None:
                received.append(text)
                call.delta(text)

            while True:
                body = quirks.body(req, messages)
                try:
                    answer = await post(pool, req, body, on_text)
                except BaseException as exc:  # cut, silent, stopped or refused: billed
                    spent = _spent(req.model, messages, "".join(received), exc)
                    if spent is not None:
                        call.meter(spent)
                    raise
                if isinstance(answer, Reply):
                    break
                lacks = quirks.refused(answer.status, answer.text, req)
                if lacks is None:
                    raise status_error(answer, req, self._clock())
                drop(lacks)
            reply = answer
            if body.get("stream") and not reply.streamed:  # one JSON body: taken at its word
                drop("ignored")
            estimated = reply.streamed and (reply.input_tokens is None
                                            or reply.output_tokens is None)
            if estimated:  # no usage chunk: a stream's server may not send one
                if reply.input_tokens is None:
                    reply.input_tokens = text_tokens(canonical(messages))
                if reply.output_tokens is None:
                    reply.output_tokens = text_tokens(reply.content)
            truncated = reply.finish == "length"
            call.meter(_usage(req.model, reply.input_tokens, reply.output_tokens,
                              truncated=truncated, estimated=estimated))
        finally:
            release()
        if truncated:
            limit = req.options.get("max_tokens")
            log(f"warning: the reply was truncated at max_tokens"
                f"{f' ({limit})' if limit is not None else ''}; raise max_tokens "
                "or ask for a shorter reply")
        return reply

    async def _pool(self, base_url: str) -> Pool:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = LoopClients()
            state.closer = close_at_shutdown(state.pools)
            await anext(state.closer)  # the loop now tracks it: shutdown_asyncgens closes it
        pool = state.pools.get(base_url)
        if pool is None:
            pool = state.pools[base_url] = Pool(
                functools.partial(self._new_client, base_url, self._connections))
        return pool

    def _validator(self, schema: dict[str, Any]) -> Any:
        text = canonical(schema)
        validator = self._validators.get(text)
        if validator is None:
            validator = self._validators[text] = validator_of(schema)
        return validator


def _usage(model: str, input_tokens: Any, output_tokens: Any, *, cached: bool = False,
           truncated: bool = False, estimated: bool = False) -> dict[str, Any]:
    """A `Call.meter` report; ``estimated`` (only when true) marks tokens counted from the
    text because the server reported none."""
    usage = {"model": model, "input_tokens": input_tokens, "output_tokens": output_tokens,
             "cached": cached, "truncated": truncated}
    if estimated:
        usage["estimated"] = True
    return usage


def _spent(model: str, messages: list[dict[str, Any]], text: str,
           exc: BaseException) -> dict[str, Any] | None:
    """The `Call.meter` report of a call that failed once the model had written: a
    stream that failed after its ``text`` began (counted from the text), or a refusal
    (the server's usage, else counted from the refusal). None when nothing was written."""
    tin = tout = None
    if isinstance(exc, Refused):
        text = text or exc.text
        tin = reported_tokens(exc.usage.get("prompt_tokens"))
        tout = reported_tokens(exc.usage.get("completion_tokens"))
        if not exc.streamed:  # a whole reply: the server's count, as for any whole reply
            return _usage(model, tin, tout)
    if not text and tin is None and tout is None:
        return None
    return _usage(model, text_tokens(canonical(messages)) if tin is None else tin,
                  text_tokens(text) if tout is None else tout,
                  estimated=tin is None or tout is None)


def _add(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


# -- the key ---------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
"""What no header value may hold (aiohttp refuses to send it)."""


def _sendable(req: Request) -> None:
    """Refuse, before anything is sent, a key no header can carry, or a key beside the
    user:password@ of ``base_url`` (aiohttp sends those as Basic auth: one header each)."""
    if not req.key:
        return
    if _CONTROL.search(req.key):
        raise PermanentError(
            f"the API key in secret {req.key_secret} contains a line break or another "
            "control character",
            hint="remove it from the secret's value (a trailing newline of the file it was "
            "read from?)")
    if any("@" in netloc for netloc in req.base_url.split("/", 3)[2:3]):
        raise PermanentError(
            f"`base_url` carries a user name and the agent an API key (secret "
            f"{req.key_secret}): a request has one Authorization header",
            hint="remove user:password@ from `base_url`, or the secret from the agent")


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def _scrub(exc: StepFailure, key: str | None) -> None:
    """Remove the API key from a failure's message and hint (servers echo it)."""
    if key and (key in exc.message or (exc.hint and key in exc.hint)):
        exc.message = _redact(exc.message, key)
        exc.args = (exc.message,)
        if exc.hint:
            exc.hint = _redact(exc.hint, key)
