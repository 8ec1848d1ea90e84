"""Hostile input through the real command (issue #13, items 5, 6, 7 and 10).

Whatever the input, storyflow ends with a clear message and an exit code of the
contract (0, 1 run failed, 2 invalid usage or workflow), loses nothing committed and
prints no traceback:

* a value JSON cannot hold (``dict_items``, a set) fails its step as ``invalid_output``
  whatever the agent kind, and an error no step catches still ends the run ``failed``
  — resumable — instead of leaving it ``running`` with no holder;
* nesting past 200 levels is refused where it enters (the file, ``--inputs``, ``-i``,
  ``--set``), located, before anything recurses;
* paths the system refuses (too long, a symlink loop, not a directory, no permission)
  and run ids that are not ids are usage errors;
* a template pasted into a shell-string ``run`` is warned about; ``| shquote`` makes
  it one shell word.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from conftest import SCHEMAS

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _clean(result: subprocess.CompletedProcess[str], *codes: int) -> None:
    """Exit with one of ``codes``, and no Python traceback on either stream."""
    assert result.returncode in codes, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert "Task exception" not in result.stderr


def _show(cli: Cli, run_id: str) -> dict[str, Any]:
    result = cli("show", run_id, "--json")
    _clean(result, 0)
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def _summary(stdout: str) -> dict[str, Any]:
    last: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    assert last["type"] == "run.summary"
    return last


# ----------------------------------------------------------------- 5: values JSON cannot hold

WEDGE = """\
apiVersion: storyflow/v1
name: wedge
steps:
  pairs: {uses: template, with: {template: "{{ {'a': 1}.items() }}"}}
  after: {uses: template, with: {template: "got {{ steps.pairs.output }}"}}
outputs:
  pairs: "{{ steps.pairs.output }}"
"""


def test_an_output_json_cannot_hold_fails_its_step_and_resumes(
    cli: Cli, write_workflow: Callable[..., Path]
) -> None:
    path = write_workflow(WEDGE)
    result = cli("run", path, "--json")
    _clean(result, 1)
    summary = _summary(result.stdout)
    run_id = summary["run_id"]
    shown = _show(cli, run_id)
    assert shown["status"] == "failed"
    step = next(s for s in shown["steps"] if s["id"] == "pairs")
    assert step["status"] == "failed"
    assert step["error"]["class"] == "invalid_output"
    assert "dict_items" in step["error"]["message"]
    assert "| list" in (step["error"].get("hint") or "")
    # fixed, the run goes on from its checkpoint
    path.write_text(WEDGE.replace(".items() }}", ".items() | list }}"), encoding="utf-8")
    resumed = cli("resume", run_id, "--json")
    _clean(resumed, 0)
    assert _summary(resumed.stdout)["outputs"] == {"pairs": [["a", 1]]}


AGENT_MODULE = """\
class Odd:
    kind = "oddkind"
    required = ()

    async def run(self, call):
        what = call.inputs.get("what")
        if what == "set":
            return {"names": {"a", "b"}}
        if what == "tuple":
            return ("a", ("b", 1))
        return {1: "number keys become text"}
"""


def test_a_third_party_kind_is_held_to_json_too(
    cli: Cli, write_workflow: Callable[..., Path], tmp_path: Path
) -> None:
    """A kind from an installed package (a real entry point): a set fails the step as
    invalid_output; tuples become lists and number keys text, as JSON has them."""
    site = tmp_path / "site"
    dist = site / "oddkind-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: oddkind\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[storyflow.agents]\noddkind = oddkind_mod:Odd\n")
    (site / "oddkind_mod.py").write_text(AGENT_MODULE)
    path = write_workflow("""\
        apiVersion: storyflow/v1
        name: odd
        steps:
          tuple:
            uses: oddkind
            with: {what: tuple}
            output_schema: {type: array, prefixItems: [{type: string}, {type: array}]}
          keys: {uses: oddkind, with: {what: keys}}
          set: {uses: oddkind, with: {what: set}, allow_failure: true}
        outputs:
          tuple: "{{ steps.tuple.output }}"
          keys: "{{ steps.keys.output }}"
        """)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = cli("run", path, "--json", env=env)
    _clean(result, 0)
    summary = _summary(result.stdout)
    assert summary["outputs"] == {"tuple": ["a", ["b", 1]],
                                  "keys": {"1": "number keys become text"}}
    step = next(s for s in _show(cli, summary["run_id"])["steps"] if s["id"] == "set")
    assert step["error"]["class"] == "invalid_output"
    assert "set" in step["error"]["message"]


CRASH_HEAD = "apiVersion: storyflow/v1\nname: crash\nsteps:\n"
CRASHES = {
    "outputs": (CRASH_HEAD + "  a: {uses: template, with: {template: x}}\n"
                "outputs:\n  o: \"{{ {1: 2}.items() }}\"\n"),
    "best_by": (CRASH_HEAD + "  l:\n    loop:\n      max_iterations: 2\n"
                "      best_by: \"{{ {1: 2}.items() }}\"\n"
                "      steps:\n        a: {uses: template, with: {template: x}}\n"),
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_an_error_no_step_catches_ends_the_run_failed_not_running(
    cli: Cli, write_workflow: Callable[..., Path], where: str
) -> None:
    """Reproduces the wedge: an error past every step's own handling (a value the
    checkpoint cannot store, in the outputs or a loop's score) left the run `running`
    with no holder (and a loop's printed a traceback). Now the run ends `failed`, says
    how to go on, and resumes once the file is fixed."""
    path = write_workflow(CRASHES[where])
    result = cli("run", path, "--json")
    _clean(result, 1)
    assert "internal error: TypeError" in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    validator = Draft202012Validator(json.loads((SCHEMAS / "events.schema.json").read_text()))
    for event in events:
        validator.validate(event)
    assert [e["type"] for e in events][-2:] == ["run.failed", "run.summary"]
    run_id = events[-1]["run_id"]
    assert f"storyflow resume {run_id}" in result.stderr
    shown = _show(cli, run_id)
    assert shown["status"] == "failed"
    assert "internal error" in shown["error"]["message"]
    path.write_text(CRASHES[where].replace(".items() }}", ".items() | list }}"), encoding="utf-8")
    resumed = cli("resume", run_id, "--json")
    _clean(resumed, 0)
    assert _show(cli, run_id)["status"] == "succeeded"
    if where == "outputs":
        assert _summary(resumed.stdout)["outputs"] == {"o": [[1, 2]]}


# ----------------------------------------------------------------- 6: deep nesting

DEEP_HEAD = "apiVersion: storyflow/v1\nname: deep\n"
STEP = "steps:\n  s: {uses: template, with: {template: x}}\n"


@pytest.mark.parametrize("shape", ["[", "{a: ", "- "])
def test_validate_refuses_deep_nesting_with_its_place(
    cli: Cli, write_workflow: Callable[..., Path], shape: str
) -> None:
    """40,000 levels crashed the process (a segfault in the YAML composer); 1,000 gave
    "internal error: RecursionError"."""
    for n in (1000, 40_000):
        closer = {"[": "]", "{a: ": "}", "- ": ""}[shape]
        if shape == "- ":
            body = "config:\n  k:\n    " + shape * n + "x\n"
        else:
            body = "config:\n  k: " + shape * n + "x" + closer * n + "\n"
        path = write_workflow(DEEP_HEAD + body + STEP)
        result = cli("validate", path)
        _clean(result, 2)
        first = result.stderr.splitlines()[0]
        col = (5 if shape == "- " else 6) + 198 * len(shape)  # the 201st level
        line = 5 if shape == "- " else 4
        assert first == (f"{path}:{line}:{col}: error: lists and mappings nested deeper "
                         "than 200 levels"), first
        assert "at most 200 deep" in result.stderr


def test_a_deep_for_each_list_is_refused(cli: Cli, write_workflow: Callable[..., Path]) -> None:
    path = write_workflow(DEEP_HEAD + "steps:\n  m:\n    for_each: " + "[" * 500 + "]" * 500
                          + "\n    uses: template\n    with: {template: x}\n")
    result = cli("run", path, "--dry-run")
    _clean(result, 2)
    assert "nested deeper than 200 levels" in result.stderr
    assert "at $.steps.m.for_each[0][0]" in result.stderr


def test_deep_values_on_the_command_line_are_usage_errors(
    cli: Cli, write_workflow: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_workflow(DEEP_HEAD + "inputs:\n  x: {default: 1}\n  xs: {type: array, "
                          "default: []}\n" + STEP)
    deep = "[" * 5000 + "]" * 5000
    data = tmp_path / "deep.json"
    data.write_text(json.dumps({"x": 1})[:-1] + f', "xs": {deep}}}', encoding="utf-8")
    for args, says in [
        (("-i", f"x={deep}"), "input 'x': lists and mappings nested deeper than 200 levels"),
        (("-i", f"xs={deep}"), "input 'xs': lists and mappings nested deeper than 200 levels"),
        (("--set", f"config={deep}"), "--set config: lists and mappings nested deeper"),
        (("--inputs", str(data)), f"{data}:1:"),
    ]:
        result = cli("run", path, "--dry-run", *args)
        _clean(result, 2)
        assert says in result.stderr, result.stderr


# ----------------------------------------------------------------- 7: paths and run ids

def test_a_sub_workflow_path_too_long_is_a_validation_error(
    cli: Cli, write_workflow: Callable[..., Path]
) -> None:
    path = write_workflow(DEEP_HEAD + "steps:\n  child: {uses: workflow, with: {path: \""
                          + "a" * 300 + ".yaml\"}}\n")
    for args in (("validate", path), ("run", path), ("run", path, "--dry-run")):
        result = cli(*args)
        _clean(result, 2)
        assert "cannot be used: File name too long" in result.stderr
        assert "at $.steps.child.with.path" in result.stderr
        assert "hint: " in result.stderr


def test_an_artifact_name_too_long_is_a_validation_error(
    cli: Cli, write_workflow: Callable[..., Path]
) -> None:
    """It failed the run at its end ("internal error: OSError: File name too long")."""
    path = write_workflow(DEEP_HEAD + STEP + "artifacts:\n  " + "c" * 300 + ".md: x\n")
    result = cli("run", path)
    _clean(result, 2)
    assert "artifact path too long for a file system" in result.stderr


def test_dry_run_checks_the_run_id(cli: Cli, write_workflow: Callable[..., Path]) -> None:
    path = write_workflow(DEEP_HEAD + STEP)
    result = cli("run", path, "--dry-run", "--run-id", "../../etc")
    _clean(result, 2)
    assert "invalid run id '../../etc'" in result.stderr
    assert "hint: use letters, digits" in result.stderr


def test_paths_the_system_refuses_are_usage_errors(
    cli: Cli, write_workflow: Callable[..., Path], tmp_path: Path
) -> None:
    ok = write_workflow(DEEP_HEAD + STEP)
    long = tmp_path / ("b" * 300)
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    cases: list[tuple[tuple[str, ...], str]] = [
        (("validate", f"{long}.yaml"), "File name too long"),
        (("run", f"{long}.yaml"), "File name too long"),
        (("validate", str(loop)), "Too many levels of symbolic links"),
        (("run", str(ok), "--inputs", f"{long}.json"), "File name too long"),
        (("run", str(ok), "--inputs", str(loop)), "Too many levels of symbolic links"),
        (("--state-dir", str(long), "run", str(ok)), "--state-dir"),
        (("--state-dir", str(loop), "runs"), "Too many levels of symbolic links"),
        (("--state-dir", str(ok), "runs"), "is not a directory"),
    ]
    for args, says in cases:
        result = cli(*args)
        _clean(result, 2)
        assert says in result.stderr, (args, result.stderr)
        assert "hint: " in result.stderr or "    at $" in result.stderr
    env_state = cli("runs", env={"STORYFLOW_STATE_DIR": f"{ok}/x"})
    _clean(env_state, 2)
    assert "$STORYFLOW_STATE_DIR" in env_state.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads and writes whatever the mode says")
def test_paths_without_permission_are_usage_errors(
    cli: Cli, write_workflow: Callable[..., Path], tmp_path: Path
) -> None:
    secret = write_workflow(DEEP_HEAD + STEP, "secret.yaml")
    ok = write_workflow(DEEP_HEAD + STEP)
    locked = tmp_path / "locked"
    locked.mkdir()
    secret.chmod(0)
    locked.chmod(0)
    try:
        for args in (("validate", str(secret)), ("run", str(ok), "--inputs", str(secret)),
                     ("--state-dir", str(locked), "runs")):
            result = cli(*args)
            _clean(result, 2)
            assert "ermission denied" in result.stderr, result.stderr
    finally:
        secret.chmod(0o600)
        locked.chmod(0o700)


def test_a_state_dir_without_permission_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same check, in process, for a test run as root (``os.access`` says no)."""
    from storyflow.commands import app as app_module
    from storyflow.errors import UsageError

    real = os.access
    monkeypatch.setattr(app_module.os, "access",
                        lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    monkeypatch.setattr(app_module.G, "state_dir", tmp_path)
    with pytest.raises(UsageError) as caught:
        app_module.state_dir()
    assert caught.value.exit_code == 2
    assert "permission denied" in caught.value.message


# ----------------------------------------------------------------- 10: shell strings

SHELL = """\
apiVersion: storyflow/v1
name: shell
inputs:
  x: {type: string, default: "x; touch pwned"}
steps:
  say:
    uses: command
    with: {run: "echo {{ inputs.x RUN_FILTER}}"}
outputs:
  said: "{{ steps.say.output }}"
"""


def test_shquote_makes_a_value_one_shell_word(
    cli: Cli, write_workflow: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_workflow(SHELL.replace("RUN_FILTER", "| shquote "))
    validated = cli("validate", path)
    _clean(validated, 0)
    assert "warning" not in validated.stderr
    hostile = "a; touch pwned `touch pwned2` $(touch pwned3) \"'q"
    for value in ("x; touch pwned", hostile):
        result = cli("run", path, "--json", "-i", f"x={value}")
        _clean(result, 0)
        assert _summary(result.stdout)["outputs"]["said"].strip() == value
    assert not list(tmp_path.glob("pwned*"))


def test_an_unquoted_template_in_a_shell_string_is_warned_about(
    cli: Cli, write_workflow: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_workflow(SHELL.replace("RUN_FILTER", ""))
    text = cli("validate", path)
    _clean(text, 0)  # a warning does not make the file invalid
    assert f"{path}:8:23: warning: {{{{ inputs.x }}}} reaches the shell unquoted" in text.stderr
    assert "`run: [prog, arg]`" in text.stderr and "`env:`" in text.stderr
    assert "`| shquote`" in text.stderr
    github = cli("validate", path, "--format", "github")
    _clean(github, 0)
    assert github.stdout.startswith(f"::warning file={path},line=8,col=23,")
    as_json = json.loads(cli("validate", path, "--format", "json").stdout)
    assert as_json["valid"] is True
    assert [p["severity"] for p in as_json["files"][0]["problems"]] == ["warning"]
    # warn, don't block: the run does what the file says
    result = cli("run", path, "--json")
    _clean(result, 0)
    assert (tmp_path / "pwned").exists()


def test_safe_shapes_are_not_warned_about(cli: Cli, write_workflow: Callable[..., Path]) -> None:
    path = write_workflow("""\
        apiVersion: storyflow/v1
        name: safe
        inputs:
          x: {type: string, default: "x"}
        agents:
          sh: {uses: command, with: {run: "echo {{ inputs.x | shquote }}"}}
        steps:
          argv: {uses: command, with: {run: [echo, "{{ inputs.x }}"]}}
          env: {uses: command, with: {run: 'echo "$X"', env: {X: "{{ inputs.x }}"}}}
          count: {uses: command, with: {run: "echo {{ inputs.x | length }} {{ 'lit' }}"}}
          agent: {agent: sh}
        """)
    result = cli("validate", path)
    _clean(result, 0)
    assert "warning" not in result.stderr


def test_the_shquote_filter() -> None:
    from storyflow.spec.templates import Templates

    t = Templates()
    assert t.render("{{ x | shquote }}", {"x": "it's"}) == "'it'\"'\"'s'"
    assert t.render("{{ x | shquote }}", {"x": {"a": [1, "b c"]}}) == "'{\"a\": [1, \"b c\"]}'"
    assert t.render("{{ x | shquote }}", {"x": "plain"}) == "plain"
    assert t.render("echo {{ x | shquote }}", {"x": 3}) == "echo 3"


def test_a_deep_answer_and_an_unwritable_init_folder_are_usage_errors(
    cli: Any, tmp_path: Path
) -> None:
    wf = tmp_path / "ask.yaml"
    wf.write_text(
        "apiVersion: storyflow/v1\n"
        "name: ask\n"
        "steps:\n"
        "  approve: {uses: human, with: {question: \"ok?\", schema: {type: array}}}\n",
        encoding="utf-8",
    )
    waiting = cli("run", wf, "--no-progress")
    assert waiting.returncode == 3, waiting.stderr
    deep = "[" * 5000 + "]" * 5000
    result = cli("resume", "--last", "--answer", f"approve={deep}")
    assert result.returncode == 2, result.stderr
    assert "deeper than 200 levels" in result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    shallow = cli("resume", "--last", "--answer", "approve=[1, 2]", "--no-progress")
    assert shallow.returncode == 0, shallow.stderr
    long_name = tmp_path / ("x" * 300) / "project"
    made = cli("init", long_name)
    assert made.returncode == 2, made.stderr
    assert "cannot write the project" in made.stderr
    assert "Traceback" not in made.stderr and "internal error" not in made.stderr


def test_nan_or_infinity_in_an_output_fails_the_step_as_invalid_output(
    cli: Any, tmp_path: Path
) -> None:
    """JSON has no NaN or Infinity: an agent that yields one (a command's `output: json`
    parses them) fails its step instead of putting invalid JSON in the events."""
    wf = tmp_path / "nan.yaml"
    wf.write_text(
        "apiVersion: storyflow/v1\n"
        "name: nan\n"
        "steps:\n"
        "  listed: {uses: command, with: {run: [echo, '[1, NaN]'], output: json}}\n"
        "  alone: {uses: command, with: {run: [echo, Infinity], output: json}}\n",
        encoding="utf-8",
    )
    result = cli("run", wf, "--json")
    assert result.returncode == 1, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    failed = {e["step"]: e["error"] for e in events if e["type"] == "step.failed"}
    assert failed["listed"]["class"] == "invalid_output"
    assert failed["alone"]["class"] == "invalid_output"

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in an event: not JSON")

    for line in result.stdout.splitlines():
        json.loads(line, parse_constant=refuse)
