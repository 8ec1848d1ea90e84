"""A step's ``with:`` keys, checked, as one chat-completion request; its call-cache key.

Every problem here is a `PermanentError` naming the key and how to fix it: a retry
cannot mend a typo.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from storyflow.agents.base import Call
from storyflow.agents.urls import masked_url
from storyflow.errors import PermanentError
from storyflow.spec.units import did_you_mean

BASE_URL_ENV = "STORYFLOW_LLM_BASE_URL"
"""The environment variable naming the default endpoint."""
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT_S = 120.0
"""Seconds per HTTP call when neither ``with.timeout`` nor the step's timeout is set."""
DEFAULT_IDLE_TIMEOUT_S = 60.0
"""Seconds a streamed reply may go silent once it has begun (``with.idle_timeout``)."""
DEFAULT_KEY_SECRET = "OPENAI_API_KEY"
DEFAULT_REPAIRS = 2
DEFAULT_REPLY_TOKENS = 1024
"""The reply a budget reserves for a call whose step sets no ``max_tokens``."""
REPAIR_PROMPT_TOKENS = 256
"""A repair prompt's allowance, when every repair call is reserved up front."""
CACHE_FORMAT = 1
"""Part of every call-cache key; bump it when the stored shape changes."""
KEYS = frozenset({
    "model", "base_url", "system", "prompt", "messages", "temperature", "max_tokens",
    "seed", "timeout", "api_key_secret", "repair_attempts", "cache", "sample",
    "json_mode", "params", "stream", "idle_timeout",
})
"""Every ``with`` key the agent reads."""
OFFLINE_KEYS = frozenset({"grammar", "start", "vars"})
"""The ``builtin/grammar`` agent's keys, ignored: an environment (``--env llm``) can
switch a grammar agent to this kind, and a deep merge cannot remove its keys."""
_RESERVED_PARAMS = frozenset({"model", "messages", "stream", "stream_options"})


@dataclass(frozen=True, slots=True)
class Request:
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
    stream: bool
    """Ask for the reply as Server-Sent Events (``with.stream``, default true)."""
    idle_timeout_s: float
    """Seconds a streamed reply may go silent once it has begun."""

    def body(self, messages: list[dict[str, Any]], *, json_mode: bool, stream: bool = False,
             usage: bool = True) -> dict[str, Any]:
        """The request body; ``stream`` asks for SSE, with a usage chunk when ``usage``."""
        body = {**self.options, "model": self.model, "messages": messages}
        if json_mode and "response_format" not in self.options:
            body["response_format"] = {"type": "json_object"}
        if stream:
            body["stream"] = True
            if usage:
                body["stream_options"] = {"include_usage": True}
        return body

    def estimate(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """What one call with ``messages`` may use, for `Call.reserve`: the prompt, and
        the reply's ``max_tokens`` (else `DEFAULT_REPLY_TOKENS`)."""
        limit = self.options.get("max_tokens", self.options.get("max_completion_tokens"))
        given = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
        return {"model": self.model, "input_tokens": prompt_tokens(messages),
                "output_tokens": limit if given else DEFAULT_REPLY_TOKENS,
                "reply_default": not given}

    def attempt_estimate(self, *, repairs: int) -> dict[str, Any]:
        """What one attempt may use at most: its first call, then ``repairs`` repair
        calls, each prompt grown by the reply before it and a repair prompt."""
        first = self.estimate(self.messages)
        prompt, reply = first["input_tokens"], first["output_tokens"]
        grow = reply + REPAIR_PROMPT_TOKENS
        return {**first, "calls": repairs + 1,
                "input_tokens": sum(prompt + i * grow for i in range(repairs + 1)),
                "output_tokens": reply * (repairs + 1)}

    def cache_key(self) -> str:
        """The call cache's key: what the model is asked, never how the reply travels
        (``stream``, timeouts), so a streamed call and a plain one share their answer."""
        request = {
            "format": CACHE_FORMAT,
            "base_url": self.base_url,
            "model": self.model,
            "messages": self.messages,
            "options": self.options,
            "sample": self.sample,
        }
        return "llm:" + hashlib.sha256(canonical(request).encode("utf-8")).hexdigest()


def request_of(call: Call, environ: Mapping[str, str]) -> Request:
    """The call's request, its ``with`` keys checked (`PermanentError` on the first bad one)."""
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
        shown = masked_url(base_url) if isinstance(base_url, str) else base_url
        raise PermanentError(f"`with.base_url` must be an http(s) URL, not {shown!r}",
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
                                 hint="set model and messages directly, and streaming "
                                 "with `with.stream: true|false`")
    options = dict(params)
    temperature = _number(inputs, "temperature", minimum=0)
    seed = _number(inputs, "seed", integer=True)
    for name, value in (("temperature", temperature), ("seed", seed),
                        ("max_tokens", _number(inputs, "max_tokens", integer=True, minimum=1))):
        if value is not None:
            options[name] = value
    timeout = _number(inputs, "timeout", minimum=0.001)
    idle = _number(inputs, "idle_timeout", minimum=0.001)
    stream = _flag(inputs, "stream")
    repairs = _number(inputs, "repair_attempts", integer=True, minimum=0)
    sample = _number(inputs, "sample", integer=True, minimum=0)
    cache = _flag(inputs, "cache")
    json_mode = _flag(inputs, "json_mode")
    schema = call.output_schema
    return Request(
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
        stream=stream is not False,
        idle_timeout_s=float(idle or DEFAULT_IDLE_TIMEOUT_S),
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
        messages.append({"role": "user", "content": as_text(prompt)})
    if not messages:
        raise PermanentError("the llm agent needs a `prompt` or `with.messages`",
                             hint="give the step a prompt: ...")
    system = [as_text(s) for s in (inputs.get("system"),) if s is not None]
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


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A prompt's tokens before it is sent: the messages' UTF-8 bytes (as JSON) at 3 a
    token — more than tokenizers make of English (about 4 characters a token), and
    enough for most other text."""
    return math.ceil(len(canonical(messages).encode("utf-8")) / 3)


def text_tokens(text: str) -> int:
    """A best guess at what a tokenizer makes of ``text``, for a reply whose server
    reported no usage: its UTF-8 bytes at 4 a token — OpenAI's rule of thumb of 4
    characters a token for English, and nearer the truth than characters for scripts of
    several bytes a character. Not a ceiling like `prompt_tokens`: metered as estimated."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def as_text(value: Any) -> str:
    """A string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def canonical(value: Any) -> str:
    """One JSON text per value (sorted keys, no spaces): what cache keys hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


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
    if isinstance(number, bool) or not isinstance(number, kinds) or number != number or (
        minimum is not None and number < minimum
    ):  # NaN (≠ itself) passes every bound: a NaN timeout expires at once
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


def reported_tokens(value: Any) -> int | None:
    """A token count a server reported, when it is one (a positive integer)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
