"""The ``llm`` agent: one chat completion against any OpenAI-compatible endpoint.

``with:`` keys — ``model`` (required), ``base_url`` (default ``$STORYFLOW_LLM_BASE_URL``,
else OpenAI's), ``system``, ``prompt`` and/or ``messages``, ``temperature``,
``max_tokens``, ``seed``, ``timeout`` (seconds per HTTP call), ``api_key_secret``
(default ``OPENAI_API_KEY``), ``repair_attempts`` (default 2), ``cache``, ``sample``,
``json_mode`` and ``params`` (passed verbatim into the request body). Any other key is
an error, so a typo never silently drops a setting — except the ``builtin/grammar``
agent's ``grammar``, ``start`` and ``vars``, ignored so that an environment may switch
a grammar agent to this kind.

The key comes only from the agent's declared secrets; without it no Authorization
header is sent (local servers need none). It never reaches a log line or an error.

How failures are classified (httpx is fenced in this module; its errors stop here):

    connection errors, timeouts, HTTP 408/429/5xx,   TransientError (Retry-After honoured)
    a broken response envelope
    other HTTP 4xx                                   PermanentError with the server's words
    content failing ``output_schema`` after repairs  InvalidOutput

With an ``output_schema`` the request asks for JSON mode and the system message carries
the schema; a reply that does not parse or validate is answered with the validation
error, up to ``repair_attempts`` extra calls within the same attempt. A server that
rejects ``response_format`` is retried without it, and remembered.

Every completed HTTP call is reported to ``call.meter``. With ``call.cache`` and caching
on (``cache:``, else when ``temperature`` is 0 or a ``seed`` is set) a validated reply
is stored under a hash of the request, and served again without HTTP.

Connections are pooled per (event loop, base URL) and shared by every call: up to
``CLIENTS`` small httpx clients of ``LIMITS`` each, a call taking the least
busy one. One client of 100 connections would be simpler, but httpcore 1.0's pool scans
all its connections for each request it queues or releases, quadratic in its size:
at 100 concurrent calls, 25 pools of 4 spend ~7x less CPU per call than one pool of
100 (bench/bench_llm.py). The clients close when their loop shuts down its async
generators (``asyncio.run`` does) or on `LlmAgent.aclose`.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import re
import ssl
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import httpx

from storyflow.agents.base import Call
from storyflow.errors import InvalidOutput, PermanentError, StepFailure, TransientError
from storyflow.spec.units import did_you_mean

BASE_URL_ENV = "STORYFLOW_LLM_BASE_URL"
"""The environment variable naming the default endpoint."""
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT_S = 120.0
"""Seconds per HTTP call when neither ``with.timeout`` nor the step's timeout is set."""
DEFAULT_KEY_SECRET = "OPENAI_API_KEY"
DEFAULT_REPAIRS = 2
CLIENTS = 25
"""Most clients (connection pools) per (event loop, base URL): 100 connections in all."""
LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)
"""Each client's pool, every connection kept alive (httpx's default Limits keep 20 of 100,
so a burst of 100 calls reconnects 80 times)."""
CACHE_FORMAT = 1
"""Part of every call-cache key; bump it when the stored shape changes."""
KEYS = frozenset({
    "model", "base_url", "system", "prompt", "messages", "temperature", "max_tokens",
    "seed", "timeout", "api_key_secret", "repair_attempts", "cache", "sample",
    "json_mode", "params",
})
"""Every ``with`` key the agent reads."""
OFFLINE_KEYS = frozenset({"grammar", "start", "vars"})
"""The ``builtin/grammar`` agent's keys, ignored: an environment (``--env llm``) can
switch a grammar agent to this kind, and a deep merge cannot remove its keys."""
_RESERVED_PARAMS = frozenset({"model", "messages", "stream"})
_EXCERPT_CHARS = 300
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)\n?\s*```", re.DOTALL)


@dataclass(frozen=True, slots=True)
class _Request:
    """One step's request settings, checked."""

    base_url: str
    model: str
    messages: list[dict[str, Any]]
    options: dict[str, Any]
    """Body fields besides model and messages: ``params`` plus temperature, max_tokens, seed."""
    timeout_s: float
    key: str | None = field(repr=False)
    key_secret: str
    repairs: int
    cache: bool
    sample: int
    json_mode: bool

    def body(self, messages: list[dict[str, Any]], *, json_mode: bool) -> dict[str, Any]:
        body = {**self.options, "model": self.model, "messages": messages}
        if json_mode and "response_format" not in self.options:
            body["response_format"] = {"type": "json_object"}
        return body

    def cache_key(self) -> str:
        request = {
            "format": CACHE_FORMAT,
            "base_url": self.base_url,
            "model": self.model,
            "messages": self.messages,
            "options": self.options,
            "sample": self.sample,
        }
        return "llm:" + hashlib.sha256(_canonical(request).encode("utf-8")).hexdigest()


@dataclass(slots=True)
class _Reply:
    """One completed HTTP call."""

    content: str
    input_tokens: int | None
    output_tokens: int | None


class _Pool:
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
class _LoopClients:
    """The pools of one event loop, and the async generator that closes them."""

    pools: dict[str, _Pool] = field(default_factory=dict)
    closer: AsyncGenerator[None, None] | None = None


class LlmAgent:
    """Chat completions; the output is the reply text, or its JSON with an output_schema."""

    kind: str = "llm"
    required: tuple[str, ...] = ()

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        limits: httpx.Limits = LIMITS,
        clients: int = CLIENTS,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._limits = limits
        self._clients = clients
        self._ssl: ssl.SSLContext | None = None
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = (
            weakref.WeakKeyDictionary()
        )
        self._no_response_format: set[str] = set()
        """Base URLs whose server rejected ``response_format``."""
        self._validators: dict[str, Any] = {}

    async def run(self, call: Call) -> Any:
        """Ask the model once (plus any repairs) and return its reply."""
        req = _request(call, self._environ)
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

    async def _run(self, call: Call, req: _Request) -> Any:
        schema = call.output_schema
        validator = self._validator(schema) if schema is not None else None
        cache = call.cache if req.cache else None
        key = req.cache_key() if cache is not None else ""
        if cache is not None:
            hit, stored = cache.get(key)
            if hit and isinstance(stored, dict) and "output" in stored and (
                validator is None or validator.is_valid(stored["output"])
            ):
                call.meter(_usage(req.model, stored.get("input_tokens"),
                                  stored.get("output_tokens"), cached=True))
                return stored["output"]

        def log(line: str) -> None:
            call.log(_redact(line, req.key))

        messages = req.messages
        reply = await self._complete(req, messages, call, log)
        used_in, used_out = reply.input_tokens, reply.output_tokens
        attempt = 0
        while True:
            output, problem = _checked(reply.content, validator)
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
                        {"role": "user", "content": _repair_prompt(problem)}]
            reply = await self._complete(req, messages, call, log)
            used_in, used_out = _add(used_in, reply.input_tokens), _add(used_out,
                                                                        reply.output_tokens)
        if cache is not None:
            cache.put(key, {"output": output, "input_tokens": used_in, "output_tokens": used_out})
        return output

    async def _complete(self, req: _Request, messages: list[dict[str, Any]], call: Call,
                        log: Callable[[str], None]) -> _Reply:
        """One chat completion (two HTTP calls if the server rejects JSON mode)."""
        pool = await self._pool(req.base_url)
        json_mode = req.json_mode and req.base_url not in self._no_response_format
        resp = await _post(pool, req, req.body(messages, json_mode=json_mode))
        if json_mode and resp.status_code == 400 and "response_format" in resp.text.lower():
            self._no_response_format.add(req.base_url)
            log(f"note: {req.base_url} does not support response_format; "
                "retrying without JSON mode (the prompt still asks for JSON)")
            resp = await _post(pool, req, req.body(messages, json_mode=False))
        if not resp.is_success:
            raise _status_error(resp, req, self._clock())
        content, finish, prompt_tokens, completion_tokens = _envelope(resp, req)
        truncated = finish == "length"
        call.meter(_usage(req.model, prompt_tokens, completion_tokens, truncated=truncated))
        if truncated:
            limit = req.options.get("max_tokens")
            log(f"warning: the reply was truncated at max_tokens"
                f"{f' ({limit})' if limit is not None else ''}; raise max_tokens "
                "or ask for a shorter reply")
        return _Reply(content, prompt_tokens, completion_tokens)

    async def _pool(self, base_url: str) -> _Pool:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopClients()
            state.closer = _close_at_shutdown(state.pools)
            await anext(state.closer)  # the loop now tracks it: shutdown_asyncgens closes it
        pool = state.pools.get(base_url)
        if pool is None:
            size = self._limits.max_connections or 100
            pool = state.pools[base_url] = _Pool(self._new_client, size, self._clients)
        return pool

    def _new_client(self) -> httpx.AsyncClient:
        if self._ssl is None:  # loading the CA bundle takes ~30 ms: once per agent
            self._ssl = httpx.create_ssl_context()
        return httpx.AsyncClient(limits=self._limits, verify=self._ssl)

    def _validator(self, schema: dict[str, Any]) -> Any:
        text = _canonical(schema)
        validator = self._validators.get(text)
        if validator is None:
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                raise PermanentError(f"output_schema is not a valid JSON Schema: {exc.message}",
                                     hint="fix the step's output_schema") from None
            validator = self._validators[text] = Draft202012Validator(schema)
        return validator


async def _close_at_shutdown(pools: dict[str, _Pool]) -> AsyncGenerator[None, None]:
    """Yields once; closing it (``loop.shutdown_asyncgens`` or `aclose`) closes the pools."""
    try:
        yield
    finally:
        while pools:
            await pools.popitem()[1].aclose()


# -- the request -------------------------------------------------------------------------------
def _request(call: Call, environ: Mapping[str, str]) -> _Request:
    inputs = call.inputs
    for name in inputs:
        if name not in KEYS and name not in OFFLINE_KEYS:
            near = did_you_mean(name, KEYS)
            hint = "other request fields go in `with.params`"
            if name in ("api_key", "key", "token"):
                hint = (f"the key comes only from the agent's secrets: declare "
                        f"`secrets: [{DEFAULT_KEY_SECRET}]`, or name another with api_key_secret")
            elif near is not None and near.startswith("did you mean"):
                hint = f"{near} ({hint})"
            raise PermanentError(f"the llm agent has no `with.{name}`", hint=hint)
    model = inputs.get("model")
    if not isinstance(model, str) or not model.strip():
        raise PermanentError(
            "the llm agent needs `with.model`" if model is None
            else f"`with.model` must be a model name, not {model!r}",
            hint='e.g. with: {model: gpt-4o-mini} or with: {model: "{{ config.model }}"}',
        )
    base_url = inputs.get("base_url") or environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise PermanentError(f"`with.base_url` must be an http(s) URL, not {base_url!r}",
                             hint="e.g. http://localhost:11434/v1 for Ollama")
    secret = inputs.get("api_key_secret")
    if secret is not None and (not isinstance(secret, str) or secret not in call.secrets):
        raise PermanentError(
            f"`with.api_key_secret` names {secret!r}, which this agent does not have",
            hint=f"declare it on the agent: secrets: [{secret}], and export it",
        )
    key_secret = secret or DEFAULT_KEY_SECRET
    params = inputs.get("params") or {}
    if not isinstance(params, dict):
        raise PermanentError(f"`with.params` must be a mapping, not {type(params).__name__}")
    for name in params:
        if name in _RESERVED_PARAMS:
            raise PermanentError(f"`with.params.{name}` is not allowed",
                                 hint="set model and messages directly; streaming is not supported")
    options = dict(params)
    temperature = _number(inputs, "temperature", minimum=0)
    seed = _number(inputs, "seed", integer=True)
    for name, value in (("temperature", temperature), ("seed", seed),
                        ("max_tokens", _number(inputs, "max_tokens", integer=True, minimum=1))):
        if value is not None:
            options[name] = value
    timeout = _number(inputs, "timeout", minimum=0.001)
    repairs = _number(inputs, "repair_attempts", integer=True, minimum=0)
    sample = _number(inputs, "sample", integer=True, minimum=0)
    cache = _flag(inputs, "cache")
    json_mode = _flag(inputs, "json_mode")
    schema = call.output_schema
    return _Request(
        base_url=base_url.rstrip("/"),
        model=model,
        messages=_messages(inputs, schema),
        options=options,
        timeout_s=float(timeout or call.timeout_s or DEFAULT_TIMEOUT_S),
        key=call.secrets.get(key_secret) or None,
        key_secret=key_secret,
        repairs=DEFAULT_REPAIRS if repairs is None else int(repairs),
        cache=cache if cache is not None else temperature == 0 or seed is not None,
        sample=int(sample or 0),
        json_mode=schema is not None and json_mode is not False,
    )


def _messages(inputs: Mapping[str, Any], schema: dict[str, Any] | None) -> list[dict[str, Any]]:
    given = inputs.get("messages")
    messages: list[dict[str, Any]] = []
    if given is not None:
        if not isinstance(given, list):
            raise PermanentError("`with.messages` must be a list of {role, content}")
        for i, m in enumerate(given):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise PermanentError(
                    f"`with.messages[{i}]` must be a mapping with role and content",
                    hint="e.g. {role: user, content: Write a haiku}",
                )
            messages.append(dict(m))
    prompt = inputs.get("prompt")
    if prompt is not None:
        messages.append({"role": "user", "content": _text(prompt)})
    if not messages:
        raise PermanentError("the llm agent needs a `prompt` or `with.messages`",
                             hint="give the step a prompt: ...")
    system = [_text(s) for s in (inputs.get("system"),) if s is not None]
    if schema is not None:
        instruction = ("Reply with one JSON object that matches this JSON Schema, and nothing "
                       "else (no commentary, no code fences):\n"
                       + json.dumps(schema, ensure_ascii=False))
        first = messages[0]
        if not system and first["role"] == "system" and isinstance(first["content"], str):
            messages[0] = {**first, "content": f"{first['content']}\n\n{instruction}"}
        else:
            system.append(instruction)
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return messages


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _number(inputs: Mapping[str, Any], name: str, *, integer: bool = False,
            minimum: float | None = None) -> int | float | None:
    value = inputs.get(name)
    if value is None:
        return None
    number: Any = value
    if isinstance(value, str):
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            number = None
    elif integer and isinstance(value, float) and value.is_integer():
        number = int(value)
    kinds = (int,) if integer else (int, float)
    if isinstance(number, bool) or not isinstance(number, kinds) or (
        minimum is not None and number < minimum
    ):
        what = "an integer" if integer else "a number"
        bound = f" ≥ {minimum:g}" if minimum is not None else ""
        raise PermanentError(f"`with.{name}` must be {what}{bound}, not {value!r}")
    return number


def _flag(inputs: Mapping[str, Any], name: str) -> bool | None:
    value = inputs.get(name)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value is None or isinstance(value, bool):
        return value
    raise PermanentError(f"`with.{name}` must be true or false, not {value!r}")


# -- HTTP ----------------------------------------------------------------------------------------
async def _post(pool: _Pool, req: _Request, body: dict[str, Any]) -> httpx.Response:
    url = f"{req.base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {req.key}"} if req.key else None
    i = pool.take()
    try:
        return await pool.clients[i].post(url, json=body, headers=headers, timeout=req.timeout_s)
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


def _status_error(resp: httpx.Response, req: _Request, now: float) -> StepFailure:
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


def _envelope(resp: httpx.Response, req: _Request) -> tuple[str, Any, int | None, int | None]:
    """Content, finish_reason and token counts of a 2xx reply; a broken one is transient."""
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
            raise InvalidOutput(f"the model refused: {_text(refusal)[:_EXCERPT_CHARS]}")
        raise TransientError(f"the LLM server at {req.base_url} sent a reply without text")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return content, finish, _tokens(usage.get("prompt_tokens")), _tokens(
        usage.get("completion_tokens"))


def _tokens(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _usage(model: str, input_tokens: Any, output_tokens: Any, *, cached: bool = False,
           truncated: bool = False) -> dict[str, Any]:
    return {"model": model, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cached": cached, "truncated": truncated}


def _add(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


# -- structured output ---------------------------------------------------------------------------
def _checked(content: str, validator: Any) -> tuple[Any, str | None]:
    """(output, None) when usable; (None, what is wrong) when a repair should be asked."""
    if validator is None:
        return content, None
    try:
        value = _parse_json(content)
    except json.JSONDecodeError as exc:
        return None, f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return value, None
    return None, f"{error.message} at {error.json_path}"


def _parse_json(content: str) -> Any:
    """The JSON in a reply, tolerating code fences and words around one object."""
    text = content.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        fenced = _FENCE.search(text)
        candidates = [fenced.group(1)] if fenced else []
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
        for candidate in candidates:
            try:
                return json.loads(candidate)
            except json.JSONDecodeError:
                pass
        raise first from None


def _repair_prompt(problem: str) -> str:
    return (f"That reply is not valid: {problem}. Reply again with only the corrected JSON "
            "object, matching the schema.")


# -- secrets ---------------------------------------------------------------------------------------
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def _scrub(exc: StepFailure, key: str | None) -> None:
    """Remove the API key from a failure's message and hint (servers echo it)."""
    if key and (key in exc.message or (exc.hint and key in exc.hint)):
        exc.message = _redact(exc.message, key)
        exc.args = (exc.message,)
        if exc.hint:
            exc.hint = _redact(exc.hint, key)
