"""Agents: python callables, commands, templates, and the kind registry.

Every python test writes a real module into ``tmp_path`` (under a unique name, since
imported modules are process-wide) and calls it through the agent; every command test
runs a real subprocess. Async code runs under ``asyncio.run`` inside sync tests.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
import uuid
from collections.abc import Coroutine, Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, TypeVar

import pytest

from storyflow.agents import command_agent, python_agent, registry
from storyflow.agents.base import Call, StepContext
from storyflow.agents.command_agent import CommandAgent
from storyflow.agents.python_agent import PythonAgent
from storyflow.agents.template_agent import TemplateAgent
from storyflow.errors import (
    InvalidOutput,
    PermanentError,
    StepFailure,
    StepTimeout,
    TransientError,
)

T = TypeVar("T")

RESOLVES = 0
"""How often the python agent resolved (imported and inspected) a callable."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_call(
    workflow_dir: Path,
    inputs: dict[str, Any],
    *,
    secrets: dict[str, str] | None = None,
    timeout_s: float | None = None,
    log: list[str] | None = None,
) -> Call:
    return Call(
        run_id="run-1",
        step_id="draft[2]",
        attempt=1,
        inputs=inputs,
        workflow_dir=workflow_dir,
        run_dir=workflow_dir / "run",
        secrets=secrets or {},
        timeout_s=timeout_s,
        log=log.append if log is not None else (lambda line: None),
    )


@pytest.fixture
def wf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A workflow folder; sys.path and the modules imported from it are restored after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def module(folder: Path, source: str) -> str:
    """Write a module with a unique name into ``folder``; return its name."""
    name = f"sfmod_{uuid.uuid4().hex[:12]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return name


# --------------------------------------------------------------------------- python


def call_python(folder: Path, source: str, func: str = "f", **inputs: Any) -> Any:
    name = module(folder, source)
    return run(PythonAgent().run(make_call(folder, {"callable": f"{name}:{func}", **inputs})))


def test_python_sync_callable_gets_inputs_and_prompt(wf: Path) -> None:
    source = """
        def f(premise, prompt, n=1):
            return {"premise": premise, "prompt": prompt, "n": n}
    """
    out = call_python(wf, source, premise="a fox", prompt="write")
    assert out == {"premise": "a fox", "prompt": "write", "n": 1}


THREAD_NAME = """
import threading


def f(**kw):
    print("said inline")
    return threading.current_thread().name
"""


def test_python_blocking_false_runs_on_the_loop_without_a_thread(wf: Path) -> None:
    """A sync callable runs on a worker thread unless ``blocking: false`` says it never
    waits: then on the event loop's own thread, its output still captured."""
    import threading

    main = threading.current_thread().name
    assert call_python(wf, THREAD_NAME).startswith("storyflow-python")
    assert call_python(wf, THREAD_NAME, blocking=True).startswith("storyflow-python")
    assert call_python(wf, THREAD_NAME, blocking=False) == main
    with pytest.raises(PermanentError, match=r"`with\.blocking` must be true or false"):
        call_python(wf, THREAD_NAME, blocking="no")


def test_python_async_callable_is_awaited(wf: Path) -> None:
    source = """
        import asyncio

        async def f(x):
            await asyncio.sleep(0)
            return [x, x]
    """
    assert call_python(wf, source, x=3) == [3, 3]


def test_python_object_with_async_call_is_awaited(wf: Path) -> None:
    source = """
        class Doubler:
            async def __call__(self, x):
                return 2 * x

        f = Doubler()
    """
    assert call_python(wf, source, x=4) == 8


def test_python_callable_in_a_package_with_dotted_attribute(wf: Path) -> None:
    pkg = f"sfpkg_{uuid.uuid4().hex[:8]}"
    (wf / pkg).mkdir()
    (wf / pkg / "__init__.py").write_text("", encoding="utf-8")
    (wf / pkg / "tools.py").write_text(
        "class Tools:\n    @staticmethod\n    def up(s):\n        return s.upper()\n",
        encoding="utf-8",
    )
    call = make_call(wf, {"callable": f"{pkg}.tools:Tools.up", "s": "hi"})
    assert run(PythonAgent().run(call)) == "HI"


def test_python_context_is_injected(wf: Path) -> None:
    source = """
        def f(text, context):
            context.log("hello from " + context.step_id)
            return {
                "text": text,
                "run": context.run_id,
                "step": context.step_id,
                "attempt": context.attempt,
                "run_dir": str(context.run_dir),
                "secret": context.secrets["API_KEY"],
            }
    """
    name = module(wf, source)
    lines: list[str] = []
    call = make_call(
        wf, {"callable": f"{name}:f", "text": "t"}, secrets={"API_KEY": "k"}, log=lines
    )
    out = run(PythonAgent().run(call))
    assert out == {
        "text": "t",
        "run": "run-1",
        "step": "draft[2]",
        "attempt": 1,
        "run_dir": str(wf / "run"),
        "secret": "k",
    }
    assert lines == ["hello from draft[2]"]


def test_python_context_clashing_with_a_with_key_is_permanent(wf: Path) -> None:
    with pytest.raises(PermanentError, match="clashes"):
        call_python(wf, "def f(context):\n    return 1\n", context="mine")


def test_python_kwargs_function_takes_any_key(wf: Path) -> None:
    assert call_python(wf, "def f(**kw):\n    return sorted(kw)\n", b=1, a=2) == ["a", "b"]


def test_python_unexpected_keyword_is_permanent(wf: Path) -> None:
    with pytest.raises(PermanentError, match="unexpected keyword argument 'extra'") as info:
        call_python(wf, "def f(x):\n    return x\n", x=1, extra=2)
    assert info.value.hint is not None and "x" in info.value.hint


def test_python_missing_argument_is_permanent(wf: Path) -> None:
    with pytest.raises(PermanentError, match="missing the argument"):
        call_python(wf, "def f(x, y):\n    return x\n", x=1)


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    ("raised", "expected", "message"),
    [
        ("TimeoutError('slow')", TransientError, "TimeoutError: slow"),
        ("asyncio.TimeoutError()", TransientError, "TimeoutError: "),
        ("ConnectionResetError('reset')", TransientError, "ConnectionResetError: reset"),
        ("ConnectionError('down')", TransientError, "ConnectionError: down"),
        ("ValueError('bad value')", PermanentError, "ValueError: bad value"),
        ("KeyError('k')", PermanentError, "KeyError: 'k'"),
        ("SystemExit(2)", PermanentError, "SystemExit: 2"),
    ],
)
@pytest.mark.parametrize("prefix", ["", "async "])
def test_python_exceptions_are_classified(
    wf: Path, raised: str, expected: type[StepFailure], message: str, prefix: str
) -> None:
    source = f"import asyncio\n\n{prefix}def f():\n    raise {raised}\n"
    with pytest.raises(StepFailure) as info:
        call_python(wf, source)
    assert type(info.value) is expected
    assert info.value.message == message
    assert isinstance(info.value.__cause__, BaseException)


def test_python_step_failures_pass_through_unchanged(wf: Path) -> None:
    source = """
        from storyflow.errors import InvalidOutput, TransientError

        def f(which):
            if which == "transient":
                raise TransientError("rate limited", retry_after_s=7)
            raise InvalidOutput("no title")
    """
    name = module(wf, source)
    agent = PythonAgent()
    with pytest.raises(TransientError) as transient:
        run(agent.run(make_call(wf, {"callable": f"{name}:f", "which": "transient"})))
    assert transient.value.retry_after_s == 7
    assert transient.value.__cause__ is None
    with pytest.raises(InvalidOutput, match="no title"):
        run(agent.run(make_call(wf, {"callable": f"{name}:f", "which": "invalid"})))


@pytest.mark.parametrize("spec", ["module.function", "mod:", ":f", "a b:f", "m:f-g", 3, None])
def test_python_bad_callable_string_is_permanent(wf: Path, spec: Any) -> None:
    with pytest.raises(PermanentError) as info:
        run(PythonAgent().run(make_call(wf, {"callable": spec})))
    assert info.value.hint is not None and "package.module:function" in info.value.hint


def test_python_missing_module_is_permanent(wf: Path) -> None:
    call = make_call(wf, {"callable": "no_such_module_sf:f"})
    with pytest.raises(PermanentError, match="no_such_module_sf") as info:
        run(PythonAgent().run(call))
    assert info.value.hint is not None and str(wf) in info.value.hint


def test_python_missing_function_is_permanent(wf: Path) -> None:
    with pytest.raises(PermanentError, match="has no attribute 'g'"):
        call_python(wf, "def f():\n    return 1\n", func="g")


def test_python_module_failing_at_import_is_permanent(wf: Path) -> None:
    with pytest.raises(PermanentError, match="ZeroDivisionError"):
        call_python(wf, "x = 1 / 0\n\ndef f():\n    return x\n")


def test_python_not_callable_is_permanent(wf: Path) -> None:
    with pytest.raises(PermanentError, match="not a callable"):
        call_python(wf, "f = 3\n")


@pytest.mark.parametrize(
    ("expr", "type_name"), [("object()", "object"), ("{1, 2}", "set"), ("float('nan')", "float")]
)
def test_python_non_serialisable_output_is_invalid(wf: Path, expr: str, type_name: str) -> None:
    with pytest.raises(InvalidOutput, match=f"returned a {type_name} that is not JSON"):
        call_python(wf, f"def f():\n    return {expr}\n")


def test_python_callable_is_resolved_once(wf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resolve = python_agent._resolve

    def counting(workflow_dir: Path, spec: str) -> Any:
        global RESOLVES
        RESOLVES += 1
        return resolve(workflow_dir, spec)

    monkeypatch.setattr(python_agent, "_resolve", counting)
    name = module(wf, "def f(i):\n    return i\n\ndef g():\n    return 0\n")
    agent = PythonAgent()
    before = RESOLVES

    async def many() -> list[Any]:
        out = [await agent.run(make_call(wf, {"callable": f"{name}:f", "i": i})) for i in range(5)]
        out.append(await agent.run(make_call(wf, {"callable": f"{name}:g"})))
        return out

    assert run(many()) == [0, 1, 2, 3, 4, 0]
    assert RESOLVES - before == 2
    assert sys.path.count(str(wf)) == 1


def test_python_sync_callables_run_on_the_sized_pool(wf: Path) -> None:
    source = "import threading\n\ndef f():\n    return threading.current_thread().name\n"
    python_agent.set_thread_pool_size(2)
    try:
        assert call_python(wf, source).startswith("storyflow-python")
        assert python_agent._pool()._max_workers == 2
    finally:
        python_agent.set_thread_pool_size(python_agent.DEFAULT_THREAD_POOL_SIZE)
    with pytest.raises(ValueError, match="at least 1"):
        python_agent.set_thread_pool_size(0)


def test_call_and_context_reprs_hide_secrets(tmp_path: Path) -> None:
    call = make_call(tmp_path, {}, secrets={"TOKEN": "hunter2"})
    assert "hunter2" not in repr(call)
    assert "hunter2" not in repr(StepContext.of(call))


# --------------------------------------------------------------------------- command


def call_command(folder: Path, inputs: dict[str, Any], **kw: Any) -> Any:
    return run(CommandAgent().run(make_call(folder, inputs, **kw)))


def test_command_argv_list_runs_without_a_shell(tmp_path: Path) -> None:
    assert call_command(tmp_path, {"run": ["echo", "a  b", "$HOME", 3]}) == "a  b $HOME 3"


def test_command_shell_string(tmp_path: Path) -> None:
    assert call_command(tmp_path, {"run": "echo one; echo two | tr a-z A-Z"}) == "one\nTWO"


def test_command_runs_in_the_workflow_folder_or_cwd(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert call_command(tmp_path, {"run": ["pwd", "-P"]}) == str(tmp_path.resolve())
    assert call_command(tmp_path, {"run": "pwd -P", "cwd": "sub"}) == str(
        (tmp_path / "sub").resolve()
    )
    with pytest.raises(PermanentError, match="not a directory"):
        call_command(tmp_path, {"run": "pwd", "cwd": "missing"})


def test_command_stdin(tmp_path: Path) -> None:
    assert call_command(tmp_path, {"run": ["cat"], "stdin": "line 1\nline 2\n"}) == "line 1\nline 2"
    assert call_command(tmp_path, {"run": ["cat"], "stdin": {"a": 1}}) == '{"a": 1}'


def test_command_environment_is_minimal_plus_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORYFLOW_TEST_LEAK", "1")
    script = 'echo "${STORYFLOW_TEST_LEAK-unset}|$MINE|$FLAG|$API_KEY|${PATH:+path}"'
    out = call_command(
        tmp_path,
        {"run": script, "env": {"MINE": 5, "FLAG": True}},
        secrets={"API_KEY": "s3cret"},
    )
    assert out == "unset|5|true|s3cret|path"
    names = call_command(tmp_path, {"run": ["env"]}).splitlines()
    allowed = {*command_agent.PASSED_ENV, "PWD", "SHLVL", "_"}
    assert {line.split("=", 1)[0] for line in names} <= allowed


def test_command_json_output(tmp_path: Path) -> None:
    out = call_command(tmp_path, {"run": ["printf", '{"a": [1, 2]}\n'], "output": "json"})
    assert out == {"a": [1, 2]}


def test_command_bad_json_is_invalid_output(tmp_path: Path) -> None:
    with pytest.raises(InvalidOutput, match="not valid JSON") as info:
        call_command(tmp_path, {"run": "echo 'not json' ; seq 1 500", "output": "json"})
    stdout = "not json\n" + "".join(f"{i}\n" for i in range(1, 501))
    assert info.value.message.endswith(f": {stdout[:200]!r}")


def test_command_exit_75_is_transient(tmp_path: Path) -> None:
    with pytest.raises(TransientError, match="status 75: busy"):
        call_command(tmp_path, {"run": "echo busy >&2; exit 75"})


def test_command_other_exit_is_permanent_with_stderr_tail(tmp_path: Path) -> None:
    lines: list[str] = []
    script = "for i in $(seq 1 30); do echo line $i >&2; done; exit 3"
    with pytest.raises(PermanentError) as info:
        call_command(tmp_path, {"run": script}, log=lines)
    message = info.value.message
    assert message.startswith("command exited with status 3: line 11\n")
    assert message.endswith("line 30")
    assert "line 10\n" not in message
    assert lines and lines[-1].endswith("line 30")


def test_command_stderr_tail_is_capped_in_characters(tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as info:
        call_command(tmp_path, {"run": "head -c 5000 /dev/zero | tr '\\0' x >&2; exit 1"})
    assert len(info.value.message) <= len("command exited with status 1: ") + 2000


def test_command_missing_executable_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="command not found") as info:
        call_command(tmp_path, {"run": ["no-such-program-sf"]})
    assert info.value.hint is not None and "PATH" in info.value.hint
    with pytest.raises(PermanentError, match="status 127") as shell:
        call_command(tmp_path, {"run": "no-such-program-sf"})
    assert shell.value.hint is not None


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"run": []}, "argv list or a shell string"),
        ({"run": {"a": 1}}, "argv list or a shell string"),
        ({"run": " "}, "empty command"),
        ({"run": ["echo", None]}, "strings or numbers"),
        ({"run": ["echo"], "output": "yaml"}, "'text' or 'json'"),
        ({"run": ["echo"], "env": ["A=1"]}, "mapping"),
        ({"run": ["echo"], "env": {"A=B": 1}}, "bad environment variable name"),
    ],
)
def test_command_bad_configuration_is_permanent(
    tmp_path: Path, inputs: dict[str, Any], match: str
) -> None:
    with pytest.raises(PermanentError, match=match):
        call_command(tmp_path, inputs)


def gone(pid: int) -> bool:
    """The process no longer runs.

    A killed grandchild is reparented to PID 1; in some containers PID 1 never reaps,
    so a zombie (state Z) counts as gone: it is dead, only its table entry remains.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


TREE = "sleep 30 & echo $! > child.pid; echo $$ > leader.pid; wait"


def test_command_timeout_kills_the_whole_process_tree(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(StepTimeout, match=r"command timed out after 0\.5s"):
        call_command(tmp_path, {"run": TREE}, timeout_s=0.5)
    assert time.monotonic() - started < 2.5
    for name in ("child.pid", "leader.pid"):
        assert wait_gone(int((tmp_path / name).read_text())), name


def test_command_cancellation_kills_the_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"

    async def scenario() -> None:
        task = asyncio.create_task(CommandAgent().run(make_call(tmp_path, {"run": TREE})))
        for _ in range(300):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert wait_gone(int(pid_file.read_text()))
    assert wait_gone(int((tmp_path / "leader.pid").read_text()))


def test_command_engine_wait_for_kills_the_group(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent_run = CommandAgent().run(make_call(tmp_path, {"run": TREE}))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(agent_run, 0.5)

    run(scenario())
    assert wait_gone(int((tmp_path / "child.pid").read_text()))


def test_command_term_ignoring_tree_gets_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(command_agent, "KILL_GRACE_S", 0.3)
    script = "trap '' TERM; sleep 30 & echo $! > child.pid; wait; wait"
    started = time.monotonic()
    with pytest.raises(StepTimeout):
        call_command(tmp_path, {"run": script}, timeout_s=0.3)
    assert time.monotonic() - started < 2.5
    assert wait_gone(int((tmp_path / "child.pid").read_text()))


# --------------------------------------------------------------------------- template


def test_template_returns_the_native_value(tmp_path: Path) -> None:
    value = {"title": "Fox", "chapters": [1, 2]}
    out = run(TemplateAgent().run(make_call(tmp_path, {"template": value})))
    assert out is value
    assert run(TemplateAgent().run(make_call(tmp_path, {"template": "text"}))) == "text"


def test_template_missing_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"with\.template"):
        run(TemplateAgent().run(make_call(tmp_path, {})))


# --------------------------------------------------------------------------- registry

PLUGIN = """
    class EchoAgent:
        kind = "echo"
        required = ("text",)

        async def run(self, call):
            return call.inputs["text"]

    class SyncAgent:
        kind = "sync"
        required = ()

        def run(self, call):
            return None

    def make_echo():
        return EchoAgent()
"""


@pytest.fixture
def plugins(wf: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EntryPoint]]:
    """Entry points the registry will see instead of the installed ones."""
    found: list[EntryPoint] = []
    lookups: list[str] = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        lookups.append(group)
        assert len(lookups) == 1, "entry points are discovered once"
        return [ep for ep in found if ep.group == group]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    sys.path.insert(0, str(wf))
    registry.reset()
    yield found
    registry.reset()


def entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=registry.GROUP)


def test_registry_lists_every_builtin_kind(plugins: list[EntryPoint]) -> None:
    assert registry.kinds() == {
        "python": ("callable",),
        "command": ("run",),
        "template": ("template",),
        "llm": (),
        "workflow": ("path",),
        "human": (),
        "builtin/grammar": (),
    }


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("python", PythonAgent), ("command", CommandAgent), ("template", TemplateAgent)],
)
def test_registry_get_returns_a_cached_instance(
    plugins: list[EntryPoint], kind: str, cls: type
) -> None:
    agent = registry.get(kind)
    assert isinstance(agent, cls)
    assert agent.kind == kind
    assert registry.get(kind) is agent


def test_registry_implements_every_builtin_kind(plugins: list[EntryPoint]) -> None:
    for kind in registry.BUILTIN_KINDS:
        agent = registry.get(kind)
        assert agent.kind == kind
        assert registry.get(kind) is agent


def test_registry_unknown_kind_suggests_a_name(plugins: list[EntryPoint]) -> None:
    with pytest.raises(PermanentError, match="not available") as info:
        registry.get("pyhton")
    assert info.value.hint == "did you mean 'python'?"


def test_registry_loads_entry_point_kinds(wf: Path, plugins: list[EntryPoint]) -> None:
    name = module(wf, PLUGIN)
    plugins.append(entry_point("echo", f"{name}:EchoAgent"))
    plugins.append(entry_point("echo2", f"{name}:make_echo"))
    plugins.append(entry_point("python", f"{name}:EchoAgent"))  # built-in names are reserved
    kinds = registry.kinds()
    assert kinds["echo"] == ("text",) and kinds["echo2"] == ("text",)
    assert kinds["python"] == ("callable",)
    agent = registry.get("echo")
    assert registry.get("echo") is agent
    assert isinstance(registry.get("python"), PythonAgent)
    assert run(agent.run(make_call(wf, {"text": "hi"}))) == "hi"


@pytest.mark.parametrize(
    ("value", "match"),
    [("sf_missing_plugin_mod:Agent", "ModuleNotFoundError"), ("{mod}:SyncAgent", "async def run")],
)
def test_registry_broken_entry_point_is_named(
    wf: Path, plugins: list[EntryPoint], value: str, match: str
) -> None:
    name = module(wf, PLUGIN)
    plugins.append(entry_point("broken", value.format(mod=name)))
    assert registry.kinds()["broken"] == ()
    for _ in range(2):
        with pytest.raises(PermanentError, match="entry point broken = ") as info:
            registry.get("broken")
        assert match in info.value.message
