"""`storyflow doctor`: each failing agent is named and the exit status is 1; a healthy
workflow passes. LLM endpoints are a real HTTP server on 127.0.0.1 started by the test.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

Cli = Callable[..., Any]
SECRET_VALUE = "sk-doctor-secret-value-1234"
LOCAL = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
"""Talk to the test's server directly, even where a proxy is configured."""


class _Models(BaseHTTPRequestHandler):
    authorizations: ClassVar[list[str | None]] = []
    """The Authorization header of every request, in order."""

    def do_GET(self) -> None:
        self.authorizations.append(self.headers.get("Authorization"))
        if self.path != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps({"object": "list", "data": [{"id": "tiny-model"}, {"id": "mini"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def llm_url() -> Iterator[str]:
    """An OpenAI-style `GET /v1/models` on a free local port."""
    _Models.authorizations.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def closed_url() -> str:
    """A local port nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _checks(result: Any) -> dict[str, str]:
    """check name → status; several rows may share a name: the worst wins."""
    rank = {"ok": 0, "warn": 1, "fail": 2}
    out: dict[str, str] = {}
    for c in json.loads(result.stdout):
        assert set(c) == {"check", "status", "detail", "fix"}
        if rank[c["status"]] >= rank[out.get(c["check"], "ok")]:
            out[c["check"]] = c["status"]
    return out


HEALTHY = """\
apiVersion: storyflow/v1
name: healthy
config: {model: tiny-model}
agents:
  writer:
    uses: llm
    with: {model: tiny-model, base_url: "@URL@", api_key_secret: SF_DOCTOR_KEY}
    secrets: [SF_DOCTOR_KEY]
  templated: {uses: llm, with: {model: "{{ config.model }}", base_url: "@URL@"}}
  default-url: {uses: llm, with: {model: mini}}
  thinker: {uses: python, with: {callable: "helpers:think"}}
  shell: {uses: command, with: {run: ["sh", "-c", "echo hi"]}}
  grammar: {uses: builtin/grammar}
steps:
  a: {agent: writer, prompt: "hi"}
  b: {agent: thinker}
  c: {agent: shell}
  d: {uses: template, with: {template: "x"}}
  e: {agent: templated, prompt: "hi"}
  f: {agent: default-url, prompt: "hi"}
  g: {agent: grammar}
"""

BROKEN = """\
apiVersion: storyflow/v1
name: broken
agents:
  brain: {uses: python, with: {callable: "no_such_module_here:think"}}
  tool: {uses: command, with: {run: ["storyflow-no-such-command-xyz", "--go"]}}
  down: {uses: llm, with: {model: tiny-model, base_url: "@DOWN@"}}
  picky: {uses: llm, with: {model: huge-model, base_url: "@URL@"}}
  keyed:
    uses: llm
    with: {model: tiny-model, base_url: "@URL@"}
    secrets: [SF_DOCTOR_MISSING]
steps:
  a: {agent: brain}
  b: {agent: tool}
  c: {agent: down, prompt: "hi"}
  d: {agent: picky, prompt: "hi"}
  e: {agent: keyed, prompt: "hi"}
  f: {uses: python, with: {callable: "helpers:nothing_called_this"}}
"""


def test_healthy_workflow_passes(cli: Cli, tmp_path: Path, llm_url: str) -> None:
    (tmp_path / "helpers.py").write_text("def think(prompt=None):\n    return 1\n")
    path = tmp_path / "healthy.yaml"
    path.write_text(HEALTHY.replace("@URL@", llm_url), encoding="utf-8")
    env = {"SF_DOCTOR_KEY": SECRET_VALUE, "STORYFLOW_LLM_BASE_URL": llm_url, **LOCAL}
    result = cli("doctor", path, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = _checks(result)
    for name in ("python", "state dir", "disk space", "store", "workflow", "agent thinker",
                 "agent shell", "agent writer: endpoint", "agent writer: model",
                 "agent writer: secrets", "agent default-url: model", "agent grammar",
                 "step d"):
        assert checks.get(name) == "ok", (name, result.stdout)
    assert checks["agent templated: model"] == "warn"  # a template: not checked
    assert SECRET_VALUE not in result.stdout
    # The key goes where the agent would send it, and only to the agent that declares it;
    # each endpoint is asked once per (URL, key).
    assert sorted(_Models.authorizations, key=str) == [f"Bearer {SECRET_VALUE}", None]

    table = cli("doctor", path, env=env)
    assert table.returncode == 0
    assert "agent writer" in table.stdout and "\x1b[" not in table.stdout
    assert SECRET_VALUE not in table.stdout + table.stderr


def test_each_failing_agent_is_named(
    cli: Cli, tmp_path: Path, llm_url: str, closed_url: str
) -> None:
    (tmp_path / "helpers.py").write_text("def think():\n    return 1\n")
    path = tmp_path / "broken.yaml"
    text = BROKEN.replace("@URL@", llm_url).replace("@DOWN@", closed_url)
    path.write_text(text, encoding="utf-8")
    env = {"STORYFLOW_LLM_BASE_URL": closed_url, **LOCAL}
    result = cli("doctor", path, "--json", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = _checks(result)
    failed = {name for name, status in checks.items() if status == "fail"}
    assert failed == {
        "agent brain",  # the python module is missing
        "agent tool",  # the command is not on PATH
        "agent down: endpoint",  # nothing listens
        "agent picky: model",  # the server does not list it
        "agent keyed: secrets",  # SF_DOCTOR_MISSING is not set
        "step f",  # the module is there, the function is not
    }
    assert checks["agent picky: endpoint"] == "ok"
    assert "agent down: model" not in checks  # not asked: the endpoint is down

    details = {c["check"]: c for c in json.loads(result.stdout)}
    assert "SF_DOCTOR_MISSING" in details["agent keyed: secrets"]["detail"]
    assert "tiny-model" in details["agent picky: model"]["fix"]
    assert details["agent tool"]["fix"]

    table = cli("doctor", path, env=env)
    assert table.returncode == 1
    for name in ("agent brain", "agent tool", "agent down", "agent picky", "agent keyed"):
        assert name in table.stdout


def test_invalid_workflow_fails_with_its_problems(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: storyflow/v1\nname: bad\nsteps:\n  a: {uses: template}\n")
    result = cli("doctor", path, "--json")
    assert result.returncode == 1
    row = next(c for c in json.loads(result.stdout) if c["check"] == "workflow")
    assert row["status"] == "fail" and "bad.yaml:" in row["detail"]
    assert "storyflow validate" in row["fix"]


def test_python_version_check() -> None:
    from storyflow.doctor import python_check

    assert python_check((3, 11, 0)).status == "ok"
    old = python_check((3, 10, 14))
    assert old.status == "fail" and "3.10.14" in old.detail and "3.11" in old.fix


def test_without_a_file_checks_the_machine_only(cli: Cli, state_dir: Path) -> None:
    result = cli("doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(_checks(result)) == {"python", "state dir", "disk space", "store"}
    assert not state_dir.exists()  # a check creates nothing
    cli("runs")  # now a store exists
    again = _checks(cli("doctor", "--json"))
    assert again["store"] == "ok"


CREDENTIALED = """\
apiVersion: storyflow/v1
name: credentialed
agents:
  up: {uses: llm, with: {model: tiny-model, base_url: "@UP@"}}
  down: {uses: llm, with: {model: tiny-model, base_url: "@DOWN@"}}
  bare: {uses: llm, with: {model: tiny-model, base_url: "user:s3cret@127.0.0.1:9/v1"}}
steps:
  a: {agent: up, prompt: hi}
  b: {agent: down, prompt: hi}
  c: {agent: bare, prompt: hi}
"""


def test_a_password_in_base_url_is_sent_as_basic_auth_and_never_shown(
    cli: Cli, tmp_path: Path, llm_url: str, closed_url: str
) -> None:
    with_password = llm_url.replace("http://", "http://user:s3cret@")
    down = closed_url.replace("http://", "http://user:s3cret@")
    path = tmp_path / "credentialed.yaml"
    path.write_text(CREDENTIALED.replace("@UP@", with_password).replace("@DOWN@", down),
                    encoding="utf-8")
    result = cli("doctor", path, "--json", env=LOCAL)
    checks = _checks(result)
    assert checks["agent up: endpoint"] == "ok", result.stdout
    assert checks["agent up: model"] == "ok"
    assert checks["agent down: endpoint"] == "fail"
    assert checks["agent bare: endpoint"] == "fail"
    # The agent's way: user:password@ as Basic auth, not as part of the address.
    assert _Models.authorizations == ["Basic " + base64.b64encode(b"user:s3cret").decode()]
    table = cli("doctor", path, env=LOCAL)
    for out in (result.stdout + result.stderr, table.stdout + table.stderr):
        assert "s3cret" not in out
        assert "user:***@" in out
