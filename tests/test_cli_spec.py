"""`validate`, `graph`, `schema`, `--help` and `--version` through the real command."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[1]

VALID = """\
    apiVersion: storyflow/v1
    name: tiny
    environments:
      offline: {config: {model: none}}
    config: {model: gpt-4o-mini}
    steps:
      premise: {uses: template, with: {template: "A lighthouse keeper"}}
      story:
        uses: template
        with: {template: "{{ steps.premise.output }} finds a map"}
"""

BROKEN = """\
    apiVersion: storyflow/v1
    name: broken
    agents:
      writer: {uses: llm}
    steps:
      a: {agent: writr, prompt: "{{ inputs.nope }}"}
      b: {agent: writer, prompt: "50% done", agnet: y}
    descripton: typo
"""

LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: (?P<message>.+)$")


@pytest.fixture
def valid(write_workflow: Any) -> Path:
    path: Path = write_workflow(VALID, "valid.yaml")
    return path


@pytest.fixture
def broken(write_workflow: Any) -> Path:
    path: Path = write_workflow(BROKEN, "broken.yaml")
    return path


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


# --- validate --------------------------------------------------------------------------


def test_validate_a_valid_file(cli: Any, valid: Path) -> None:
    result = cli("validate", valid)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{valid}: valid\n"
    assert result.stderr == ""


def test_validate_a_broken_file(cli: Any, broken: Path) -> None:
    result = cli("validate", broken)
    assert result.returncode == 2
    no_traceback(result)
    assert result.stdout == ""
    heads = [line for line in result.stderr.splitlines() if not line.startswith(" ")]
    summary = heads.pop()
    assert summary == f"{broken}: 4 errors"
    located = [LOCATED.match(line) for line in heads]
    assert all(located), heads
    assert [(m["line"], m["col"], m["message"]) for m in located if m] == [
        ("6", "14", "unknown agent 'writr'"),
        ("6", "29", "unknown input 'nope'"),
        ("7", "42", "unknown key 'agnet' in step 'b'"),
        ("8", "1", "unknown key 'descripton' in the workflow"),
    ]
    assert all(m and m["file"] == str(broken) for m in located)
    assert "    at $.steps.a.agent\n    hint: did you mean 'writer'?" in result.stderr


def test_validate_relative_path_is_reported_as_given(cli: Any, broken: Path) -> None:
    result = cli("validate", broken.name, cwd=broken.parent)
    assert result.returncode == 2
    assert result.stderr.startswith("broken.yaml:6:14: error: unknown agent 'writr'")


def test_validate_json(cli: Any, valid: Path, broken: Path) -> None:
    result = cli("validate", "--format", "json", valid, broken)
    assert result.returncode == 2
    no_traceback(result)
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert [f["file"] for f in report["files"]] == [str(valid), str(broken)]
    assert [f["valid"] for f in report["files"]] == [True, False]
    assert report["files"][0]["problems"] == []
    first = report["files"][1]["problems"][0]
    assert first == {
        "file": str(broken),
        "line": 6,
        "col": 14,
        "path": "$.steps.a.agent",
        "message": "unknown agent 'writr'",
        "hint": "did you mean 'writer'?",
        "severity": "error",
    }
    assert len(report["files"][1]["problems"]) == 4


def test_validate_json_valid(cli: Any, valid: Path) -> None:
    result = cli("validate", "--format", "json", valid)
    assert result.returncode == 0
    assert json.loads(result.stdout) == {
        "valid": True,
        "files": [{"file": str(valid), "valid": True, "problems": []}],
    }


def test_validate_github_annotations(cli: Any, broken: Path) -> None:
    result = cli("validate", "--format", "github", broken)
    assert result.returncode == 2
    no_traceback(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0] == (
        f"::error file={broken},line=6,col=14,title=storyflow $.steps.a.agent::"
        "unknown agent 'writr' (hint: did you mean 'writer'?)"
    )
    pattern = re.compile(r"^::error file=[^,]+,line=\d+,col=\d+,title=storyflow \S+::.+$")
    assert all(pattern.match(line) for line in lines), lines


def test_validate_github_escapes_messages_and_properties(
    cli: Any, write_workflow: Any
) -> None:
    path = write_workflow(
        'apiVersion: storyflow/v1\nname: x\nsteps:\n  a: {uses: template, with: {template: x}}\n'
        'artifacts:\n  "../100%,a:b.md": x\n',
        "pct.yaml",
    )
    result = cli("validate", "--format", "github", path)
    assert result.returncode == 2
    (line,) = result.stdout.splitlines()
    head, sep, message = line.partition("::")[2].partition("::")
    assert sep
    # properties: '%', ',' and ':' escaped, so the parser sees exactly four of them
    assert [kv.split("=", 1)[0] for kv in head.split(" ", 1)[1].split(",")] == [
        "file", "line", "col", "title",
    ]
    assert "title=storyflow $.artifacts['../100%25%2Ca%3Ab.md']" in head
    # the message: '%' escaped, ':' and ',' kept
    assert message.startswith("artifact path '../100%25,a:b.md' leaves the run folder")


def test_validate_several_files(cli: Any, valid: Path, broken: Path, write_workflow: Any) -> None:
    other = write_workflow(VALID.replace("name: tiny", "name: other"), "other.yaml")
    result = cli("validate", valid, broken, other)
    assert result.returncode == 2
    assert result.stdout == f"{valid}: valid\n{other}: valid\n"
    assert f"{broken}: 4 errors" in result.stderr
    ok = cli("validate", valid, other)
    assert ok.returncode == 0
    assert ok.stdout.count(": valid\n") == 2


def test_validate_with_env(cli: Any, valid: Path) -> None:
    assert cli("validate", "--env", "offline", valid).returncode == 0
    result = cli("validate", "--env", "ofline", valid)
    assert result.returncode == 2
    no_traceback(result)
    assert "unknown environment 'ofline'" in result.stderr
    assert "did you mean 'offline'?" in result.stderr


def test_validate_a_nonexistent_file(cli: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = cli("validate", missing)
    assert result.returncode == 2
    no_traceback(result)
    assert result.stderr.startswith(f"{missing}:1:1: error: cannot read the file")


def test_validate_a_directory(cli: Any, tmp_path: Path) -> None:
    result = cli("validate", tmp_path)
    assert result.returncode == 2
    no_traceback(result)
    assert "cannot read the file" in result.stderr


def test_validate_without_files_is_a_usage_error(cli: Any) -> None:
    result = cli("validate")
    assert result.returncode == 2
    no_traceback(result)
    assert "Missing argument" in result.stderr


def test_validate_unknown_format(cli: Any, valid: Path) -> None:
    result = cli("validate", "--format", "xml", valid)
    assert result.returncode == 2
    assert result.stderr == "error: unknown format 'xml'\n  hint: use text, json or github\n"


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"- a\n- b\n",
        b"apiVersion: storyflow/v1\nname: x\n\xff\xfe\n",
        b"apiVersion: storyflow/v1\nname: x\nsteps:\n\ta: {}\n",
        b"apiVersion: storyflow/v1\nname: x\nsteps: &s {a: {loop: {steps: *s}}}\n",
        b"{{{{",
        b"1.5: x\n~: y\n",
    ],
)
def test_validate_odd_files_without_traceback(cli: Any, write_workflow: Any, text: bytes) -> None:
    path = write_workflow(text, "odd.yaml")
    result = cli("validate", path)
    assert result.returncode == 2, result.stderr
    no_traceback(result)
    assert LOCATED.match(result.stderr.splitlines()[0])


def test_problem_order_does_not_depend_on_the_hash_seed(cli: Any, write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        agents: {w: {uses: llm}}
        steps:
          a: {agent: w, prompt: "{{ inputs.a }} {{ env.B }} {{ secrets.C }} {{ steps.d.output }}"}
        """
    )
    outputs = {
        cli("validate", path, env={"PYTHONHASHSEED": seed}).stderr for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


# --- graph and schema --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "start", "needle"),
    [
        ("mermaid", "flowchart TD\n", "  premise --> story\n"),
        ("dot", 'digraph "tiny" {\n', '  "premise" -> "story";\n'),
        ("text", "premise (template)\n", "story (template)  ← premise\n"),
    ],
)
def test_graph(cli: Any, valid: Path, fmt: str, start: str, needle: str) -> None:
    result = cli("graph", valid, "--format", fmt)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(start)
    assert needle in result.stdout


def test_graph_defaults_to_mermaid(cli: Any, valid: Path) -> None:
    assert cli("graph", valid).stdout.startswith("flowchart TD\n")


def test_graph_of_a_broken_file(cli: Any, broken: Path) -> None:
    result = cli("graph", broken)
    assert result.returncode == 2
    no_traceback(result)
    assert result.stdout == ""
    assert f"{broken}:6:14: error: unknown agent 'writr'" in result.stderr
    assert result.stderr.endswith("4 errors: the workflow is invalid\n")


def test_graph_unknown_format(cli: Any, valid: Path) -> None:
    result = cli("graph", valid, "--format", "png")
    assert result.returncode == 2
    assert "unknown format 'png'" in result.stderr


def test_graph_with_env(cli: Any, valid: Path) -> None:
    assert cli("graph", valid, "--env", "offline").returncode == 0
    result = cli("graph", valid, "--env", "nope")
    assert result.returncode == 2
    no_traceback(result)
    assert "unknown environment 'nope'" in result.stderr


def test_debug_shows_a_traceback(cli: Any, broken: Path) -> None:
    result = cli("--debug", "graph", broken)
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_schema(cli: Any) -> None:
    result = cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert result.stdout == (REPO / "schemas" / "workflow.schema.json").read_text(encoding="utf-8")


def test_unknown_schema(cli: Any) -> None:
    result = cli("schema", "nope")
    assert result.returncode == 2
    no_traceback(result)
    assert "no schema named 'nope'" in result.stderr


# --- the root command --------------------------------------------------------------------


def test_help(cli: Any) -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("validate", "graph", "schema"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), result.stdout
    assert "--version" in result.stdout


def test_no_arguments_shows_help(cli: Any) -> None:
    result = cli()
    assert result.returncode in (0, 2)
    assert "Usage:" in result.stdout + result.stderr


def test_version(cli: Any) -> None:
    from storyflow import __version__

    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"storyflow {__version__}\n"


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("storyflow")
    if not script.exists():
        pytest.skip("no storyflow console script next to this interpreter")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("storyflow ")


# --- packaging ----------------------------------------------------------------------------


def _build_wheel(out: Path) -> Path:
    """Build the wheel: in this venv when hatchling is here, else pip with build isolation."""
    if importlib.util.find_spec("hatchling") is not None:
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(out)]
    result = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        text = result.stdout + result.stderr
        if re.search(r"(?i)connection|network|resolve|index|no matching distribution", text):
            pytest.skip(f"cannot fetch the build backend: {text.strip().splitlines()[-1]}")
        pytest.fail(f"wheel build failed:\n{text}")
    (wheel,) = out.glob("storyflow-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_ships_the_schemas_and_finds_them(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "storyflow/schemas/workflow.schema.json" in names
        assert "storyflow/__main__.py" in names
        shipped = zf.read("storyflow/schemas/workflow.schema.json").decode("utf-8")
        zf.extractall(tmp_path / "site")
    assert shipped == (REPO / "schemas" / "workflow.schema.json").read_text(encoding="utf-8")
    # The unpacked wheel, first on the path, reads the schema from inside itself.
    probe = (
        "import storyflow.spec.schema as s; p = s.schema_path('workflow.schema.json');"
        "print(p); import json; json.loads(s.schema_text())"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "site" / "storyflow" / "schemas" / (
        "workflow.schema.json"
    )
