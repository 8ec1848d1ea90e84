"""A source that already passed the schema is not checked again; a changed one is."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli
from storyflow.errors import WorkflowError
from storyflow.spec import load_workflow

# Valid for the semantic checks, but `colour` is not a key the schema allows.
SCHEMA_ONLY_PROBLEM = textwrap.dedent("""\
    apiVersion: storyflow/v1
    name: cached
    steps:
      a: {uses: template, with: {template: "x"}, colour: blue}
""")


def test_schema_pass_is_skipped_only_for_a_vouched_source(tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(SCHEMA_ONLY_PROBLEM)
    with pytest.raises(WorkflowError):
        load_workflow(wf)
    seen: list[str] = []

    def vouch(source_hash: str) -> bool:
        seen.append(source_hash)
        return True

    assert load_workflow(wf, known_valid=vouch).name == "cached"  # schema skipped
    with pytest.raises(WorkflowError):
        load_workflow(wf, known_valid=lambda h: False)
    # The hash covers the parameters too: --set changes what was vouched for.
    assert len(seen) == 1
    with pytest.raises(WorkflowError):
        load_workflow(wf, sets=["config.x=1"], known_valid=lambda h: h == seen[0])


def test_a_changed_file_is_validated_again(tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(SCHEMA_ONLY_PROBLEM.replace(", colour: blue", ""))
    first = run_cli("run", str(wf), "--json", state_dir=tmp_path / "state", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["status"] == "succeeded"
    again = run_cli(
        "run", str(wf), "--json", state_dir=tmp_path / "state", cwd=tmp_path
    )  # same bytes: trusted
    assert again.returncode == 0, again.stderr
    wf.write_text(SCHEMA_ONLY_PROBLEM)
    broken = run_cli("run", str(wf), state_dir=tmp_path / "state", cwd=tmp_path)
    assert broken.returncode == 2
    assert "unknown key 'colour'" in broken.stderr
