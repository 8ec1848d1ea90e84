"""Shared fixtures: write a workflow file, run the real `storyflow` command.

Kept generic so that engine and store tests can reuse them: ``write_workflow`` writes
any YAML text, ``cli`` runs the installed console entry point in a subprocess with its
state directory inside ``tmp_path`` (never the developer's ``.storyflow/``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

REPO = Path(__file__).resolve().parents[1]
"""The repository root (holds pyproject.toml, schemas/, workflows/)."""
SCHEMAS = REPO / "schemas"
WORKFLOWS = REPO / "workflows"

CLI_TIMEOUT_S = 60.0
"""Upper bound for one subprocess run; a hung command fails the test instead of the suite."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes seconds, not milliseconds (builds a wheel, many subprocesses)"
    )


class WriteWorkflow(Protocol):
    def __call__(self, text: str | bytes, name: str = "workflow.yaml") -> Path: ...


class Cli(Protocol):
    def __call__(
        self,
        *args: str | os.PathLike[str],
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def write_workflow(tmp_path: Path) -> WriteWorkflow:
    """``write_workflow(text, name="workflow.yaml") -> Path``.

    ``text`` is dedented (so tests can indent their YAML like code) and written as UTF-8;
    ``bytes`` are written as they are (for encoding tests). ``name`` may contain folders.
    """

    def write(text: str | bytes, name: str = "workflow.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


def cli_env(state_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a CLI subprocess gets: ours, minus colours and debug switches."""
    env = dict(os.environ)
    for key in ("STORYFLOW_DEBUG", "FORCE_COLOR", "CLICOLOR_FORCE"):
        env.pop(key, None)
    env.update(
        STORYFLOW_STATE_DIR=str(state_dir),
        NO_COLOR="1",
        PYTHONIOENCODING="utf-8",
        COLUMNS="200",
    )
    if extra:
        env.update(extra)
    return env


def run_cli(
    *args: str | os.PathLike[str],
    state_dir: Path,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m storyflow ARGS`` the way a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "storyflow", *map(str, args)],
        cwd=cwd,
        env=cli_env(state_dir, env),
        input=input,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """Where runs started by `cli` are stored (created on first use by storyflow)."""
    return tmp_path / "state"


@pytest.fixture
def cli(state_dir: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli(*args, cwd=None, env=None, input=None) -> CompletedProcess[str]``.

    Runs the real command in a subprocess with ``STORYFLOW_STATE_DIR`` under
    ``tmp_path``; ``cwd`` defaults to ``tmp_path``; ``env`` adds variables.
    """

    def run(
        *args: str | os.PathLike[str],
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(
            *args, state_dir=state_dir, cwd=cwd or tmp_path, env=env, input=input
        )

    return run


MINIMAL_WORKFLOW = """\
apiVersion: storyflow/v1
name: tiny
steps:
  hello: {uses: template, with: {template: "hello"}}
"""


@pytest.fixture
def minimal_workflow(write_workflow: WriteWorkflow) -> Path:
    """The smallest valid workflow, written to ``tmp_path/minimal.yaml``."""
    return write_workflow(MINIMAL_WORKFLOW, "minimal.yaml")


def new_run_record(
    store: Any,
    wf: Any,
    compiled: Any,
    *,
    run_id: str | None = None,
    inputs: dict[str, Any] | None = None,
) -> Any:
    """The run record `storyflow run` creates, saved: for tests that drive a Runner."""
    from storyflow.events import RunStatus
    from storyflow.store import RunRecord

    now = store.clock()
    record = RunRecord(
        run_id=run_id or store.new_run_id(), workflow=wf.name,
        workflow_path=str(Path(wf.path).resolve()), workflow_version=wf.version,
        source_hash=wf.source_hash, status=RunStatus.RUNNING.value, inputs=inputs or {},
        environment=None, sets=[], created_at=now, updated_at=now,
        meta={"steps": list(compiled.order)},
    )
    store.put_run(record)
    return record


def _schema_validator(name: str) -> Any:
    import json

    import jsonschema

    path = Path(__file__).resolve().parents[1] / "schemas" / f"{name}.schema.json"
    return jsonschema.Draft202012Validator(json.loads(path.read_text(encoding="utf-8")))


class CliProject:
    """A folder with a python agents module, a state dir, and the real CLI to drive them.

    Agents append their name to ``$SF_EXEC_LOG`` (this project's ``exec.log``) so a test
    can see what ran (`executions`); events and ``show`` documents are validated against
    their JSON Schemas.
    """

    def __init__(self, root: Path, module: str, source: str) -> None:
        self.root = root
        self.state = root / "state"
        self.log = root / "exec.log"
        (root / f"{module}.py").write_text(source, encoding="utf-8")
        self._events = _schema_validator("events")
        self._show = _schema_validator("show")

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    def cli(
        self, *args: str | os.PathLike[str], env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = run_cli(*args, state_dir=self.state, cwd=self.root,
                         env={"SF_EXEC_LOG": str(self.log), **(env or {})})
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def events(
        self, *args: str | os.PathLike[str], env: Mapping[str, str] | None = None,
        code: int = 0,
    ) -> list[dict[str, Any]]:
        """``storyflow ARGS --json``: its events, each checked against the schema."""
        import json

        result = self.cli(*args, "--json", env=env)
        assert result.returncode == code, (result.stdout, result.stderr)
        events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        for event in events:
            self._events.validate(event)
        return events

    def show(self, run_id: str) -> dict[str, Any]:
        import json

        result = self.cli("show", run_id, "--json")
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        self._show.validate(doc)
        return doc

    def kill_at_gate(self, workflow: Path, gate: Path) -> str:
        """``storyflow run WORKFLOW`` with ``$SF_GATE`` set, killed with SIGKILL once an
        agent has created ``GATE.waiting`` (it then waits for ``GATE``); the run id."""
        import json
        import time

        proc = subprocess.Popen(
            [sys.executable, "-m", "storyflow", "run", str(workflow), "--json"],
            cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=cli_env(self.state, {"SF_EXEC_LOG": str(self.log), "SF_GATE": str(gate)}),
        )
        try:
            assert proc.stdout is not None
            run_id: str = json.loads(proc.stdout.readline())["run_id"]
            waiting = Path(str(gate) + ".waiting")
            deadline = time.monotonic() + CLI_TIMEOUT_S
            while not waiting.exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            proc.kill()
            proc.wait(timeout=CLI_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            if proc.stdout is not None:
                proc.stdout.close()
        return run_id

    def executions(self) -> list[str]:
        """What the agents ran since the last call, in order."""
        if not self.log.exists():
            return []
        lines = self.log.read_text(encoding="utf-8").split()
        self.log.unlink()
        return lines


def jinja_compiles(source: str) -> bool:
    """Jinja's own verdict on ``source``, in the sandbox storyflow renders in."""
    import jinja2

    from storyflow.spec.templates._sandbox import make_environment

    try:
        make_environment().from_string(source)
    except jinja2.TemplateError:
        return False
    return True
