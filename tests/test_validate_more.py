"""`validate` keeps its promises: environments, templates, agent `with:` keys, foreign keys.

Driven through the real command: every environment is checked merged onto the file and
located in its overlay; every template is checked for what Jinja would refuse (unknown
filters and tests, syntax); each built-in kind's ``with:`` keys are checked where the
kind would fail on them; keys from GitHub Actions and Dagu get storyflow's word.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import WORKFLOWS
from storyflow.spec import validate_file

ENVIRONMENTS = """\
apiVersion: storyflow/v1
name: envs
environments:
  llm:
    description: the real thing
    agents:
      writer:
        uses: llm
        with: {model: gpt-4o-mini, temprature: 0.2}
        pool: nowhere
  broken:
    agents:
      writer: {uses: template, timeout: soon}
    defaults: {retry: {attempts: zero}}
  fine: {config: {model: llama3}}
pools:
  llm: {concurrency: 1}
agents:
  writer:
    uses: builtin/grammar
    with: {grammar: {origin: hi}}
    pool: llm
steps:
  a: {agent: writer, prompt: hi}
"""


def errors(result: Any) -> list[str]:
    """The first line of each problem the command printed."""
    return [line for line in result.stderr.splitlines() if ": error: " in line]


def no_traceback(result: Any) -> None:
    assert "Traceback" not in result.stderr + result.stdout


# --- 13. environments ----------------------------------------------------------------------


def test_every_environment_is_checked_where_its_overlay_is_written(
    cli: Any, write_workflow: Any
) -> None:
    path = write_workflow(ENVIRONMENTS)
    result = cli("validate", path)
    assert result.returncode == 2
    no_traceback(result)
    assert errors(result) == [
        f"{path}:9:36: error: in environment llm: with.temprature: unknown key for agent "
        "kind llm; did you mean temperature?",
        f"{path}:10:15: error: in environment llm: unknown pool 'nowhere'",
        f"{path}:13:41: error: in environment broken: 'soon' is not valid for timeout",
        f"{path}:14:34: error: in environment broken: attempts must be an integer, "
        "not a string",
        f"{path}:24:3: error: in environment broken: step 'a' (template) needs with.template",
    ]
    assert "at $.environments.llm.agents.writer.with.temprature" in result.stderr
    assert "at $.environments.broken.defaults.retry.attempts" in result.stderr
    assert f"{path}: 5 errors" in result.stderr


def test_env_option_narrows_validate_to_one_environment(cli: Any, write_workflow: Any) -> None:
    path = write_workflow(ENVIRONMENTS)
    result = cli("validate", "--env", "llm", "--format", "json", path)
    assert result.returncode == 2
    (file,) = json.loads(result.stdout)["files"]
    assert [(p["line"], p["col"], p["path"]) for p in file["problems"]] == [
        (9, 36, "$.environments.llm.agents.writer.with.temprature"),
        (10, 15, "$.environments.llm.agents.writer.pool"),
    ]
    assert all(p["message"].startswith("in environment llm: ") for p in file["problems"])
    assert cli("validate", "--env", "fine", path).returncode == 0


def test_unknown_env_is_reported_with_the_files_own_problems(
    cli: Any, write_workflow: Any
) -> None:
    path = write_workflow(ENVIRONMENTS.replace("  a: {agent: writer", "  a: {agent: writr"))
    result = cli("validate", "--env", "fin", path)
    assert result.returncode == 2
    no_traceback(result)
    assert errors(result) == [
        f"{path}:3:1: error: unknown environment 'fin'",
        f"{path}:24:14: error: unknown agent 'writr'",
    ]
    assert "hint: did you mean 'fine'?" in result.stderr


def test_a_problem_of_the_file_is_not_reported_again_per_environment(
    cli: Any, write_workflow: Any
) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        environments:
          one: {config: {model: a}}
          two: {pools: {llm: {concurrency: 2}}}
        pools:
          llm: {concurrency: 1}
        steps:
          a: {uses: template, with: {template: hi}, pool: nowhere}
          b: {uses: template, with: {template: "{{ steps.zz.output }}"}}
        """
    )
    result = cli("validate", path)
    assert result.returncode == 2
    assert errors(result) == [
        f"{path}:9:51: error: unknown pool 'nowhere'",
        f"{path}:10:40: error: unknown step 'zz'",
    ]


def test_an_overlay_value_inside_a_replaced_list_is_located(
    cli: Any, write_workflow: Any
) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        environments:
          strict:
            agents:
              writer:
                secrets: [OK_KEY, not-a-name]
                fallback: missing
        agents:
          writer: {uses: llm, with: {model: m}}
        steps:
          a: {agent: writer, prompt: hi}
        """
    )
    result = cli("validate", path)
    assert errors(result) == [
        f"{path}:7:27: error: in environment strict: 'not-a-name' is not valid for item 1 "
        "of secrets",
        f"{path}:8:19: error: in environment strict: unknown fallback agent 'missing'",
    ]


def test_run_with_a_broken_env_points_at_the_overlay(cli: Any, write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        environments:
          broken: {agents: {writer: {pool: nowhere}}}
        agents:
          writer: {uses: builtin/grammar}
        steps:
          a: {agent: writer, prompt: x}
        """
    )
    result = cli("run", "--env", "broken", path)
    assert result.returncode == 2
    no_traceback(result)
    assert errors(result) == [
        f"{path}:4:36: error: after --env broken: unknown pool 'nowhere'",
    ]
    assert "at $.environments.broken.agents.writer.pool" in result.stderr


def test_the_example_workflows_validate_in_every_environment(cli: Any) -> None:
    files = sorted(WORKFLOWS.glob("*.yaml"))
    result = cli("validate", *files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": valid\n") == len(files)


OVERLAY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(
        ["llm", "template", "builtin/grammar", "nowhere", "5m", "soon", "{{ x | uper }}",
         "{{ config.model }}", "writer", "{% for %}"]
    ),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(
        st.sampled_from(["uses", "with", "pool", "timeout", "fallback", "model", "template",
                         "writer", "llm", "retry", "attempts", "concurrency", "secrets"]),
        inner, max_size=3,
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    overlay=st.dictionaries(
        st.sampled_from(["config", "agents", "pools", "defaults", "executor", "description",
                         "steps", "name"]),
        OVERLAY_VALUES, max_size=3,
    )
)
def test_any_overlay_gives_located_problems_not_exceptions(
    tmp_path: Path, overlay: dict[str, Any]
) -> None:
    data = {
        "apiVersion": "storyflow/v1", "name": "x",
        "environments": {"e": overlay},
        "pools": {"llm": {"concurrency": 1}},
        "agents": {"writer": {"uses": "llm", "with": {"model": "m"}, "pool": "llm"}},
        "steps": {"a": {"agent": "writer", "prompt": "hi"}},
    }
    path = tmp_path / "fuzz.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    for p in validate_file(path, every_environment=True):
        assert p.line >= 1 and p.col >= 1 and p.path.startswith("$")
        # The overlay's own shape is the file's problem; the merge's names the environment.
        assert p.message.startswith("in environment e: ") or p.path.startswith(
            "$.environments.e"), p.format()


# --- 14. templates and `with:` keys --------------------------------------------------------


def test_templates_are_checked_for_what_would_fail_at_run_time(
    cli: Any, write_workflow: Any
) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        inputs:
          n: {type: integer, default: 2}
        steps:
          a: {uses: template, with: {template: "{{ 1 | nosuchfilter }}"}}
          b:
            uses: template
            with:
              template: |
                Title
                {{ inputs.n | uper }}
                {% for loop in [1] %}{{ loop }}{% endfor %}
          c: {uses: template, with: {template: ok}, when: "inputs.n is nosuchtest"}
          d: {uses: template, with: {template: "{{ inputs.n | tojson | wordcount | upper }}"}}
          e: {uses: template, with: {template: "{% if x %}"}}
        """
    )
    result = cli("validate", path)
    assert result.returncode == 2
    no_traceback(result)
    assert errors(result) == [
        f"{path}:6:40: error: template uses an unknown filter 'nosuchfilter'",
        f"{path}:12:1: error: template uses an unknown filter 'uper' (template line 2)",
        f"{path}:13:1: error: template assigns to `loop` in a {{% for %}} (template line 3)",
        f"{path}:14:51: error: template uses an unknown test 'nosuchtest'",
        f"{path}:16:40: error: template syntax error: Unexpected end of template. Jinja was "
        "looking for the following tags: 'elif' or 'else' or 'endif'. The innermost block "
        "that needs to be closed is 'if'.",
    ]
    assert "hint: did you mean 'upper'?" in result.stderr
    assert "hint: use a Jinja built-in filter, or storyflow's tojson, fromjson, wordcount" in (
        result.stderr
    )


def test_a_misspelt_required_key_is_named_at_the_key(cli: Any, write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        agents:
          asker: {uses: human, with: {questoin: "Go on?"}}
        steps:
          a: {uses: template, with: {tempalte: x}}
          b: {uses: command, with: {rnu: [echo, hi]}}
          c: {agent: asker}
          d: {uses: workflow, with: {pth: child.yaml}}
          e: {uses: template, with: {}}
        """
    )
    result = cli("validate", path)
    assert result.returncode == 2
    assert errors(result) == [
        f"{path}:4:31: error: with.questoin: unknown key for agent kind human; "
        "did you mean question?",
        f"{path}:6:30: error: with.tempalte: unknown key for agent kind template; "
        "did you mean template?",
        f"{path}:7:29: error: with.rnu: unknown key for agent kind command; did you mean run?",
        f"{path}:9:30: error: with.pth: unknown key for agent kind workflow; "
        "did you mean path?",
        f"{path}:10:3: error: step 'e' (template) needs with.template",
    ]
    assert "hint: rename it: the template kind needs with.template" in result.stderr


def test_llm_keys_are_checked_as_the_agent_checks_them(cli: Any, write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        agents:
          writer:
            uses: llm
            with: {model: m, temprature: 0.2, api_key: "x", grammar: g.yaml, vars: {}}
          offline: {uses: builtin/grammar, with: {model: m, anything: 1}}
          fn: {uses: python, with: {callable: "m:f", any_kwarg: 1}}
        steps:
          a: {agent: writer, prompt: hi, with: {max_tokens: 9, streem: true}}
          b: {agent: offline, prompt: hi}
          c: {agent: fn}
          d: {uses: command, with: {run: [echo], stdn: ignored}}
        """
    )
    result = cli("validate", path)
    assert result.returncode == 2
    assert errors(result) == [
        f"{path}:6:22: error: with.temprature: unknown key for agent kind llm; "
        "did you mean temperature?",
        f"{path}:6:39: error: with.api_key: unknown key for agent kind llm; "
        "did you mean api_key_secret?",
        f"{path}:10:56: error: with.streem: unknown key for agent kind llm; "
        "did you mean stream?",
    ]
    assert "hint: other request fields go in `with.params`" in result.stderr
    assert "hint: the key comes only from the agent's secrets" in result.stderr


def test_a_strict_fallback_gets_the_steps_own_keys(cli: Any, write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        agents:
          offline: {uses: builtin/grammar, fallback: remote}
          remote: {uses: llm, with: {model: m}}
        steps:
          a: {agent: offline, prompt: hi, with: {vars: {x: 1}, flavour: dark}}
        """
    )
    result = cli("validate", path)
    assert errors(result) == [
        f"{path}:7:56: error: with.flavour: unknown key for agent kind llm "
        "(the kind of fallback agent 'remote')",
    ]


def test_an_environment_may_switch_kinds_without_key_errors(
    cli: Any, write_workflow: Any
) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        environments:
          llm: {agents: {writer: {uses: llm, with: {model: m, temperature: 0.5}}}}
          tpl: {agents: {writer: {uses: template, with: {tempalte: "x"}}}}
        agents:
          writer: {uses: builtin/grammar, with: {grammar: {origin: hi}, start: origin}}
        steps:
          a: {agent: writer, prompt: hi}
        """
    )
    result = cli("validate", path)
    assert errors(result) == [
        f"{path}:5:50: error: in environment tpl: with.tempalte: unknown key for agent "
        "kind template; did you mean template?",
    ]
    assert cli("validate", "--env", "llm", path).returncode == 0


def test_the_with_key_table_matches_the_agents() -> None:
    from storyflow.agents.command_agent import CommandAgent
    from storyflow.agents.grammar_agent import GrammarAgent
    from storyflow.agents.llm_agent import _request
    from storyflow.agents.python_agent import PythonAgent
    from storyflow.agents.template_agent import TemplateAgent
    from storyflow.engine.human import HumanAgent
    from storyflow.engine.subrun import WorkflowAgent
    from storyflow.spec.kinds import BUILTIN_KINDS, GRAMMAR_KEYS, LLM_KEYS, WITH_KEYS

    assert LLM_KEYS == _request.KEYS
    assert GRAMMAR_KEYS == _request.OFFLINE_KEYS
    agents: list[Any] = [PythonAgent, CommandAgent, TemplateAgent, WorkflowAgent, HumanAgent,
                         GrammarAgent]
    for agent in agents:
        assert BUILTIN_KINDS[agent.kind] == agent.required
        if agent.kind in WITH_KEYS:
            assert set(agent.required) <= WITH_KEYS[agent.kind].reads


# --- 15. keys from GitHub Actions and Dagu -------------------------------------------------


@pytest.mark.parametrize(
    ("line", "word", "ours", "origin"),
    [
        ("if: inputs.go", "if", "when", "GitHub Actions' `if:`"),
        ("continue-on-error: true", "continue-on-error", "allow_failure",
         "GitHub Actions' `continue-on-error:`"),
        ("depends: [b]", "depends", "needs", "Dagu's `depends:`"),
        ("strategy: {matrix: {x: [1]}}", "strategy", "for_each",
         "GitHub Actions' `strategy: {matrix: …}`"),
        ("matrix: [1, 2]", "matrix", "for_each", "GitHub Actions' `matrix:`"),
        ("timeout-minutes: 10", "timeout-minutes", "timeout",
         "GitHub Actions' `timeout-minutes:`"),
        ("retryPolicy: {limit: 3}", "retryPolicy", "retry", "Dagu's `retryPolicy:`"),
    ],
)
def test_foreign_keys_get_storyflows_word(
    write_workflow: Any, line: str, word: str, ours: str, origin: str
) -> None:
    path = write_workflow(
        "apiVersion: storyflow/v1\nname: x\nsteps:\n"
        "  a:\n    uses: template\n    with: {template: hi}\n"
        f"    {line}\n"
        "  b: {uses: template, with: {template: hi}}\n"
    )
    (p,) = validate_file(path)
    assert (p.line, p.col, p.path) == (7, 5, f"$.steps.a.{word}")
    assert p.message == (
        f"unknown key {word!r} in step 'a'; storyflow writes it `{ours}:` ({origin})"
    )
    assert p.hint


def test_foreign_keys_through_the_command(cli: Any, write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        timeout-minutes: 30
        steps:
          a: {uses: template, with: {template: hi}, if: "inputs.x", continueOn: {failure: true}}
        """
    )
    result = cli("validate", path)
    assert result.returncode == 2
    no_traceback(result)
    assert errors(result) == [
        f"{path}:3:1: error: unknown key 'timeout-minutes' in the workflow; storyflow writes "
        "it `timeout:` (GitHub Actions' `timeout-minutes:`)",
        f"{path}:5:45: error: unknown key 'if' in step 'a'; storyflow writes it `when:` "
        "(GitHub Actions' `if:`)",
        f"{path}:5:61: error: unknown key 'continueOn' in step 'a'; storyflow writes it "
        "`allow_failure:` (Dagu's `continueOn:`)",
    ]
    assert "hint: timeout: 30m (a duration with its unit: 30s, 10m, 1h)" in result.stderr


def test_an_artifact_cannot_overwrite_the_event_log(cli: Any, write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: hi}}
        artifacts:
          events.jsonl: "{{ steps.a.output }}"
        """
    )
    result = cli("validate", path)
    assert result.returncode == 2
    assert "artifact 'events.jsonl' would overwrite the run's event log" in result.stderr
