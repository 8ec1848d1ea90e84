"""Every example in workflows/ is a valid workflow, to storyflow and to the JSON Schema alone.

Running the examples is the engine's tests' job; here they must load, plan and draw.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storyflow.engine.plan import plan
from storyflow.spec import load_workflow, validate_file
from storyflow.ui.graph import render

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "workflow.schema.json"
EXAMPLES = sorted((REPO / "workflows").glob("*.yaml"))

needs_examples = pytest.mark.skipif(not EXAMPLES, reason="workflows/ holds no *.yaml yet")


def _id(path: Path) -> str:
    return path.name


@needs_examples
@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_example_validates(path: Path) -> None:
    problems = validate_file(path)
    assert not problems, "\n".join(p.format() for p in problems)


@needs_examples
@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_example_validates_in_every_environment(path: Path) -> None:
    wf = load_workflow(path)
    for env in wf.environments:
        problems = validate_file(path, environment=env)
        assert not problems, f"--env {env}:\n" + "\n".join(p.format() for p in problems)


@needs_examples
@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_example_plans_and_draws(path: Path) -> None:
    wf = load_workflow(path)
    compiled = plan(wf)
    assert len(compiled) == len(wf.steps)
    for fmt in ("mermaid", "dot", "text"):
        assert render(compiled, fmt, title=wf.name).strip()


def _check_jsonschema() -> str | None:
    """check-jsonschema next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).with_name("check-jsonschema")
    if local.exists():
        return str(local)
    return shutil.which("check-jsonschema")


@needs_examples
def test_examples_pass_check_jsonschema() -> None:
    tool = _check_jsonschema()
    if tool is None:
        pytest.skip("check-jsonschema is not installed")
    result = subprocess.run(
        [tool, "--schemafile", str(SCHEMA), *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_jsonschema_agrees_on_a_known_good_and_bad_file(tmp_path: Path) -> None:
    """The schema file works with the editor-side tool, whether or not examples exist yet."""
    tool = _check_jsonschema()
    if tool is None:
        pytest.skip("check-jsonschema is not installed")
    good = tmp_path / "good.yaml"
    good.write_text(
        "apiVersion: storyflow/v1\nname: good\nsteps:\n"
        "  a: {uses: template, with: {template: hi}}\n",
        encoding="utf-8",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("steps:", "stpes:"), encoding="utf-8")
    run = [tool, "--schemafile", str(SCHEMA)]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ko = subprocess.run([*run, str(bad)], capture_output=True, text=True, timeout=120)
    assert ko.returncode == 1, ko.stdout + ko.stderr
