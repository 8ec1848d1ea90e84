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


class DictParsed:
    """A `storyflow.spec.ParsedCache` in a dict, counting hits."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, object]] = {}
        self.hits = 0

    def get(self, path: str, text_hash: str) -> object:
        entry = self.entries.get(path)
        if entry is not None and entry[0] == text_hash:
            self.hits += 1
            return entry[1]
        return None

    def put(self, path: str, text_hash: str, data: object) -> None:
        self.entries[path] = (text_hash, data)


def test_an_unchanged_file_is_not_parsed_again(tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: parsed
        steps:
          a: {uses: template, with: {template: "x"}}
          b: {uses: template, with: {template: "{{ steps.a.output }}"}}
    """))
    cache = DictParsed()
    first = load_workflow(wf, parsed=cache)
    assert cache.hits == 0 and len(cache.entries) == 1
    remembered = cache.entries[str(wf)][0]
    again = load_workflow(wf, parsed=cache)
    assert cache.hits == 1
    assert again.steps == first.steps
    # An edited file is parsed again, and its problems still point at the right line.
    wf.write_text(wf.read_text().replace("b: {uses: template", "b: {uses: tempalte"))
    with pytest.raises(WorkflowError) as info:
        load_workflow(wf, parsed=cache)
    assert info.value.problems[0].line == 5
    assert cache.hits == 1
    assert cache.entries[str(wf)][0] == remembered  # the invalid text was not remembered
    with pytest.raises(WorkflowError):
        load_workflow(wf, parsed=cache)
    assert cache.hits == 1


def test_cached_data_still_gets_positions_for_new_problems(tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: parsed
        steps:
          a: {uses: template, with: {template: "x"}}
          b: {uses: mykind}
    """))
    cache = DictParsed()
    kinds = {"template": ("template",), "mykind": ()}
    load_workflow(wf, parsed=cache, kinds=kinds)
    # The plugin that provided `mykind` is gone: the problem is found on cached data.
    with pytest.raises(WorkflowError) as info:
        load_workflow(wf, parsed=cache, kinds={"template": ("template",)})
    assert cache.hits == 1
    problem = info.value.problems[0]
    assert (problem.line, "mykind" in problem.message) == (5, True)
