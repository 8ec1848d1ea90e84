"""Run inputs: defaults, `-i key=value` coercion, `--inputs FILE`, precedence, and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from storyflow.errors import InputError
from storyflow.spec import Workflow, load_workflow
from storyflow.spec.params import resolve_inputs

INPUTS = """\
    apiVersion: storyflow/v1
    name: inputs
    inputs:
      premise: {type: string, default: "A lighthouse keeper finds a map"}
      sections: {type: integer, default: 4, minimum: 1, maximum: 12}
      temperature: {type: number, default: 0.7, minimum: 0, maximum: 2}
      draft: {type: boolean, default: false}
      tags: {type: array, items: {type: string}, default: []}
      meta: {type: object, default: {}}
      tone: {type: string, enum: [dark, light], default: dark, description: "dark or light"}
      anything: {default: null}
    steps:
      echo: {uses: template, with: {template: "{{ inputs }}"}}
"""


@pytest.fixture
def wf(write_workflow: Any) -> Workflow:
    return load_workflow(write_workflow(INPUTS))


@pytest.fixture
def required_wf(write_workflow: Any) -> Workflow:
    return load_workflow(
        write_workflow(
            """\
            apiVersion: storyflow/v1
            name: required
            inputs:
              premise: {type: string}
              sections: {type: integer, default: 3}
            steps:
              echo: {uses: template, with: {template: "{{ inputs.premise }}"}}
            """
        )
    )


DEFAULTS = {
    "premise": "A lighthouse keeper finds a map",
    "sections": 4,
    "temperature": 0.7,
    "draft": False,
    "tags": [],
    "meta": {},
    "tone": "dark",
    "anything": None,
}


def test_defaults(wf: Workflow) -> None:
    assert resolve_inputs(wf) == DEFAULTS


def test_no_inputs_declared(write_workflow: Any) -> None:
    wf = load_workflow(
        write_workflow(
            "apiVersion: storyflow/v1\nname: x\nsteps:\n"
            "  a: {uses: template, with: {template: x}}\n"
        )
    )
    assert resolve_inputs(wf) == {}
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, ["x=1"])
    assert info.value.hint == "this workflow declares no inputs"


@pytest.mark.parametrize(
    ("pair", "name", "value"),
    [
        ("sections=7", "sections", 7),
        ("sections= 9 ", "sections", 9),
        ("temperature=1.25", "temperature", 1.25),
        ("temperature=1", "temperature", 1),
        ("draft=true", "draft", True),
        ("draft=yes", "draft", True),
        ("draft=off", "draft", False),
        ("draft=0", "draft", False),
        ('tags=["a", "b"]', "tags", ["a", "b"]),
        ('meta={"k": 1, "nested": [true, null]}', "meta", {"k": 1, "nested": [True, None]}),
        # a string input takes the text as it is: no YAML typing, spaces and '=' kept
        ("premise=  42 = answer ", "premise", "  42 = answer "),
        ("premise=true", "premise", "true"),
        ("premise=", "premise", ""),
        # no declared type: the value is read as YAML
        ("anything=[1, two]", "anything", [1, "two"]),
        ("anything=3", "anything", 3),
        ("anything=hello", "anything", "hello"),
    ],
)
def test_i_values_are_coerced_by_type(wf: Workflow, pair: str, name: str, value: Any) -> None:
    got = resolve_inputs(wf, [pair])[name]
    assert got == value
    assert type(got) is type(value)


def test_inputs_file_json(wf: Workflow, tmp_path: Path) -> None:
    f = tmp_path / "in.json"
    f.write_text(json.dumps({"premise": "A storm", "sections": 2, "tags": ["x"]}))
    got = resolve_inputs(wf, inputs_file=f)
    assert got == {**DEFAULTS, "premise": "A storm", "sections": 2, "tags": ["x"]}


def test_inputs_file_yaml(wf: Workflow, tmp_path: Path) -> None:
    f = tmp_path / "in.yaml"
    f.write_text("premise: A storm\nmeta: {a: [1, 2]}\ndraft: true\n")
    got = resolve_inputs(wf, inputs_file=f)
    assert got == {**DEFAULTS, "premise": "A storm", "meta": {"a": [1, 2]}, "draft": True}


def test_precedence_file_then_given_then_i(wf: Workflow, tmp_path: Path) -> None:
    f = tmp_path / "in.json"
    f.write_text(json.dumps({"premise": "from file", "sections": 2, "tone": "light"}))
    got = resolve_inputs(
        wf,
        ["sections=9"],
        inputs_file=f,
        given={"premise": "given", "sections": 5},
    )
    assert got["premise"] == "given"
    assert got["sections"] == 9
    assert got["tone"] == "light"
    assert got["draft"] is False


def test_later_i_wins(wf: Workflow) -> None:
    assert resolve_inputs(wf, ["sections=2", "sections=3"])["sections"] == 3


def test_unknown_input_suggests_the_nearest(wf: Workflow) -> None:
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, ["sectoins=3"])
    assert info.value.message == "-i: unknown input 'sectoins'"
    assert info.value.hint == "did you mean 'sections'?"
    assert info.value.exit_code == 2


def test_unknown_input_in_a_file_names_the_file(wf: Workflow, tmp_path: Path) -> None:
    f = tmp_path / "in.json"
    f.write_text('{"premis": "x"}')
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, inputs_file=f)
    assert str(f) in info.value.message
    assert info.value.hint == "did you mean 'premise'?"


def test_required_input_missing(required_wf: Workflow) -> None:
    with pytest.raises(InputError) as info:
        resolve_inputs(required_wf)
    assert info.value.message == "input 'premise' is required"
    assert info.value.hint == "pass it with -i premise=VALUE"
    assert resolve_inputs(required_wf, ["premise=x"]) == {"premise": "x", "sections": 3}


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("sections=0", "input 'sections': 0 is less than the minimum of 1"),
        ("sections=13", "input 'sections': 13 is greater than the maximum of 12"),
        ("temperature=2.5", "input 'temperature': 2.5 is greater than the maximum of 2"),
        ("tone=grey", "input 'tone': 'grey' is not one of ['dark', 'light']"),
        ('tags=["a", 1]', "input 'tags[1]': 1 is not of type 'string'"),
        ('tags={"a": 1}', "input 'tags': {'a': 1} is not of type 'array'"),
        ("meta=[1]", "input 'meta': [1] is not of type 'object'"),
    ],
)
def test_values_violating_the_schema(wf: Workflow, pair: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, [pair])
    assert info.value.message == message
    assert info.value.hint


def test_schema_description_is_the_hint(wf: Workflow) -> None:
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, ["tone=grey"])
    assert info.value.hint == "dark or light"


@pytest.mark.parametrize(
    ("pair", "message", "hint"),
    [
        ("sections=four", "input 'sections': 'four' is not an integer", "-i sections=4"),
        ("sections=4.5", "input 'sections': '4.5' is not an integer", "-i sections=4"),
        ("temperature=warm", "input 'temperature': 'warm' is not a number", "-i temperature=0.5"),
        ("draft=maybe", "input 'draft': 'maybe' is not true or false", "-i draft=true"),
        ("tags=a,b", "input 'tags': 'a,b' is not a JSON list", "-i tags="),
        ("meta={k: 1}", "input 'meta': '{k: 1}' is not a JSON object", "-i meta="),
    ],
)
def test_values_that_cannot_be_coerced(wf: Workflow, pair: str, message: str, hint: str) -> None:
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, [pair])
    assert info.value.message == message
    assert info.value.hint is not None and hint in info.value.hint


def test_file_values_are_checked_too(wf: Workflow, tmp_path: Path) -> None:
    f = tmp_path / "in.json"
    f.write_text('{"sections": "4"}')  # a file is typed: no coercion
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, inputs_file=f)
    assert info.value.message == "input 'sections': '4' is not of type 'integer'"


@pytest.mark.parametrize("pair", ["premise", "=x", " =x"])
def test_malformed_pair(wf: Workflow, pair: str) -> None:
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, [pair])
    assert "is not key=value" in info.value.message


def test_inputs_file_that_is_not_a_mapping(wf: Workflow, tmp_path: Path) -> None:
    f = tmp_path / "in.json"
    f.write_text("[1, 2]")
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, inputs_file=f)
    assert "expected a mapping" in info.value.message


def test_inputs_file_with_a_syntax_error_names_line_and_col(
    wf: Workflow, tmp_path: Path
) -> None:
    f = tmp_path / "in.yaml"
    f.write_text('premise: "ok"\nsections: [1,\n')
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, inputs_file=f)
    assert info.value.message.startswith(f"{f}:3:1: YAML syntax error")


def test_missing_inputs_file(wf: Workflow, tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        resolve_inputs(wf, inputs_file=tmp_path / "nope.json")
    assert "cannot read" in info.value.message


def test_invalid_input_schema_is_a_validation_problem(write_workflow: Any) -> None:
    from storyflow.spec import validate_file

    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        inputs:
          a: {type: strng}
          b: {type: integer, default: four}
        steps:
          echo: {uses: template, with: {template: "{{ inputs.a }} {{ inputs.b }}"}}
        """
    )
    problems = validate_file(path)
    assert [(p.line, p.col, p.path) for p in problems] == [
        (4, 13, "$.inputs.a.type"),
        (5, 31, "$.inputs.b.default"),
    ]
    assert problems[0].message.startswith("input 'a' is not a valid JSON Schema")
    assert problems[1].message == (
        "the default of input 'b' does not match its schema: 'four' is not of type 'integer'"
    )
