"""`storyflow init`: every template writes a project that runs, and nothing is overwritten.

The templates are the example workflows, shipped inside the wheel; a project gets its
README and the workflow schema its files' `yaml-language-server` line points at.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, SCHEMAS, WORKFLOWS, run_cli
from storyflow import scaffold
from test_cli_spec import _build_wheel

MAIN = {"short-story": "short-story.yaml", "novella": "novella.yaml", "batch": "batch.yaml",
        "blank": "workflow.yaml"}
FAST_INPUTS = {"novella": ("-i", "chapters=3")}
"""Inputs that keep a template's first run short."""


def init(tmp_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = run_cli("init", *args, state_dir=tmp_path / "state", cwd=cwd or tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def written(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.removeprefix("wrote ") for line in result.stdout.splitlines()
            if line.startswith("wrote ")]


def test_every_template_is_listed() -> None:
    assert sorted(scaffold.TEMPLATES) == sorted(MAIN)
    assert scaffold.DEFAULT_TEMPLATE == "short-story"


@pytest.mark.parametrize("template", sorted(MAIN))
def test_a_template_writes_a_project_that_runs(tmp_path: Path, template: str) -> None:
    result = init(tmp_path, "book", "--template", template)
    assert result.returncode == 0, result.stderr
    main = Path("book") / MAIN[template]
    assert result.stdout.splitlines()[-1] == f"next: storyflow run {main}"
    project = tmp_path / "book"
    files = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    assert {Path(w).relative_to("book").as_posix() for w in written(result)} == files
    assert {"README.md", MAIN[template], "workflow.schema.json"} <= files
    assert f"storyflow run {MAIN[template]}" in (project / "README.md").read_text()
    assert (project / "workflow.schema.json").read_bytes() == (
        SCHEMAS / "workflow.schema.json"
    ).read_bytes()
    for name in files:
        if name.endswith(".yaml") and "/" not in name:  # the workflows, not the grammars
            first = (project / name).read_text(encoding="utf-8").splitlines()[0]
            assert first == "# yaml-language-server: $schema=workflow.schema.json"
            if name != MAIN[template] or template != "blank":
                original = (WORKFLOWS / name).read_text(encoding="utf-8").splitlines()
                assert (project / name).read_text(encoding="utf-8").splitlines()[1:] == \
                    original[1:]

    validate = run_cli("validate", *sorted(project.glob("*.yaml")),
                       state_dir=tmp_path / "state", cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr
    # The project runs from anywhere: grammars and helpers are found next to it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = run_cli("run", project / MAIN[template], "--json", *FAST_INPUTS.get(template, ()),
                  state_dir=tmp_path / "state", cwd=elsewhere)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    summary = json.loads(ran.stdout.splitlines()[-1])
    assert summary["status"] == "succeeded"


def test_the_defaults_are_the_current_folder_and_the_short_story(tmp_path: Path) -> None:
    result = init(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote short-story.yaml" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1] == "next: storyflow run short-story.yaml"
    assert (tmp_path / "grammars" / "writer.yaml").is_file()


def test_existing_files_are_not_overwritten_without_force(tmp_path: Path) -> None:
    assert init(tmp_path, "proj", "-t", "blank").returncode == 0
    workflow = tmp_path / "proj" / "workflow.yaml"
    workflow.write_text("mine\n", encoding="utf-8")
    (tmp_path / "proj" / "README.md").unlink()

    again = init(tmp_path, "proj", "-t", "blank")
    assert again.returncode == 2
    assert "not overwriting existing files" in again.stderr
    assert str(Path("proj") / "workflow.yaml") in again.stderr
    assert "--force" in again.stderr
    assert workflow.read_text(encoding="utf-8") == "mine\n"
    assert not (tmp_path / "proj" / "README.md").exists()  # all or nothing

    forced = init(tmp_path, "proj", "-t", "blank", "--force")
    assert forced.returncode == 0, forced.stderr
    assert workflow.read_text(encoding="utf-8").startswith("# yaml-language-server")
    assert (tmp_path / "proj" / "README.md").is_file()


def test_an_unknown_template_is_a_usage_error_with_a_suggestion(tmp_path: Path) -> None:
    result = init(tmp_path, "proj", "--template", "novela")
    assert result.returncode == 2
    assert "unknown template 'novela'" in result.stderr
    assert "did you mean 'novella'?" in result.stderr
    assert not (tmp_path / "proj").exists()
    listing = init(tmp_path, "proj", "--template", "epic")
    assert listing.returncode == 2
    assert "batch, blank, novella, short-story" in listing.stderr


def test_a_file_in_the_way_of_the_folder_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x", encoding="utf-8")
    result = init(tmp_path, "taken")
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_the_blank_workflow_is_named_after_its_folder(tmp_path: Path) -> None:
    assert init(tmp_path, "My Book!", "-t", "blank").returncode == 0
    text = (tmp_path / "My Book!" / "workflow.yaml").read_text(encoding="utf-8")
    assert "\nname: my-book\n" in text
    assert scaffold.project_name(Path("/")) == "my-story"


def test_help_lists_init(tmp_path: Path) -> None:
    result = run_cli("--help", state_dir=tmp_path / "state")
    assert result.returncode == 0 and "init" in result.stdout
    usage = run_cli("init", "--help", state_dir=tmp_path / "state")
    assert "short-story, novella, batch or blank" in usage.stdout


@pytest.mark.slow
def test_the_wheel_ships_the_templates(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    shipped = {n for n in names if n.startswith("storyflow/workflows/")}
    for template in scaffold.TEMPLATES.values():
        assert {f"storyflow/workflows/{rel}" for rel in template.files} <= shipped
    # Unpacked and first on the path, storyflow reads the templates from inside itself.
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin",
           "STORYFLOW_STATE_DIR": str(tmp_path / "state")}
    probe = subprocess.run(
        [sys.executable, "-c", "from storyflow import scaffold; print(scaffold.examples_dir())"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == tmp_path / "site" / "storyflow" / "workflows"
    result = subprocess.run(
        [sys.executable, "-m", "storyflow", "init", "proj", "-t", "batch"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "proj" / "storylib.py").read_bytes() == (
        REPO / "workflows" / "storylib.py"
    ).read_bytes()
