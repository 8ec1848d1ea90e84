"""The ``llm`` agent's HTTP transport (aiohttp, fenced in ``_http``) as a user meets it.

Odd answers no OpenAI-compatible server should give — not HTTP at all, a gzip body that
does not decompress, a TLS handshake with a plain-HTTP port, a body cut short — come
from `RawServer`, a socket server on 127.0.0.1 (or ::1) answering each connection with a
function; the rest from `FakeLLM`. Every failure must be storyflow's own, on one line,
with a hint where one helps — never aiohttp's exception, its multi-line text or a
traceback, nor the password of a base or proxy URL. Proxies (``$HTTP_PROXY``,
``$NO_PROXY`` with names and address ranges), connection reuse, a pool smaller
than the calls in flight, and clean process exits (no unclosed session or connector,
no ResourceWarning) after success, failure, timeout and Ctrl-C are checked through
real sockets, and through ``storyflow run`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import math
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI_TIMEOUT_S, cli_env, run_cli
from llm_server import FakeLLM, ok
from storyflow.agents.base import Call
from storyflow.agents.llm_agent import LlmAgent
from storyflow.errors import PermanentError, StepFailure, TransientError

KEY = "sk-test-0123456789abcdefSECRET"
NO_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                "https_proxy", "all_proxy", "no_proxy")
RESOURCE_NOISE = ("Unclosed", "unclosed", "ResourceWarning", "Traceback")
"""What stderr must never show: an unclosed session, connector or socket; a traceback."""


@pytest.fixture(autouse=True)
def _no_proxy_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NO_PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


# --- a raw server for answers FakeLLM cannot give ---------------------------------------------


Answer = Callable[[socket.socket], None]


class RawServer:
    """A TCP server on ``host`` (127.0.0.1, or ::1) handing each connection to ``answer``
    on its own thread."""

    def __init__(self, answer: Answer, host: str = "127.0.0.1") -> None:
        self._answer = answer
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self.port: int = self._listener.getsockname()[1]
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def __enter__(self) -> RawServer:
        self._accepting.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            socket.create_connection((self.host, self.port), timeout=1).close()  # wake accept
        self._accepting.join(5)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def _serve(self) -> None:
        while True:
            conn, _ = self._listener.accept()
            if self._stop:
                conn.close()
                return
            thread = threading.Thread(target=self._one, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                self._answer(conn)


def read_request(conn: socket.socket) -> tuple[bytes, bytes] | None:
    """One request: its head and body; None when the connection ends first."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


def http(body: bytes, *, status: str = "200 OK", content_type: str = "application/json",
         headers: tuple[str, ...] = (), length: int | None = None) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body) if length is None else length}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def completion(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()


def events(*texts: str) -> bytes:
    chunks = [{"choices": [{"delta": {"content": t}, "finish_reason": None}]} for t in texts]
    chunks.append({"choices": [{"delta": {}, "finish_reason": "stop"}]})
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + \
        b"data: [DONE]\n\n"


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" \
    b"Transfer-Encoding: chunked\r\n\r\n"
"""The head of a stream; its chunks follow (the last, ``0\\r\\n\\r\\n``, only if sent)."""


def answering(reply: bytes) -> Answer:
    """Read the request, send ``reply``, close."""

    def answer(conn: socket.socket) -> None:
        if read_request(conn) is not None:
            conn.sendall(reply)

    return answer


def plain_http(conn: socket.socket) -> None:
    """What a plain-HTTP server says to a TLS ClientHello."""
    conn.recv(4096)
    conn.sendall(http(b"", status="400 Bad Request", headers=("Connection: close",)))


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # bound, not listening: connections are refused


# --- calling the agent ----------------------------------------------------------------------


def call(inputs: dict[str, Any], secrets: dict[str, str] | None = None) -> Call:
    return Call(run_id="run-1", step_id="title", attempt=1, inputs=inputs,
                workflow_dir=Path("."), run_dir=Path("run"), secrets=secrets or {},
                timeout_s=None)


def ask(base_url: str, secrets: dict[str, str] | None = None, **extra: Any) -> Any:
    """The output of one call on a fresh agent, or the `StepFailure` it raised."""
    agent = LlmAgent()

    async def go() -> Any:
        try:
            return await agent.run(call({"base_url": base_url, "model": "m",
                                         "prompt": "A title", **extra}, secrets))
        except StepFailure as exc:
            return exc
        finally:
            await agent.aclose()

    return asyncio.run(go())


def own_words(shown: str) -> None:
    """``shown`` is storyflow's, on one line: no aiohttp exception nor its text."""
    assert "\n" not in shown, shown
    for word in ("aiohttp", "ClientResponseError", "ClientPayloadError", "ClientConnector",
                 "ClientOSError", "ClientSSLError", "ServerDisconnected", "ValueError",
                 "OverflowError", "[None]", "400,", "ssl:default"):
        assert word not in shown, shown


def failure(outcome: Any, kind: type[StepFailure] = TransientError) -> StepFailure:
    """``outcome`` as a failure of ``kind``, in storyflow's words."""
    assert isinstance(outcome, kind), outcome
    own_words(f"{outcome.message} {outcome.hint or ''}")
    return outcome


# --- failures: classified, on one line, in storyflow's words --------------------------------


def test_nothing_listening_is_transient_and_says_refused() -> None:
    port = refused_port()
    error = failure(ask(f"http://127.0.0.1:{port}/v1"))
    assert error.message == f"cannot reach the LLM server at http://127.0.0.1:{port}/v1: " \
                            "connection refused"
    assert error.hint is not None and "is the server running?" in error.hint


@pytest.mark.parametrize("stream", [True, False])
def test_a_server_that_closes_before_answering_is_transient(stream: bool) -> None:
    with RawServer(read_request) as server:  # and hang up
        error = failure(ask(server.url, stream=stream))
    assert error.message == f"cannot reach the LLM server at {server.url}: it closed the " \
                            "connection without answering"


@pytest.mark.parametrize("stream", [True, False])
def test_an_answer_that_is_not_http_says_so_on_one_line(stream: bool) -> None:
    with RawServer(answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as server:
        error = failure(ask(server.url, stream=stream))
    assert error.message.startswith(f"the LLM server at {server.url} did not answer in HTTP: ")
    assert "SSH-2.0-OpenSSH_9.6" in error.message
    assert error.hint is not None and "base_url" in error.hint


def test_headers_too_long_to_read_are_not_http_either() -> None:
    with RawServer(answering(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n")) as server:
        error = failure(ask(server.url, stream=False))
    assert error.message.startswith(f"the LLM server at {server.url} did not answer in HTTP: ")
    assert len(error.message) < 400


def test_a_non_json_200_body_is_not_a_chat_completion() -> None:
    page = b"<!doctype html><title>Open WebUI</title>"
    with RawServer(answering(http(page, content_type="text/html"))) as server:
        error = failure(ask(server.url, stream=False))
    assert error.message == f"the LLM server at {server.url} sent a reply that is not a chat " \
                            f"completion: {page.decode()}"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("Retry-After: 7", 7.0), ("Retry-After-Ms: 250", 0.25),
     ("Retry-After: Wed, 21 Oct 2015 07:28:30 GMT", 30.0), ("Retry-After: soon", None)])
def test_429_reads_retry_after_in_every_form(header: str, seconds: float | None) -> None:
    body = b'{"error": {"message": "Rate limit reached"}}'
    agent = LlmAgent(clock=lambda: 1445412480.0)  # 07:28:00 that day

    async def go() -> Any:
        try:
            return await agent.run(call({"base_url": server.url, "model": "m", "prompt": "x"}))
        except StepFailure as exc:
            return exc
        finally:
            await agent.aclose()

    reply = http(body, status="429 Too Many Requests", headers=(header,))
    with RawServer(answering(reply)) as server:
        error = failure(asyncio.run(go()))
    assert error.message == "the LLM server answered HTTP 429: Rate limit reached"
    assert error.retry_after_s == seconds


@pytest.mark.parametrize("stream", [True, False])
def test_a_body_that_does_not_decompress_is_transient_on_one_line(stream: bool) -> None:
    reply = http(b"not gzip at all", headers=("Content-Encoding: gzip",))
    with RawServer(answering(reply)) as server:
        error = failure(ask(server.url, stream=stream))
    assert error.message.startswith(f"the answer from the LLM server at {server.url} could "
                                    "not be read: ")
    assert "gzip" in error.message


def test_a_body_shorter_than_its_length_is_transient_on_one_line() -> None:
    body = completion("cut")
    with RawServer(answering(http(body, length=len(body) + 40))) as server:
        error = failure(ask(server.url, stream=False))
    assert error.message.startswith(f"the answer from the LLM server at {server.url} could "
                                    "not be read: ")


@pytest.mark.parametrize("stream", [True, False])
def test_gzip_compressed_json_is_read(stream: bool) -> None:
    reply = http(gzip.compress(completion("zipped")), headers=("Content-Encoding: gzip",))
    with RawServer(answering(reply)) as server:
        assert ask(server.url, stream=stream) == "zipped"


def test_a_gzip_compressed_event_stream_is_read() -> None:
    reply = http(gzip.compress(events("zip", "ped")), content_type="text/event-stream",
                 headers=("Content-Encoding: gzip",))
    with RawServer(answering(reply)) as server:
        assert ask(server.url) == "zipped"


def test_a_stream_cut_mid_reply_names_what_broke_on_one_line() -> None:
    first = events("The keeper ").split(b"\n\n")[0] + b"\n\n"
    with RawServer(answering(CHUNKED + b"%x\r\n%s\r\n" % (len(first), first))) as server:
        error = failure(ask(server.url))
    assert error.message.startswith(f"the stream from the LLM server at {server.url} was cut "
                                    "after 11 characters: ")


def test_a_complete_stream_whose_connection_drops_before_its_end_is_a_reply() -> None:
    body = events("whole")
    with RawServer(answering(CHUNKED + b"%x\r\n%s\r\n" % (len(body), body))) as server:
        assert ask(server.url) == "whole"


def test_https_to_a_plain_http_port_is_a_clear_tls_failure() -> None:
    with RawServer(plain_http) as server:
        url = f"https://127.0.0.1:{server.port}/v1"
        error = failure(ask(url))
    assert error.message.startswith(f"cannot reach the LLM server at {url}: the TLS handshake "
                                    "failed")
    assert error.hint is not None and "http://" in error.hint


# --- the key and the URL's own credentials --------------------------------------------------


@pytest.mark.parametrize("key", [KEY + "\n", "sk-a\r\nX-Injected: 1", "sk-\x00b"])
def test_a_key_with_a_control_character_is_a_permanent_error(key: str) -> None:
    with FakeLLM() as server:
        error = failure(ask(server.url, secrets={"OPENAI_API_KEY": key}), PermanentError)
        assert server.requests == []
    assert error.message == "the API key in secret OPENAI_API_KEY contains a line break or " \
                            "another control character"
    assert error.hint is not None and "trailing newline" in error.hint
    assert key.strip() not in f"{error.message} {error.hint}"


def test_credentials_in_base_url_and_a_key_are_one_too_many() -> None:
    with FakeLLM() as server:
        with_user = server.url.replace("http://", "http://user:pw@")
        assert ask(with_user) == "hello"  # alone, they are sent (Basic)
        assert server.requests[0].headers["authorization"] == "Basic dXNlcjpwdw=="
        error = failure(ask(with_user, secrets={"OPENAI_API_KEY": KEY}), PermanentError)
        assert len(server.requests) == 1
    assert "pw" not in error.message and KEY not in error.message
    assert error.hint is not None and "base_url" in error.hint


PASSWORD = "s3cret"


def with_password(url: str) -> str:
    """``url`` with ``user:PASSWORD@`` in it."""
    return url.replace("://", f"://user:{PASSWORD}@", 1)


def first_chunk_then(pause_s: float, rest: bytes = b"") -> Answer:
    """Begin a stream with one chunk of text, then wait ``pause_s``, then send ``rest``."""
    first = events("The keeper ").split(b"\n\n")[0] + b"\n\n"

    def answer(conn: socket.socket) -> None:
        if read_request(conn) is not None:
            conn.sendall(CHUNKED + b"%x\r\n%s\r\n" % (len(first), first))
            time.sleep(pause_s)
            conn.sendall(rest)

    return answer


def silent_for(pause_s: float) -> Answer:
    def answer(conn: socket.socket) -> None:
        if read_request(conn) is not None:
            time.sleep(pause_s)

    return answer


BROKEN_CHUNK = b"data: {not json}\n\n"
MASKING_CASES: dict[str, tuple[Answer | None, dict[str, Any], str]] = {
    # name: (the server's answer, or None for nothing listening; `with` keys; words shown)
    "refused": (None, {}, "cannot reach the LLM server at {url}: connection refused"),
    "closed": (read_request, {}, "cannot reach the LLM server at {url}: it closed"),
    "not http": (answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), {},
                 "the LLM server at {url} did not answer in HTTP"),
    "not a completion": (answering(http(b"<html>", content_type="text/html")),
                         {"stream": False}, "the LLM server at {url} sent a reply that is not"),
    "no text": (answering(http(b'{"choices": [{"message": {}}]}')), {"stream": False},
                "the LLM server at {url} sent a reply without text"),
    "404": (answering(http(b'{"error": {"message": "no route"}}', status="404 Not Found")),
            {}, "check `base_url` ({url}; most servers end in /v1)"),
    "bad gzip": (answering(http(b"not gzip", headers=("Content-Encoding: gzip",))),
                 {"stream": False}, "the answer from the LLM server at {url} could not be read"),
    "stream cut": (first_chunk_then(0), {}, "the stream from the LLM server at {url} was cut"),
    "stream ends early": (first_chunk_then(0, b"0\r\n\r\n"), {},
                          "the stream from the LLM server at {url} ended before"),
    "broken chunk": (answering(http(BROKEN_CHUNK, content_type="text/event-stream")), {},
                     "the LLM server at {url} sent a stream chunk that is not"),
    "no reply": (silent_for(0.5), {"timeout": 0.1, "stream": False},
                 "no reply from {url}/chat/completions within 0.1s"),
    "no stream": (silent_for(0.5), {"timeout": 0.1},
                  "no reply from {url}/chat/completions within 0.1s"),
    "silent stream": (first_chunk_then(0.5), {"idle_timeout": 0.1},
                      "the stream from the LLM server at {url} went silent for 0.1s"),
    "tls to plain http": (plain_http, {"tls": True},
                          "cannot reach the LLM server at {url}: the TLS handshake failed"),
}


@pytest.mark.parametrize("case", sorted(MASKING_CASES))
def test_a_password_in_base_url_is_masked_in_every_failure(case: str) -> None:
    answer, extra, words = MASKING_CASES[case]
    extra = dict(extra)
    scheme = "https" if extra.pop("tls", False) else "http"
    with RawServer(answer or read_request) as server:
        port = server.port if answer is not None else refused_port()
        url = f"{scheme}://user:{PASSWORD}@127.0.0.1:{port}/v1"
        error = failure(ask(url, **extra), StepFailure)
    shown = f"{error.message} {error.hint or ''}"
    assert PASSWORD not in shown, shown
    assert words.format(url=f"{scheme}://user:***@127.0.0.1:{port}/v1") in shown, shown


@pytest.mark.parametrize(
    ("userinfo", "shown"),
    [("user:s3cret@", "user:***@"), ("s3cret@", "***@"), ("user:@", "user:***@"),
     ("us%40er:s3%2Fcr%3Aet@", "us%40er:***@"), ("a@b:s3cret@", "a@b:***@")])
def test_every_form_of_userinfo_is_masked(userinfo: str, shown: str) -> None:
    port = refused_port()
    error = failure(ask(f"http://{userinfo}127.0.0.1:{port}/v1"))
    assert error.message == f"cannot reach the LLM server at http://{shown}127.0.0.1:{port}" \
                            "/v1: connection refused"


def test_a_base_url_that_cannot_be_called_is_shown_masked() -> None:
    error = failure(ask(with_password("http://[bad/v1")), PermanentError)
    assert error.message.startswith("cannot call http://user:***@[bad/v1/chat/completions: ")
    assert PASSWORD not in f"{error.message} {error.hint}"


def test_a_proxys_password_is_masked_when_it_cannot_be_reached(
        monkeypatch: pytest.MonkeyPatch) -> None:
    proxy_port, port = refused_port(), refused_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://pu:{PASSWORD}@127.0.0.1:{proxy_port}")
    error = failure(ask(with_password(f"http://127.0.0.1:{port}/v1")))
    assert error.message == f"cannot reach the LLM server at http://user:***@127.0.0.1:{port}" \
                            f"/v1 through the proxy http://pu:***@127.0.0.1:{proxy_port}: " \
                            "connection refused"
    assert error.hint is not None and "$HTTP_PROXY" in error.hint


def test_a_proxy_refusing_connect_is_shown_with_both_passwords_masked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = answering(http(b"", status="407 Proxy Authentication Required"))
    with RawServer(refuse) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://pu:{PASSWORD}@127.0.0.1:{proxy.port}")
        error = failure(ask(f"https://user:{PASSWORD}@127.0.0.1:9/v1"))
    assert error.message == "cannot reach the LLM server at https://user:***@127.0.0.1:9/v1 " \
                            f"through the proxy http://pu:***@127.0.0.1:{proxy.port}: the " \
                            "proxy answered HTTP 407"


@pytest.mark.parametrize("stream", [True, False])
def test_an_infinite_timeout_means_no_limit(stream: bool) -> None:
    with FakeLLM() as server:
        assert ask(server.url, timeout=math.inf, idle_timeout=math.inf, stream=stream) == "hello"


# --- proxies -----------------------------------------------------------------------------------


class ForwardProxy:
    """A plain HTTP forward proxy (no CONNECT) on 127.0.0.1, over TLS with ``tls``: it
    receives absolute-URI requests, keeps their heads, and passes each on to the server,
    one per connection."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.raw = RawServer(self._forward)
        self.heads: list[bytes] = []
        self._tls = tls

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.raw.port}"

    def _forward(self, conn: socket.socket) -> None:
        if self._tls is None:
            self._relay(conn)
        else:  # an https:// proxy
            with self._tls.wrap_socket(conn, server_side=True) as wrapped:
                self._relay(wrapped)

    def _relay(self, conn: socket.socket) -> None:
        request = read_request(conn)
        if request is None:
            return
        head, body = request
        self.heads.append(head)
        line, *headers = head.split(b"\r\n")
        method, target, version = line.split(b" ")
        where, _, path = target.removeprefix(b"http://").partition(b"/")
        host, _, port = where.decode().rpartition(":")
        kept = [h for h in headers if not h.lower().startswith((b"proxy-", b"connection"))]
        with socket.create_connection((host.strip("[]"), int(port))) as upstream:
            upstream.sendall(b"\r\n".join([b"%s /%s %s" % (method, path, version), *kept,
                                           b"Connection: close"]) + b"\r\n\r\n" + body)
            while chunk := upstream.recv(65536):
                conn.sendall(chunk)

    def __enter__(self) -> ForwardProxy:
        self.raw.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.__exit__()


@pytest.mark.parametrize("stream", [True, False])
def test_http_proxy_carries_the_call_and_no_proxy_exempts_it(
        monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    with FakeLLM() as server, ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        assert ask(server.url, stream=stream) == "hello"
        assert [h.split(b"\r\n")[0] for h in proxy.heads] == [
            f"POST {server.url}/chat/completions HTTP/1.1".encode()]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert ask(server.url, stream=stream) == "hello"
        assert len(proxy.heads) == 1 and len(server.requests) == 2


@pytest.mark.parametrize(
    ("no_proxy", "proxied"),
    [("127.0.0.0/8", False), ("10.0.0.0/8, 127.0.0.0/24", False), (" 127.0.0.1/32 ", False),
     ("example.com,.internal,127.0.0.0/8", False), ("127.0.0.1", False),
     ("10.0.0.0/8", True), ("127.0.1.0/24", True), ("::1/128", True), ("127.0.0.0/33", True),
     ("localhost", True), ("127.0.0.0/8:80", True)])
def test_no_proxy_address_ranges_exempt_the_addresses_they_hold(
        monkeypatch: pytest.MonkeyPatch, no_proxy: str, proxied: bool) -> None:
    with FakeLLM() as server, ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        assert ask(server.url) == "hello"
        assert len(proxy.heads) == (1 if proxied else 0)
        assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("no_proxy", "proxied"),
    [("::1/128", False), ("::1", False), ("[::1]", False), ("0:0:0:0:0:0:0:1", False),
     ("::/0", False), ("fe80::/10", True), ("127.0.0.0/8", True)])
def test_no_proxy_address_ranges_hold_ipv6_addresses(
        monkeypatch: pytest.MonkeyPatch, no_proxy: str, proxied: bool) -> None:
    with RawServer(answering(http(completion("six"))), host="::1") as server, \
            ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        assert ask(server.url) == "six"
        assert len(proxy.heads) == (1 if proxied else 0)


def test_no_proxy_for_names_leading_dots_and_star_is_as_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A name is not resolved to be matched against an address; ``*`` exempts all."""
    with FakeLLM() as server, ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        localhost = server.url.replace("127.0.0.1", "localhost")
        for no_proxy, url, proxied in [("*", server.url, False), ("localhost", localhost, False),
                                       (".localhost", localhost, False),
                                       ("127.0.0.0/8", localhost, True),
                                       ("host.localhost", localhost, True)]:
            monkeypatch.setenv("NO_PROXY", no_proxy)
            before = len(proxy.heads)
            assert ask(url) == "hello"
            assert len(proxy.heads) - before == (1 if proxied else 0), no_proxy


def test_all_proxy_carries_the_call_when_no_scheme_proxy_is_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM() as server, ForwardProxy() as proxy:
        monkeypatch.setenv("ALL_PROXY", proxy.url)
        assert ask(server.url) == "hello"
        assert len(proxy.heads) == 1
        monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1")
        error = failure(ask(server.url), PermanentError)
    assert error.message.startswith("$ALL_PROXY is not an http:// or https:// proxy URL")


def test_a_proxys_credentials_go_in_proxy_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM() as server, ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://us%40er:p%3Ass@"))
        assert ask(server.url) == "hello"  # no DeprecationWarning (an error under pytest)
        (head,) = proxy.heads
        basic = base64.b64encode(b"us@er:p:ss").decode()
        assert f"Proxy-Authorization: Basic {basic}".encode() in head.split(b"\r\n")
        assert "proxy-authorization" not in server.requests[0].headers


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server's TLS context for a self-signed 127.0.0.1 certificate (made by openssl now,
    so valid whatever the clock), trusted through ``$SSL_CERT_FILE``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate with")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return context


def test_https_to_a_server_whose_ca_is_in_ssl_cert_file(certificate: ssl.SSLContext,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def tls(conn: socket.socket) -> None:
        with certificate.wrap_socket(conn, server_side=True) as wrapped:
            answering(http(completion("private")))(wrapped)

    with RawServer(tls) as server:
        url = f"https://127.0.0.1:{server.port}/v1"
        assert ask(url) == "private"
        monkeypatch.delenv("SSL_CERT_FILE")
        error = failure(ask(url))
    assert error.message == f"cannot reach the LLM server at {url}: its TLS certificate is " \
                            "not trusted (self-signed certificate)"
    assert error.hint is not None and "$SSL_CERT_FILE" in error.hint


def test_an_https_proxy_carries_the_call(certificate: ssl.SSLContext,
                                         monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with FakeLLM() as server, ForwardProxy(certificate) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http:", "https:"))
        with caplog.at_level(logging.WARNING):
            assert ask(server.url) == "hello"  # aiohttp's own lookup goes direct, and logs
        assert len(proxy.heads) == 1 and caplog.records == []
        monkeypatch.delenv("SSL_CERT_FILE")
        error = failure(ask(server.url))
    assert error.message.startswith(f"cannot reach the LLM server at {server.url} through the "
                                    "proxy https://127.0.0.1:")
    assert error.hint is not None and "$HTTP_PROXY" in error.hint


@pytest.mark.parametrize("value", ["socks5://127.0.0.1:1080", "not a url", "http://"])
def test_a_proxy_that_is_not_http_names_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                     value: str) -> None:
    with FakeLLM() as server:
        monkeypatch.setenv("HTTP_PROXY", value)
        error = failure(ask(server.url), PermanentError)
        assert server.requests == []
    assert error.message == "$HTTP_PROXY is not an http:// or https:// proxy URL"
    assert error.hint is not None and "NO_PROXY" in error.hint


# --- connections: reused, and a pool smaller than the calls in flight -----------------------


class CountingLLM(FakeLLM):
    """FakeLLM counting the connections it accepted, and the most open at once."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.connections = self.open = self.most_open = 0

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await super()._connection(reader, writer)
        finally:
            self.open -= 1


def test_connections_are_reused_across_calls_streamed_or_not() -> None:
    from llm_server import error

    with CountingLLM() as server:
        server.push(ok("a"), error(429, "slow"), ok("b"), error(500, "x"), ok("c"))
        agent = LlmAgent()

        async def go() -> list[Any]:
            outputs = []
            try:
                for stream in (True, True, False, False, True, False):
                    try:
                        outputs.append(await agent.run(call(
                            {"base_url": server.url, "model": "m", "prompt": "x",
                             "stream": stream})))
                    except TransientError as exc:
                        outputs.append(exc.message)
            finally:
                await agent.aclose()
            return outputs

        outputs = asyncio.run(go())
        assert outputs[::2] == ["a", "b", "c"]
        assert server.connections == 1


def test_calls_waiting_for_a_free_connection_do_not_spend_their_timeout() -> None:
    """200 calls at once on 10 connections, each answered in 20 ms: the last waits ~0.4 s
    for a connection, longer than its 0.15 s timeout, yet its HTTP call takes 20 ms."""
    with CountingLLM(ok("fine", delay_s=0.02), record=False) as server:
        agent = LlmAgent(connections=10)

        async def one(i: int) -> Any:
            try:
                return await agent.run(call({"base_url": server.url, "model": "m",
                                             "prompt": f"call {i}", "timeout": 0.15,
                                             "stream": i % 2 == 0}))
            except StepFailure as exc:
                return exc.message

        async def go() -> list[Any]:
            try:
                return await asyncio.gather(*(one(i) for i in range(200)))
            finally:
                await agent.aclose()

        outputs = asyncio.run(go())
        assert [o for o in outputs if o != "fine"] == []
        assert server.most_open <= 10


# --- through the CLI: one line of storyflow's on stderr, clean exits ------------------------


def workflow(tmp_path: Path, base_url: str, extra: str = "", secrets: str = "[]") -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: storyflow/v1
        name: transport
        agents:
          writer:
            uses: llm
            with: {{base_url: "{base_url}", model: m{extra}}}
            secrets: {secrets}
        steps:
          title: {{agent: writer, prompt: "A title"}}
        outputs:
          title: "{{{{ steps.title.output }}}}"
        """), encoding="utf-8")
    return path


WARN = {"PYTHONWARNINGS": "always::ResourceWarning"}


def storyflow_run(tmp_path: Path, base_url: str, extra: str = "",
                  env: dict[str, str] | None = None,
                  *args: str) -> subprocess.CompletedProcess[str]:
    secrets = "[OPENAI_API_KEY]" if env and "OPENAI_API_KEY" in env else "[]"
    return run_cli("run", workflow(tmp_path, base_url, extra, secrets), *args,
                   state_dir=tmp_path / "state", cwd=tmp_path, env={**WARN, **(env or {})})


FAILED = re.compile(r"✗ title attempt 1: (\w+): (.*?)(?: \(hint: (.*)\))?$", re.MULTILINE)


def run_error(result: subprocess.CompletedProcess[str]) -> tuple[str, str, str]:
    """The failed run's step error (class, message, hint), after checking that stderr
    says it on one line and nothing else."""
    assert result.returncode == 1, result.stderr
    for noise in RESOURCE_NOISE:
        assert noise not in result.stderr, result.stderr
    (found,) = FAILED.findall(result.stdout)
    kind, message, hint = found
    assert result.stderr.splitlines()[:-1] == [f"error: step title failed: {message}"], \
        result.stderr
    assert result.stderr.splitlines()[-1].startswith("  continue with: storyflow resume ")
    own_words(f"{message} {hint}")
    return kind, message, hint


def test_storyflow_run_succeeds_with_a_trailing_slash_and_exits_clean(
        tmp_path: Path) -> None:
    with FakeLLM() as server:
        result = storyflow_run(tmp_path, server.url + "/", ", timeout: .inf", None, "--json")
        assert result.returncode == 0, result.stderr
        assert server.requests[0].path == "/v1/chat/completions"
    assert json.loads(result.stdout.splitlines()[-1])["outputs"] == {"title": "hello"}
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("base_url", "kind", "words"),
    [("https://127.0.0.1:{plain}/v1", "transient", "the TLS handshake failed"),
     ("http://127.0.0.1:{refused}/v1", "transient", "connection refused"),
     ("ftp://x", "permanent", "`with.base_url` must be an http(s) URL, not 'ftp://x'"),
     ("http://[bad", "permanent", "cannot call http://[bad/chat/completions: "),
     ("http://127.0.0.1:99999/v1", "permanent", "Port out of range"),
     ("127.0.0.1:8000/v1", "permanent", "must be an http(s) URL")])
def test_storyflow_run_with_an_odd_base_url_says_so_on_one_line(
        tmp_path: Path, base_url: str, kind: str, words: str) -> None:
    with RawServer(plain_http) as plain:
        url = base_url.format(plain=plain.port, refused=refused_port())
        found, message, hint = run_error(storyflow_run(tmp_path, url))
    assert found == kind and words in message and hint, (found, message, hint)


def test_storyflow_run_with_a_key_ending_in_a_newline(tmp_path: Path) -> None:
    with FakeLLM() as server:
        found = run_error(storyflow_run(tmp_path, server.url, env={"OPENAI_API_KEY": KEY + "\n"}))
        assert server.requests == []
    assert found[:2] == ("permanent", "the API key in secret OPENAI_API_KEY contains a line "
                                      "break or another control character")


def test_storyflow_run_goes_through_http_proxy(tmp_path: Path) -> None:
    with FakeLLM() as server, ForwardProxy() as proxy:
        result = storyflow_run(tmp_path, server.url, env={"HTTP_PROXY": proxy.url})
        assert result.returncode == 0, result.stderr
        assert len(proxy.heads) == 1 and len(server.requests) == 1
    assert result.stderr == ""


@pytest.mark.parametrize("through_proxy", [False, True])
def test_storyflow_run_never_shows_a_password_of_base_url_or_proxy(
        tmp_path: Path, through_proxy: bool) -> None:
    port, proxy_port = refused_port(), refused_port()
    env = {"HTTP_PROXY": f"http://pu:{PASSWORD}@127.0.0.1:{proxy_port}"} if through_proxy \
        else None
    result = storyflow_run(tmp_path, with_password(f"http://127.0.0.1:{port}/v1"), env=env)
    _, message, _ = run_error(result)
    assert message.startswith(f"cannot reach the LLM server at http://user:***@127.0.0.1:{port}"
                              "/v1"), message
    if through_proxy:
        assert f"through the proxy http://pu:***@127.0.0.1:{proxy_port}:" in message
    logs = run_cli("logs", "--last", "--json", state_dir=tmp_path / "state", cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert "user:***@127.0.0.1" in logs.stdout
    for shown in (result.stdout, result.stderr, logs.stdout, logs.stderr):
        assert PASSWORD not in shown, shown


def test_storyflow_run_bypasses_the_proxy_for_an_address_range_in_no_proxy(
        tmp_path: Path) -> None:
    with FakeLLM() as server:
        result = storyflow_run(tmp_path, server.url, env={
            "HTTP_PROXY": f"http://127.0.0.1:{refused_port()}", "NO_PROXY": "127.0.0.0/8"})
        assert result.returncode == 0, result.stderr
        assert len(server.requests) == 1
    assert result.stderr == ""


def test_storyflow_run_exits_clean_after_a_timeout(tmp_path: Path) -> None:
    with FakeLLM(ok(delay_s=5)) as server:
        kind, message, _ = run_error(storyflow_run(tmp_path, server.url,
                                                   ", timeout: 0.2, stream: false"))
    assert kind == "transient" and message.startswith("no reply from "), message


def test_ctrl_c_mid_call_exits_clean(tmp_path: Path) -> None:
    with FakeLLM(ok(delay_s=30)) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "storyflow", "run", workflow(tmp_path, server.url)],
            cwd=tmp_path, env=cli_env(tmp_path / "state", WARN), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not server.requests and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until the call is on the wire
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 130, err
    for noise in RESOURCE_NOISE:
        assert noise not in err, err
    assert err.splitlines()[0].startswith("  continue with: storyflow resume "), err


def test_a_base_url_without_a_scheme_is_refused_with_its_password_masked(
        tmp_path: Path) -> None:
    result = storyflow_run(tmp_path, f"user:{PASSWORD}@127.0.0.1:9/v1")
    kind, message, _ = run_error(result)
    assert kind == "permanent"
    assert "'user:***@127.0.0.1:9/v1'" in message
    assert PASSWORD not in result.stdout + result.stderr


def test_masked_url_reads_one_value_with_or_without_a_scheme() -> None:
    from storyflow.agents.urls import masked_url

    assert masked_url("user:pw@host/v1") == "user:***@host/v1"
    assert masked_url("tok@host:8000") == "***@host:8000"
    assert masked_url("https://u:pw@host/v1?x=a@b") == "https://u:***@host/v1?x=a@b"
    assert masked_url("http://host/v1") == "http://host/v1"
