"""Any command line a user can type gets a clear answer (SPEC §2, §7).

`test_any_command_line` builds argv from every subcommand the typer app registers
(discovered, so a new command is fuzzed the day it lands): valid options, unknown
ones, missing and extra arguments, odd values (empty, ``-``, ``--``, very long,
unicode, control characters, huge and negative numbers, a directory, a missing file,
a binary file, YAML that is not a workflow, run ids that exist, do not, or are not
ids). Each argv runs as a real ``python -m storyflow`` subprocess, stdin closed, in a
fresh copy of a project whose state directory holds real runs (succeeded, a fork of
it, failed, waiting for an answer). Whatever the argv:

* no Python traceback and no ``internal error`` on either stream, no hang;
* the exit code is a documented one (0, 1, 2, 3, 4), an unknown command or option is
  a usage error (2), and a non-zero exit says something;
* afterwards every run still reads back (``storyflow show RUN --json`` exits 0) and,
  unless the command may change runs (resume, cancel, gc), is exactly as it was; a
  run `gc` removed is gone whole.

``STORYFLOW_FUZZ_EXAMPLES`` raises the number of examples for a longer campaign. The
example-based tests after it pin down the defects found by the campaign and by probing
around it (closed and full output streams).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import cli_env

TIMEOUT_S = 30.0
EXIT_CODES = {0, 1, 2, 3, 4}
EXAMPLES = int(os.environ.get("STORYFLOW_FUZZ_EXAMPLES", "100"))
# The commands SPEC §2 promises; the fuzz covers whatever else is registered too.
SPEC_COMMANDS = {"run", "resume", "validate", "runs", "show", "logs", "report", "graph",
                 "init", "doctor", "schema", "fork", "diff", "replay", "cancel", "gc"}
# Commands that may change a run that exists; the others must leave every run as it was.
CHANGES_RUNS = {"resume", "cancel", "gc"}
# At the start of a line: `schema events` quotes the first in a description.
CRASH = re.compile(r"^(Traceback \(most recent call last\)|internal error:|Task exception "
                   r"was never retrieved|Exception ignored in)", re.MULTILINE)

STORY = """\
apiVersion: storyflow/v1
name: fuzzed
inputs:
  hero: {type: string, default: Ada}
  count: {type: integer, default: 2}
  approve: {type: boolean, default: false}
environments:
  offline: {config: {model: none}}
config: {model: gpt-4o-mini}
steps:
  premise: {uses: template, with: {template: "A keeper named {{ inputs.hero }}"}}
  story:
    uses: template
    with: {template: "{{ steps.premise.output }} finds {{ inputs.count }} maps"}
  ask:
    uses: human
    needs: [story]
    when: inputs.approve
    with: {question: "Keep it?", schema: {type: boolean}}
outputs:
  story: "{{ steps.story.output }}"
"""

FAILING = """\
apiVersion: storyflow/v1
name: failing
steps:
  a: {uses: template, with: {template: "x"}}
  b: {uses: command, needs: [a], with: {run: ["false"]}}
"""


class Project:
    """A folder with workflows and odd files, and ``state/`` holding real runs."""

    def __init__(self, root: Path, runs: dict[str, str], shown: dict[str, Any]) -> None:
        self.root = root
        self.runs = runs
        """Placeholder (``{OK}``, ``{FORK}``, ``{FAILED}``, ``{WAITING}``) → run id."""
        self.shown = shown
        """Run id → its ``show --json`` document as created."""

    def __repr__(self) -> str:  # short: hypothesis prints it with a failing example
        return f"Project({str(self.root)!r}, {self.runs!r})"


def run_storyflow(argv: list[str], cwd: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """``python -m storyflow ARGV``, stdin closed; a hang kills its process group."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "storyflow", *argv], cwd=cwd, env=cli_env(state),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, encoding="utf-8", errors="replace", start_new_session=True,
    )
    try:
        out, errs = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"storyflow {argv!r} hung for {TIMEOUT_S:.0f} s")
    return subprocess.CompletedProcess(argv, proc.returncode, out, errs)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    root = tmp_path_factory.mktemp("fuzz") / "project"
    root.mkdir()
    (root / "story.yaml").write_text(STORY, encoding="utf-8")
    (root / "failing.yaml").write_text(FAILING, encoding="utf-8")
    (root / "notwf.yaml").write_text("a: 1\nb: [1, 2]\n", encoding="utf-8")
    (root / "empty.yaml").write_text("", encoding="utf-8")
    (root / "bin.dat").write_bytes(bytes(range(256)) * 4)
    (root / "answer.json").write_text("true\n", encoding="utf-8")
    (root / "adir").mkdir()
    state = root / "state"

    def start(*argv: str, code: int = 0) -> str:
        result = run_storyflow([*argv, "--json"], root, state)
        assert result.returncode == code, (argv, result.stdout, result.stderr)
        run_id: str = json.loads(result.stdout.splitlines()[0])["run_id"]
        return run_id

    runs = {"{OK}": start("run", "story.yaml")}
    runs["{FORK}"] = start("fork", runs["{OK}"], "-i", "hero=Zed")
    runs["{FAILED}"] = start("run", "failing.yaml", code=1)
    runs["{WAITING}"] = start("run", "story.yaml", "-i", "approve=true", code=3)
    shown = {rid: json.loads(run_storyflow(["show", rid, "--json"], root, state).stdout)
             for rid in runs.values()}
    assert [shown[runs[k]]["status"] for k in ("{OK}", "{FORK}", "{FAILED}", "{WAITING}")] \
        == ["succeeded", "succeeded", "failed", "waiting"]
    return Project(root, runs, shown)


# --- the commands, discovered ---------------------------------------------------------


def _commands() -> dict[str, Any]:
    """The click commands behind ``storyflow --help``, by name."""
    import typer.main

    from storyflow.commands.app import app

    # What `storyflow.commands.main` imports to register them.
    for name in ("cancel", "diff", "doctor", "fork", "gc", "init", "inspect", "report",
                 "run", "runs", "spec"):
        importlib.import_module(f"storyflow.commands.{name}_cmds")
    group: Any = typer.main.get_command(app)
    return dict(group.commands)


COMMANDS = _commands()

# --- values ---------------------------------------------------------------------------


def _safe(text: str) -> str:
    """Random text as an argument that cannot reach outside the example's folder."""
    return "x" + text if text.startswith(("/", "~")) or ".." in text else text


ODD = ["", "-", "--", " ", "x" * 5000, "ü☃𝔘ñ日本", "\x01\x02\x1b[31mred\x7f", "\t\r\n",
       "-1", "0", "-99999999999999999999", "99999999999999999999", "1e309", "nan",
       "%s%n", "{{ 7 * 7 }}", "$(echo hi)", "a=b=c", "=", "@", "@missing", "@adir",
       "@bin.dat", ".", "*", "null", "[1,", "{}"]
odd = st.one_of(
    st.sampled_from(ODD),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
            max_size=12).map(_safe),
)
PATHS = ["story.yaml", "failing.yaml", "notwf.yaml", "empty.yaml", "bin.dat", "adir",
         "answer.json", "missing.yaml", "missing/dir/x.yaml", "p" * 300, "-", "", "."]
RUNS = ["{OK}", "{FORK}", "{FAILED}", "{WAITING}", "{OK_PREFIX}", "{AMBIGUOUS}",
        "20991231-000000-zzzzzz", "nope", "../../etc", "runs", "a/b", "*", "{OK}x", " {OK}"]
STEPS = ["premise", "story", "ask", "a", "b", "nope", "", "story#1", "loop#2", "draft[2]",
         "premise.x", "LOOP.STEP"]
NUMBERS = ["0", "1", "-1", "8", "99999999999999999999", "abc", "", "1.5", "1e3"]
KEYS = ["hero", "count", "approve", "nope", "", "a.b", "☃", "hero "]
SET_PATHS = ["config.model", "a.b", "", ".", "a..b", "steps.premise.with.template",
             "steps.story.needs", "defaults.retry.max_attempts", "budget.tokens", "steps",
             "name", "apiVersion", "inputs.count.default", "p" * 300, "steps[0]", "outputs"]
VALUES = ["x", "", "-1", "99999999999999999999999", "true", "null", "[1,", "{}", "[]",
          "1e309", "\x01", "{{ inputs.hero }}", "{{", "y" * 3000, "☃"]


def _pairs(keys: list[str], sep: str = "=") -> st.SearchStrategy[str]:
    pair = st.tuples(st.sampled_from(keys), st.sampled_from(VALUES) | odd)
    return st.one_of(pair.map(lambda kv: kv[0] + sep + kv[1]), odd)


BY_NAME: dict[str, st.SearchStrategy[str]] = {
    "inputs": _pairs(KEYS),
    "sets": _pairs(SET_PATHS),
    "answer_specs": _pairs(["ask", "nope", "premise", ""]) | st.sampled_from(
        ["ask=true", "ask=false", "ask=@answer.json", "ask=@bin.dat", "ask=@adir", "ask=@"]),
    "fmt": st.sampled_from(["text", "json", "github", "mermaid", "dot", "table", "html",
                            "junit", "JSON", "nope", ""]),
    "env": st.sampled_from(["offline", "nope", "", "OFFLINE"]) | odd,
    "executor_opt": st.sampled_from(["local", "", "nope", "tcp://", "tcp://host:port",
                                     "tcp://[::1", "dask://x", "LOCAL"]),
    "executor": st.sampled_from(["local", "", "nope", "tcp://", "tcp://[::1"]),
    "status": st.sampled_from(["running", "succeeded", "failed", "interrupted", "waiting",
                               "nope", ""]),
    "workflow": st.sampled_from(["fuzzed", "failing", "nope", ""]) | odd,
    "older_than": st.sampled_from(["90m", "12h", "30d", "2w", "0d", "-5d", "1y", "", "0",
                                   "99999999999999999999d", "1.5h", "nan"]),
    "template": st.sampled_from(["short-story", "novella", "batch", "blank", "", "nope"]),
    "name": st.sampled_from(["workflow", "events", "show", "report", "diff", "runs", "",
                             "nope", "../x"]) | odd,
    "step": st.sampled_from(STEPS) | odd,
    "from_steps": st.sampled_from(STEPS) | odd,
    "follow": st.sampled_from(STEPS),
    "output": st.sampled_from(["story", "nope", ""]),
    "run_id": st.sampled_from(["fuzz-new", "", "{OK}", "../x", "a b", "r" * 300, "☃", "-",
                               ".", "fuzz/../x"]) | odd,
    "run_ref": st.sampled_from(RUNS) | odd,
    "run_a": st.sampled_from(RUNS) | odd,
    "run_b": st.sampled_from(RUNS) | odd,
}


def _values(cmd: str, param: Any) -> st.SearchStrategy[str]:
    """What to pass to one parameter of one command."""
    kind = type(param.type).__name__
    if kind == "IntRange" or param.name in ("keep", "limit", "max_parallel"):
        return st.sampled_from(NUMBERS)
    if cmd == "show" and param.name == "output":  # a run output's name, not a path
        return BY_NAME["output"]
    if kind in ("TyperPath", "Path"):
        return st.sampled_from(PATHS) | odd
    return BY_NAME.get(param.name, odd)


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[list[str], str | None, bool]:
    """(argv, the subcommand or None when unknown, whether argv must be a usage error)."""
    head: list[str] = []
    prefix = draw(st.sampled_from([None, None, None, "--state-dir", "--help", "--version"]))
    if prefix == "--state-dir":
        head = ["--state-dir", draw(st.sampled_from(
            ["state", "adir", "bin.dat", "fresh-state", "", "s" * 300]))]
    elif prefix:
        head = [prefix]
    if draw(st.integers(0, 19)) == 0:
        unknown = draw(st.sampled_from(["list", "ls", "answer", "approve", "", "-", "--bogus",
                                        "☃", "SHOW", "runz"]))
        return [*head, unknown, *draw(st.lists(odd, max_size=2))], None, prefix is None
    name = draw(st.sampled_from(sorted(COMMANDS)))
    cmd = COMMANDS[name]
    groups: list[list[str]] = []
    for param in cmd.params:
        if param.param_type_name == "argument":
            count = draw(st.integers(0, 2))
            groups += [[draw(_values(name, param))] for _ in range(count)]
        elif draw(st.integers(0, 2)) == 0:
            opt = draw(st.sampled_from(param.opts))
            if param.is_flag:
                groups.append([opt])
            else:
                repeat = draw(st.integers(1, 2)) if param.multiple else 1
                for _ in range(repeat):
                    value = draw(_values(name, param))
                    glued = draw(st.integers(0, 4)) == 0  # --format=json, -ihero=x
                    groups.append([f"{opt}={value}" if opt.startswith("--") else opt + value]
                                  if glued else [opt, value])
                if draw(st.integers(0, 15)) == 0:
                    groups.append([opt])  # its value missing: takes the next token
    groups = draw(st.permutations(groups))
    tail = [token for group in groups for token in group]
    if draw(st.integers(0, 9)) == 0:
        tail.insert(draw(st.integers(0, len(tail))), draw(st.sampled_from(["--", "--help"])))
    bogus = draw(st.integers(0, 7)) == 0
    if bogus:
        tail.insert(0, draw(st.sampled_from(["--bogus", "-Z", "--jsn", "--las", "--state-dir"])))
    return [*head, name, *tail], name, bogus and prefix is None


# --- the property ---------------------------------------------------------------------


def _resolve(argv: list[str], project: Project) -> list[str]:
    ids = sorted(project.runs.values())
    table = dict(project.runs, **{
        "{OK_PREFIX}": project.runs["{OK}"][:-2],
        "{AMBIGUOUS}": ids[0][:4],  # the year: every run has it
    })
    out = []
    for token in argv:
        for key, value in table.items():
            token = token.replace(key, value)
        out.append(token)
    return out


def _clean(result: subprocess.CompletedProcess[str]) -> None:
    said = result.stdout + "\n" + result.stderr
    assert not CRASH.search(said), (result.args, result.returncode, said[-3000:])
    assert result.returncode in EXIT_CODES, (result.args, result.returncode, said[-3000:])
    if result.returncode:  # on stderr, or as JSON on stdout (`validate --format json`)
        assert said.strip(), (result.args, result.returncode, "a failure that says nothing")


def _steps(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(s["id"], s["status"], s["attempts"], s["output"]) for s in doc["steps"]]


def _reads_back(project: Project, work: Path, name: str | None, argv: list[str]) -> None:
    """Every run of the project still reads back, as it was unless ``name`` may change it."""
    state = work / "state"
    removable = name == "gc" and "--dry-run" not in argv

    def show(run_id: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        return run_id, run_storyflow(["show", run_id, "--json"], work, state)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(show, project.shown))
    for run_id, result in results:
        _clean(result)
        if removable and result.returncode == 2 and "no run matches" in result.stderr:
            assert not (state / "runs" / run_id).exists(), f"gc left half of {run_id}"
            continue
        assert result.returncode == 0, (argv, run_id, result.stderr)
        doc = json.loads(result.stdout)
        before = project.shown[run_id]
        assert doc["run_id"] == run_id
        assert doc["status"] != "running", (argv, run_id, "left running with no holder")
        if name not in CHANGES_RUNS:
            assert (doc["status"], _steps(doc)) == (before["status"], _steps(before)), argv


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(line=command_lines())
def test_any_command_line(project: Project, line: tuple[list[str], str | None, bool]) -> None:
    argv, name, usage_error = line
    argv = _resolve(argv, project)
    with tempfile.TemporaryDirectory(dir=project.root.parent) as tmp:
        work = Path(tmp) / "project"
        shutil.copytree(project.root, work, symlinks=True)
        result = run_storyflow(argv, work, work / "state")
        event(f"{name or '(unknown)'} exits {result.returncode}")
        _clean(result)
        if usage_error:
            assert result.returncode == 2, (argv, result.stdout, result.stderr)
        _reads_back(project, work, name, argv)


def test_every_spec_command_is_fuzzed() -> None:
    assert SPEC_COMMANDS <= set(COMMANDS), SPEC_COMMANDS - set(COMMANDS)


# --- what the campaign and the probing found ------------------------------------------


@pytest.fixture
def work(project: Project, tmp_path: Path) -> Path:
    """A fresh copy of the project, its runs included."""
    return Path(shutil.copytree(project.root, tmp_path / "project", symlinks=True))


def _cli(work: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    result = run_storyflow(list(argv), work, work / "state")
    _clean(result)
    return result


def test_an_answer_file_that_is_not_text_is_a_usage_error(project: Project, work: Path) -> None:
    waiting = project.runs["{WAITING}"]
    result = _cli(work, "resume", waiting, "--answer", "ask=@bin.dat")
    assert result.returncode == 2
    assert "--answer ask: cannot read bin.dat: not UTF-8 text" in result.stderr
    assert json.loads(_cli(work, "show", waiting, "--json").stdout)["status"] == "waiting"
    assert _cli(work, "resume", waiting, "--answer", "ask=@answer.json").returncode == 0


def test_an_empty_state_dir_is_a_usage_error(work: Path) -> None:
    result = _cli(work, "--state-dir", "", "runs")
    assert result.returncode == 2
    assert "--state-dir is empty" in result.stderr
    assert not (work / "db").exists() and not (work / "runs").exists()


@pytest.mark.parametrize("name", ["x" * 400, "../schemas/workflow", "/tmp/workflow", ""])
def test_a_schema_name_is_one_the_package_ships(work: Path, name: str) -> None:
    result = _cli(work, "schema", name)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no schema named ")
    assert "\n  hint: " in result.stderr  # the names, or the nearest one


@pytest.mark.parametrize(("command", "address"), [
    (["run", "story.yaml"], "tcp://host:port"), (["resume", "--last"], "tcp://[::1"),
    (["fork", "--last"], "tcp://h:99999"), (["replay", "--last"], "tcp://h:8786x"),
    (["doctor"], "tcp://host:port"),
])
def test_a_malformed_scheduler_address_is_a_usage_error(
    work: Path, command: list[str], address: str
) -> None:
    before = _cli(work, "runs", "--all", "--json").stdout
    result = _cli(work, *command, "--executor", address)
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"error: --executor {address!r} is not a scheduler address (")
    assert _cli(work, "runs", "--all", "--json").stdout == before  # no run was recorded


def _in_shell(work: Path, redirect: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m storyflow ARGV REDIRECT`` through sh: to close or fill a stream."""
    script = f'exec "$0" -m storyflow "$@" {redirect}'
    return subprocess.run(
        ["sh", "-c", script, sys.executable, *argv], cwd=work, env=cli_env(work / "state"),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S,
        check=False,
    )


def test_a_run_with_its_output_closed_still_runs(work: Path) -> None:
    result = _in_shell(work, ">&- 2>&-", "run", "story.yaml", "--run-id", "closed")
    assert result.returncode == 0
    assert json.loads(_cli(work, "show", "closed", "--json").stdout)["status"] == "succeeded"
    # the exit code does not depend on whether the message could be shown
    assert _in_shell(work, "2>&-", "show", "nope").returncode == 2


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["show", "--help"]])
def test_help_into_a_full_disk_is_a_message(work: Path, argv: list[str]) -> None:
    result = _in_shell(work, ">/dev/full", *argv)
    assert result.returncode == 1
    assert result.stderr == "error: cannot write the output: No space left on device\n"
