"""Checks of ``llm`` agents: the endpoint answers and serves the model; secrets are set.

The endpoint is asked ``GET {base_url}/models`` the way the agent would reach it: the
same base URL (``with.base_url``, else ``$STORYFLOW_LLM_BASE_URL``, else OpenAI's) and
the same key (the declared secret ``with.api_key_secret`` names, else
``OPENAI_API_KEY``; no Authorization header without one). The request uses the
standard library: aiohttp belongs to `storyflow.agents.llm_agent`, and one GET needs no
connection pool. Each distinct endpoint is asked once per run of the doctor.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.client import HTTPException
from urllib.parse import unquote, urlsplit, urlunsplit

from storyflow.agents.urls import masked_url
from storyflow.doctor._check import Check, Target, literal

BASE_URL_ENV = "STORYFLOW_LLM_BASE_URL"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_SECRET = "OPENAI_API_KEY"
HTTP_TIMEOUT_S = 5.0
_MODELS_SHOWN = 8
_FIX_REACH = f"start the server, or set with.base_url or ${BASE_URL_ENV}"

Endpoints = dict[tuple[str, str | None], tuple[Check, list[str] | None]]
"""(base URL, name of the key sent) → how the endpoint answered, and its model ids."""


def llm_checks(t: Target, environ: Mapping[str, str], endpoints: Endpoints) -> list[Check]:
    """The endpoint answers (asked once per base URL and key); the model is listed."""
    base = literal(t.with_.get("base_url")) or environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    base = base.rstrip("/")
    label = f"{t.label}: endpoint"
    if not base.startswith(("http://", "https://")):
        return [Check(label, "fail", f"base_url {masked_url(base)!r} is not an http(s) URL",
                      "e.g. http://localhost:11434/v1 for Ollama")]
    key_name = literal(t.with_.get("api_key_secret")) or DEFAULT_KEY_SECRET
    key = environ.get(key_name) if key_name in t.secrets else None
    sent = key_name if key else None
    found = endpoints.get((base, sent))
    if found is None:
        found = endpoints[base, sent] = _models(base, key)
    reach, ids = found
    out = [Check(label, reach.status, reach.detail, reach.fix)]
    if ids is None:
        return out
    raw_model = t.with_.get("model")
    model = literal(raw_model)
    label = f"{t.label}: model"
    if raw_model is None:
        out.append(Check(label, "warn", "no model configured", "set with.model"))
    elif model is None:
        out.append(Check(label, "warn", f"model is a template ({raw_model}): not checked"))
    elif model in ids:
        out.append(Check(label, "ok", f"{model} is served by {masked_url(base)}"))
    else:
        served = ", ".join(ids[:_MODELS_SHOWN]) + (" …" if len(ids) > _MODELS_SHOWN else "")
        out.append(Check(label, "fail", f"model {model!r} is not served by {masked_url(base)}",
                         f"set with.model to one it serves: {served or '(none listed)'}"))
    return out


def _models(base: str, key: str | None) -> tuple[Check, list[str] | None]:
    """GET ``{base}/models``: reachable or not, and the model ids it lists."""
    url = f"{base}/models"
    shown = masked_url(url)
    parts = urlsplit(url)
    password = parts.password

    def said(why: object) -> str:  # what urllib says may repeat the URL's password
        return str(why).replace(password, "***") if password else str(why)

    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if parts.username is not None:  # user:password@ goes as Basic auth, as the agent sends it
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        pair = f"{unquote(parts.username)}:{unquote(password or '')}".encode()
        headers.setdefault("Authorization", "Basic " + base64.b64encode(pair).decode())
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return Check("", "fail", f"{shown} refused the credentials (HTTP {exc.code})",
                         "check the API key secret the agent declares"), None
        return Check("", "fail", f"{shown} answered HTTP {exc.code}",
                     "check with.base_url: most servers' URLs end in /v1"), None
    except TimeoutError:
        return Check("", "fail", f"{shown} did not answer within {HTTP_TIMEOUT_S:g}s",
                     _FIX_REACH), None
    except urllib.error.URLError as exc:
        return Check("", "fail", f"cannot reach {shown}: {said(exc.reason)}", _FIX_REACH), None
    except (OSError, HTTPException, ValueError) as exc:
        return Check("", "fail", f"cannot reach {shown}: {type(exc).__name__}: {said(exc)}",
                     _FIX_REACH), None
    try:
        data = json.loads(body).get("data")
        ids = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError, TypeError):
        return Check("", "fail", f"{shown} did not answer with an OpenAI-style model list",
                     "check with.base_url points at an OpenAI-compatible API"), None
    return Check("", "ok", f"{masked_url(base)} answers ({len(ids)} models)"), ids


def secrets_check(name: str, secrets: tuple[str, ...], environ: Mapping[str, str]) -> Check:
    """Every secret the agent declares is set (only names are shown)."""
    missing = [s for s in secrets if not environ.get(s)]
    label = f"agent {name}: secrets"
    if missing:
        return Check(label, "fail", "not set: " + ", ".join(missing),
                     " ".join(f"export {s}=..." for s in missing))
    return Check(label, "ok", "set: " + ", ".join(secrets))
