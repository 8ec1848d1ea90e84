"""Loading a workflow file: the typed model it builds, and every problem it reports.

Each error case pins the exact line and column a user would be sent to, and the hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storyflow.errors import InputError, Problem, WorkflowError
from storyflow.spec import (
    Budget,
    Pool,
    RetryPolicy,
    Step,
    Workflow,
    load_workflow,
    validate_file,
)

FULL = """\
    apiVersion: storyflow/v1
    name: short-story
    version: 3
    description: Plan, draft and edit a short story.
    inputs:
      premise: {type: string, default: "A lighthouse keeper finds a map"}
      sections: {type: integer, default: 4, minimum: 1, maximum: 12}
    config: {model: gpt-4o-mini, temperature: 0.8, style: {voice: first}}
    env: [STORY_LANG]
    environments:
      offline:
        description: No API key needed.
        agents:
          writer: {uses: builtin/grammar, with: {grammar: grammars/writer.yaml}}
        config: {temperature: 0.1, style: {tense: past}}
        pools: {llm: {concurrency: 8}}
        defaults: {timeout: 30s}
      local: {config: {model: llama3}}
    defaults:
      timeout: 5m
      pool: cpu
      retry: {attempts: 3, delay: 2s, backoff: exponential, max_delay: 1m, jitter: true}
    pools:
      llm: {concurrency: 4, rate: 60/min}
      cpu: {concurrency: 2}
    agents:
      writer:
        uses: llm
        with: {model: "{{ config.model }}", system: "You are a novelist.", temperature: 0.9}
        pool: llm
        secrets: [OPENAI_API_KEY]
        breaker: {failures: 5, cooldown: 30s}
        fallback: offline-writer
        retry: {attempts: 2, delay: 500ms}
        timeout: 120
      editor: {uses: llm, with: {model: "{{ config.model }}"}}
      offline-writer: {uses: builtin/grammar, with: {grammar: grammars/writer.yaml}}
    steps:
      premise:
        agent: writer
        prompt: "Expand: {{ inputs.premise }} in {{ env.STORY_LANG }}"
      characters:
        agent: writer
        prompt: "Characters for {{ steps.premise.output }}"
        with: {temperature: 0.2, max_tokens: 500}
        retry: {attempts: 5, backoff: linear}
        timeout: 10m
      setting: {agent: writer, prompt: "Setting for {{ steps.premise.output }}", pool: cpu}
      plot:
        uses: python
        with: {callable: "agents:outline", premise: "{{ steps.premise.output }}"}
        needs: [characters, setting]
        output_schema: {type: object, required: [sections]}
        cache: true
      draft:
        for_each: steps.plot.output.sections
        as: section
        max_parallel: 3
        agent: writer
        prompt: "Write {{ section.title }} ({{ index }}) after {{ previous }}"
      blurbs:
        for_each: [back cover, catalogue]
        uses: template
        with: {template: "{{ item }}: {{ steps.premise.output }}"}
        when: inputs.sections > 2
      polish:
        needs: draft
        loop:
          max_iterations: 4
          until: steps.critique.output.score >= 8
          best_by: steps.critique.output.score
          on_exhausted: fail
          steps:
            critique:
              agent: editor
              prompt: "Score {{ steps.draft.output }} (round {{ loop.iteration }})"
            revise: {agent: writer, prompt: "Revise: {{ steps.critique.output.notes }}"}
      assemble:
        uses: template
        with: {template: "{{ steps.polish.output.revise }}"}
        needs: [blurbs]
        join: all_done
        allow_failure: true
    outputs:
      story: "{{ steps.assemble.output }}"
    artifacts:
      story.md: "{{ steps.assemble.output }}"
    timeout: 2h
    budget: {tokens: 500000, cost: 5}
    seed: 42
"""


@pytest.fixture
def full(write_workflow: Any) -> Path:
    path: Path = write_workflow(FULL)
    return path


def load_problems(write_workflow: Any, text: str | bytes) -> list[Problem]:
    path = write_workflow(text)
    problems = validate_file(path)
    assert problems, "the workflow unexpectedly validated"
    for p in problems:
        assert p.file == str(path)
    return problems


def where(problems: list[Problem]) -> list[tuple[int, int, str]]:
    return [(p.line, p.col, p.message) for p in problems]


def only(problems: list[Problem], fragment: str) -> Problem:
    found = [p for p in problems if fragment in p.message]
    assert len(found) == 1, (fragment, where(problems))
    return found[0]


# --- the typed model -------------------------------------------------------------------


def test_full_workflow_builds_the_typed_model(full: Path) -> None:
    wf = load_workflow(full)
    assert isinstance(wf, Workflow)
    assert wf.name == "short-story"
    assert wf.path == str(full)
    assert wf.api_version == "storyflow/v1"
    assert wf.version == "3"
    assert wf.description == "Plan, draft and edit a short story."
    assert wf.inputs["sections"] == {"type": "integer", "default": 4, "minimum": 1, "maximum": 12}
    assert wf.config["model"] == "gpt-4o-mini"
    assert wf.env == ("STORY_LANG",)
    assert wf.environments == ("offline", "local")
    assert wf.environment is None
    assert wf.timeout_s == 7200.0
    assert wf.budget == Budget(tokens=500000, cost=5)
    assert wf.seed == 42
    assert wf.outputs == {"story": "{{ steps.assemble.output }}"}
    assert wf.artifacts == {"story.md": "{{ steps.assemble.output }}"}
    assert [s.id for s in wf.steps] == [
        "premise", "characters", "setting", "plot", "draft", "blurbs", "polish", "assemble",
    ]
    assert len(wf.source_hash) == 16


def test_pools_and_agents(full: Path) -> None:
    wf = load_workflow(full)
    assert wf.pools["llm"] == Pool(name="llm", concurrency=4, rate_per_s=1.0, rate_text="60/min")
    assert wf.pools["cpu"] == Pool(name="cpu", concurrency=2)
    writer = wf.agents["writer"]
    assert writer.uses == "llm"
    assert writer.secrets == ("OPENAI_API_KEY",)
    assert writer.breaker is not None and writer.breaker.cooldown_s == 30.0
    assert writer.fallback == "offline-writer"
    assert writer.timeout_s == 120.0
    assert wf.agents["offline-writer"].uses == "builtin/grammar"


def test_retry_precedence_is_defaults_then_agent_then_step(full: Path) -> None:
    wf = load_workflow(full)
    # plot names no agent: the defaults alone.
    assert wf.step("plot").retry == RetryPolicy(
        attempts=3, delay_s=2.0, backoff="exponential", max_delay_s=60.0, jitter=True
    )
    # premise: the writer agent overrides attempts and delay, the rest from defaults.
    assert wf.step("premise").retry == RetryPolicy(
        attempts=2, delay_s=0.5, backoff="exponential", max_delay_s=60.0, jitter=True
    )
    # characters: its own retry wins key by key over the agent's and the defaults.
    assert wf.step("characters").retry == RetryPolicy(
        attempts=5, delay_s=0.5, backoff="linear", max_delay_s=60.0, jitter=True
    )
    assert wf.step("characters").retry.on == ("transient", "timeout", "invalid_output")


def test_step_with_merges_over_agent_with(full: Path) -> None:
    wf = load_workflow(full)
    assert wf.step("characters").with_ == {
        "model": "{{ config.model }}",
        "system": "You are a novelist.",
        "temperature": 0.2,
        "max_tokens": 500,
    }
    assert wf.step("premise").with_["temperature"] == 0.9
    assert wf.step("premise").prompt == "Expand: {{ inputs.premise }} in {{ env.STORY_LANG }}"
    # The agent's own mapping is untouched by the merge.
    assert wf.agents["writer"].with_["temperature"] == 0.9


def test_uses_agent_and_kind(full: Path) -> None:
    wf = load_workflow(full)
    premise = wf.step("premise")
    assert (premise.agent, premise.uses, premise.kind) == ("writer", "llm", "task")
    plot = wf.step("plot")
    assert (plot.agent, plot.uses) == (None, "python")
    assert plot.output_schema == {"type": "object", "required": ["sections"]}
    assert plot.cache is True
    assert wf.step("polish").kind == "loop"
    assert wf.step("polish").uses is None
    assert wf.step("draft").kind == "map"


def test_pool_and_timeout_resolution(full: Path) -> None:
    wf = load_workflow(full)
    # pool: step → agent → defaults
    assert wf.step("setting").pool == "cpu"
    assert wf.step("premise").pool == "llm"
    assert wf.step("plot").pool == "cpu"
    # timeout: step → agent → defaults, all in seconds
    assert wf.step("characters").timeout_s == 600.0
    assert wf.step("premise").timeout_s == 120.0
    assert wf.step("plot").timeout_s == 300.0


def test_deps_are_inferred_from_templates_and_needs(full: Path) -> None:
    wf = load_workflow(full)
    deps = {s.id: set(s.deps) for s in wf.steps}
    assert deps == {
        "premise": set(),
        "characters": {"premise"},
        "setting": {"premise"},
        "plot": {"characters", "setting", "premise"},
        "draft": {"plot"},
        "blurbs": {"premise"},
        # critique reads steps.draft: a dependency of the enclosing loop.
        "polish": {"draft"},
        "assemble": {"blurbs", "polish"},
    }
    assert wf.step("plot").needs == ("characters", "setting")
    assert wf.step("polish").needs == ("draft",)  # a single string becomes a tuple


def test_loop_nested_steps(full: Path) -> None:
    loop = load_workflow(full).step("polish").loop
    assert loop is not None
    assert [s.id for s in loop.steps] == ["critique", "revise"]
    assert loop.until == "steps.critique.output.score >= 8"
    assert loop.best_by == "steps.critique.output.score"
    assert loop.max_iterations == 4
    assert loop.on_exhausted == "fail"
    critique, revise = loop.steps
    assert critique.deps == ()
    assert revise.deps == ("critique",)
    assert critique.agent == "editor"
    assert critique.pool == "cpu"  # editor has no pool: the defaults' pool


def test_for_each_and_sequential_maps(full: Path) -> None:
    wf = load_workflow(full)
    draft = wf.step("draft")
    assert draft.for_each == "steps.plot.output.sections"
    assert draft.as_ == "section"
    assert draft.max_parallel == 3
    assert draft.sequential is True  # it reads `previous`
    blurbs = wf.step("blurbs")
    assert blurbs.for_each == ["back cover", "catalogue"]
    assert blurbs.as_ == "item"
    assert blurbs.sequential is False
    assert blurbs.when == "inputs.sections > 2"
    assembled = wf.step("assemble")
    assert (assembled.join, assembled.allow_failure) == ("all_done", True)


def test_steps_are_frozen(full: Path) -> None:
    step = load_workflow(full).step("premise")
    assert isinstance(step, Step)
    with pytest.raises(AttributeError):
        step.prompt = "x"  # type: ignore[misc]


def test_load_from_text_argument(tmp_path: Path) -> None:
    text = "apiVersion: storyflow/v1\nname: t\nsteps:\n  a: {uses: template, with: {template: x}}\n"
    wf = load_workflow(tmp_path / "not-written.yaml", text=text)
    assert [s.id for s in wf.steps] == ["a"]


def test_source_hash_depends_on_text_and_parameters(full: Path, write_workflow: Any) -> None:
    a = load_workflow(full).source_hash
    assert load_workflow(full).source_hash == a
    assert load_workflow(full, environment="local").source_hash != a
    assert load_workflow(full, sets=["config.model=x"]).source_hash != a
    other = write_workflow(FULL.replace("version: 3", "version: 4"), "other.yaml")
    assert load_workflow(other).source_hash != a


def test_when_true_literal_and_durations(write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: t
        defaults: {timeout: 1500ms}
        steps:
          a: {uses: template, with: {template: hi}, when: true, timeout: 1.5}
          b: {uses: template, with: {template: hi}, retry: {delay: " 10 s ", max_delay: 1h}}
          c: {uses: template, with: {template: hi}, timeout: 2d}
        """
    )
    wf = load_workflow(path)
    assert wf.step("a").when == "true"
    assert wf.step("a").timeout_s == 1.5
    assert wf.step("b").timeout_s == 1.5
    assert wf.step("b").retry.delay_s == 10.0
    assert wf.step("b").retry.max_delay_s == 3600.0
    assert wf.step("c").timeout_s == 172800.0


# --- syntax-level problems -------------------------------------------------------------


def test_yaml_syntax_error(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: hi}}
          b: uses: template
        """,
    )
    (p,) = problems
    assert (p.line, p.col) == (5, 10)
    assert p.message.startswith("YAML syntax error")
    assert p.hint is not None and "quote" in p.hint


def test_yaml_tab_indentation(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        "apiVersion: storyflow/v1\nname: x\nsteps:\n\ta: {uses: template, with: {template: hi}}\n",
    )
    (p,) = problems
    assert (p.line, p.col) == (4, 1)
    assert p.message.startswith("YAML syntax error")
    assert p.hint is not None and "tab" in p.hint


def test_two_duplicate_keys_give_two_problems(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        name: y
        steps:
          a: {uses: template, with: {template: "hi"}}
          a: {uses: template, with: {template: "ho"}}
        """,
    )
    assert where(problems) == [
        (3, 1, "duplicate key 'name' (first defined at line 2)"),
        (6, 3, "duplicate key 'a' (first defined at line 5)"),
    ]
    assert all(p.hint and "last" in p.hint for p in problems)
    assert [p.path for p in problems] == ["$.name", "$.steps.a"]


def test_empty_file(write_workflow: Any) -> None:
    (p,) = load_problems(write_workflow, "")
    assert (p.line, p.col, p.message) == (1, 1, "the file is empty")
    assert p.hint and "apiVersion" in p.hint


def test_comment_only_file_is_empty(write_workflow: Any) -> None:
    (p,) = load_problems(write_workflow, "# nothing here yet\n")
    assert p.message == "the file is empty"


def test_file_that_is_a_list(write_workflow: Any) -> None:
    (p,) = load_problems(write_workflow, "- a\n- b\n")
    assert (p.line, p.col) == (1, 1)
    assert "mapping" in p.message


def test_file_that_is_a_scalar(write_workflow: Any) -> None:
    (p,) = load_problems(write_workflow, "just some words\n")
    assert "mapping" in p.message


def test_non_utf8_bytes(write_workflow: Any) -> None:
    text = b"apiVersion: storyflow/v1\nname: x\n# caf\xe9\nsteps: {}\n"
    (p,) = load_problems(write_workflow, text)
    assert (p.line, p.col) == (3, 1)
    assert "UTF-8" in p.message


def test_missing_file(tmp_path: Path) -> None:
    (p,) = validate_file(tmp_path / "nope.yaml")
    assert "cannot read" in p.message


# --- schema-level problems -------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_nearest(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: hi}}
        outptus: {}
        """,
    )
    (p,) = problems
    assert (p.line, p.col) == (5, 1)
    assert p.message == "unknown key 'outptus' in the workflow"
    assert p.hint == "did you mean 'outputs'?"
    assert p.path == "$.outptus"


def test_unknown_step_key_suggests_the_nearest(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        agents: {writer: {uses: llm}}
        steps:
          a:
            agent: writer
            promt: hello
        """,
    )
    p = only(problems, "promt")
    assert (p.line, p.col) == (7, 5)
    assert p.message == "unknown key 'promt' in step 'a'"
    assert p.hint == "did you mean 'prompt'?"


def test_unknown_api_version(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v2
        name: x
        steps:
          a: {uses: template, with: {template: hi}}
        """,
    )
    assert (p.line, p.col) == (1, 13)
    assert p.message == "unknown apiVersion 'storyflow/v2'"
    assert p.hint == "this storyflow reads apiVersion: storyflow/v1"


def test_bad_duration_points_at_the_value(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a:
            uses: template
            with: {template: hi}
            timeout: 5 minutes
        """,
    )
    assert (p.line, p.col, p.path) == (7, 14, "$.steps.a.timeout")
    assert p.hint and "5m" in p.hint


# --- semantic problems -----------------------------------------------------------------

REFS = """\
    apiVersion: storyflow/v1
    name: x
    inputs:
      premise: {type: string, default: p}
    agents:
      writer: {uses: llm, pool: llm}
      editor: {uses: llm}
    pools:
      llm: {concurrency: 2}
    steps:
      premise: {agent: writer, prompt: "{{ inputs.premise }}"}
      plot:
        agent: editr
        pool: lm
        prompt: "{{ steps.premis.output }}"
        needs: [premise, plott]
"""


def test_unknown_agent_pool_and_step_suggest_the_nearest(write_workflow: Any) -> None:
    problems = load_problems(write_workflow, REFS)
    agent = only(problems, "unknown agent")
    assert (agent.line, agent.col, agent.message) == (13, 12, "unknown agent 'editr'")
    assert agent.hint == "did you mean 'editor'?"
    assert agent.path == "$.steps.plot.agent"
    pool = only(problems, "unknown pool")
    assert (pool.line, pool.col, pool.message) == (14, 11, "unknown pool 'lm'")
    assert pool.hint == "did you mean 'llm'?"
    step = only(problems, "unknown step 'premis'")
    assert (step.line, step.col) == (15, 13)
    assert step.hint == "did you mean 'premise'?"
    need = only(problems, "in needs")
    assert (need.line, need.col, need.message) == (16, 22, "unknown step 'plott' in needs")
    assert need.hint == "did you mean 'plot'?"
    assert need.path == "$.steps.plot.needs[1]"


def test_dependency_cycle_lists_the_cycle(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: "{{ steps.c.output }}"}}
          b: {uses: template, with: {template: "{{ steps.a.output }}"}}
          c: {uses: template, with: {template: "x"}, needs: [b]}
          d: {uses: template, with: {template: "{{ steps.a.output }}"}}
        """,
    )
    (p,) = problems
    assert p.message == "dependency cycle: a → c → b → a"
    assert (p.line, p.col) == (4, 40)
    assert p.hint and "break the cycle" in p.hint


def test_step_depending_on_itself(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: "{{ steps.a.output }}"}}
        """,
    )
    assert "depends on itself" in p.message


def test_template_syntax_error_in_block_scalar_points_at_the_file_line(
    write_workflow: Any,
) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a:
            uses: template
            with:
              template: |
                Title: {{ inputs.title }}

                {% for x in [1, 2] %}
                {{ x }
                {% endfor %}
        """,
    )
    assert p.line == 11  # the line holding `{{ x }`
    assert p.message.startswith("template syntax error")
    assert p.path == "$.steps.a.with.template"
    assert p.hint and "{{ }}" in p.hint


def test_template_syntax_error_in_flow_string(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: "hi: {{ x"}}
        """,
    )
    assert (p.line, p.col) == (4, 40)
    assert p.message.startswith("template syntax error")


def test_bad_expression_in_when(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: hi}, when: "inputs.x >"}
        """,
    )
    assert p.path == "$.steps.a.when"
    assert p.message.startswith("template syntax error")


def test_unknown_input_in_a_template(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        inputs: {premise: {type: string}}
        steps:
          a: {uses: template, with: {template: "{{ inputs.premis }}"}}
        """,
    )
    assert (p.line, p.col, p.message) == (5, 40, "unknown input 'premis'")
    assert p.hint == "did you mean 'premise'?"


def test_bare_input_name_suggests_inputs_prefix(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        inputs: {premise: {type: string}}
        steps:
          a: {uses: template, with: {template: "{{ premise }}"}}
        """,
    )
    assert p.message == "unknown name 'premise'"
    assert p.hint == "did you mean inputs.premise?"


def test_undeclared_secrets_and_env(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        env: [STORY_LANG]
        agents:
          writer: {uses: llm, secrets: [OPENAI_API_KEY]}
        steps:
          a:
            agent: writer
            prompt: "{{ env.STORY_LANG }} {{ env.HOME }} {{ secrets.OPENAI_API_KEY }}"
          b:
            agent: writer
            prompt: "{{ secrets.OTHER_KEY }}"
          c: {uses: template, with: {template: "{{ secrets.OPENAI_API_KEY }}"}}
        """,
    )
    env = only(problems, "env.HOME")
    assert (env.line, env.col, env.message) == (9, 13, "env.HOME is not declared")
    assert env.hint == "add HOME to the workflow's `env:` list"
    sec = only(problems, "OTHER_KEY")
    assert (sec.line, sec.col) == (12, 13)
    assert sec.message == "secrets.OTHER_KEY is not declared by agent 'writer'"
    assert sec.hint == "add OTHER_KEY to the `secrets:` list of agent 'writer'"
    # An inline step has no agent, so it can declare no secret.
    inline = only(problems, "by an agent")
    assert inline.line == 13
    assert len(problems) == 3


def test_secret_read_in_agent_with_is_checked_against_that_agent(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        agents:
          writer: {uses: llm, with: {system: "{{ secrets.KEY }}"}}
        steps:
          a: {agent: writer, prompt: hi}
        """,
    )
    assert p.message == "secrets.KEY is not declared by agent 'writer'"


def test_reference_into_a_loop_from_outside(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          polish:
            loop:
              steps:
                revise: {uses: template, with: {template: x}}
          after: {uses: template, with: {template: "{{ steps.revise.output }}"}}
          later: {uses: template, with: {template: x}, needs: [revise]}
        """,
    )
    (read,) = [p for p in problems if p.message == "step 'revise' is inside loop 'polish'"]
    assert (read.line, read.col) == (8, 44)
    assert read.hint == "use steps.polish.output.revise outside the loop"
    need = only(problems, "cannot be needed here")
    assert (need.line, need.col) == (9, 56)


def test_loop_step_reading_its_own_loop(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          polish:
            loop:
              steps:
                revise: {uses: template, with: {template: "{{ steps.polish.output }}"}}
        """,
    )
    assert p.line == 7
    assert "polish" in p.message
    assert p.hint and "loop.previous" in p.hint


def test_loop_names_outside_a_loop(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: "{{ loop.iteration }}"}}
        """,
    )
    assert p.message == "loop.* is only defined inside a loop's steps"


def test_previous_outside_a_map(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: "{{ previous }}"}}
        """,
    )
    assert p.message == "unknown name 'previous'"


@pytest.mark.parametrize("name", ["../story.md", "out/../../x.md", "/etc/passwd", "~/x.md"])
def test_artifact_path_leaving_the_run_folder(write_workflow: Any, name: str) -> None:
    problems = load_problems(
        write_workflow,
        f"""\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {{uses: template, with: {{template: hi}}}}
        artifacts:
          ok.md: fine
          "{name}": x
        """,
    )
    (p,) = problems  # one mistake, one message
    assert (p.line, p.col) == (7, 3)
    assert p.message == f"artifact path {name!r} leaves the run folder"
    assert p.hint and ".." in p.hint


def test_step_id_used_twice_across_a_loop(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: x}}
          polish:
            loop:
              steps:
                a: {uses: template, with: {template: y}}
        """,
    )
    assert (p.line, p.col) == (8, 9)
    assert "used twice" in p.message


def test_missing_required_with_key(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: python}
        """,
    )
    assert p.message == "step 'a' (python) needs with.callable"


def test_unknown_agent_kind(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: tmplate, with: {template: x}}
        """,
    )
    assert (p.line, p.col, p.message) == (4, 13, "unknown agent kind 'tmplate'")
    assert p.hint == "did you mean 'template'?"


def test_fallback_loop(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        agents:
          a: {uses: llm, fallback: b}
          b: {uses: llm, fallback: a}
        steps:
          s: {agent: a, prompt: x}
        """,
    )
    assert {p.message for p in problems} == {
        "fallback chain loops: a → b → a",
        "fallback chain loops: b → a → b",
    }


# --- several problems at once ----------------------------------------------------------


def test_every_problem_is_reported_in_file_order(write_workflow: Any) -> None:
    problems = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: Bad Name
        agents:
          writer: {uses: llm}
        steps:
          a: {agent: writr, prompt: "{{ inputs.nope }}"}
          b: {agent: writer, prompt: x, timeout: soon, agnet: y}
        artifacts:
          ../x.md: x
        descripton: typo
        """,
    )
    assert [(p.line, p.col) for p in problems] == sorted((p.line, p.col) for p in problems)
    messages = " | ".join(p.message for p in problems)
    for fragment in (
        "'Bad Name' is not valid for name",
        "unknown agent 'writr'",
        "unknown input 'nope'",
        "'soon' is not valid for timeout",
        "unknown key 'agnet'",
        "leaves the run folder",
        "unknown key 'descripton'",
    ):
        assert fragment in messages
    assert len(problems) == 7
    # And the exception carries the same list.
    with pytest.raises(WorkflowError) as info:
        load_workflow(problems[0].file)
    assert info.value.problems == problems
    assert info.value.exit_code == 2


def test_problem_format_has_file_line_col_path_and_hint(write_workflow: Any) -> None:
    path = write_workflow(REFS)
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    text = str(info.value)
    assert f"{path}:13:12: error: unknown agent 'editr'" in text
    assert "    at $.steps.plot.agent" in text
    assert "    hint: did you mean 'editor'?" in text


def test_problem_order_is_deterministic(write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        agents: {w: {uses: llm}}
        steps:
          a: {agent: w, prompt: "{{ inputs.a }} {{ env.B }} {{ secrets.C }} {{ steps.d.output }}"}
        """
    )
    # Four problems at one position: ordered by what they name, whatever the hash seed
    # (test_cli_spec runs the same check under two PYTHONHASHSEEDs).
    assert [p.message for p in validate_file(path)] == [
        "env.B is not declared",
        "unknown input 'a'",
        "secrets.C is not declared by agent 'w'",
        "unknown step 'd'",
    ]


# --- parameters: --env and --set -------------------------------------------------------


def test_env_deep_merges_onto_agents_config_pools_and_defaults(full: Path) -> None:
    wf = load_workflow(full, environment="offline")
    assert wf.environment == "offline"
    writer = wf.agents["writer"]
    assert writer.uses == "builtin/grammar"
    # merged, not replaced: the agent keeps its other keys
    assert writer.pool == "llm"
    assert writer.with_["system"] == "You are a novelist."
    assert writer.with_["grammar"] == "grammars/writer.yaml"
    assert wf.config == {
        "model": "gpt-4o-mini",
        "temperature": 0.1,
        "style": {"voice": "first", "tense": "past"},
    }
    assert wf.pools["llm"].concurrency == 8
    assert wf.pools["llm"].rate_text == "60/min"
    assert wf.step("plot").timeout_s == 30.0
    assert wf.step("plot").retry.attempts == 3
    assert wf.step("premise").uses == "builtin/grammar"


def test_env_does_not_change_the_unparameterised_load(full: Path) -> None:
    load_workflow(full, environment="offline")
    assert load_workflow(full).agents["writer"].uses == "llm"


def test_unknown_environment_is_an_input_error(full: Path) -> None:
    with pytest.raises(InputError) as info:
        load_workflow(full, environment="ofline")
    assert "ofline" in info.value.message
    assert info.value.hint == "did you mean 'offline'?"
    assert info.value.exit_code == 2


def test_environment_in_a_file_without_environments(write_workflow: Any) -> None:
    path = write_workflow(
        "apiVersion: storyflow/v1\nname: x\nsteps:\n  a: {uses: template, with: {template: x}}\n"
    )
    with pytest.raises(InputError) as info:
        load_workflow(path, environment="offline")
    assert info.value.hint == "this workflow defines no environments"


def test_env_that_breaks_the_workflow_is_reported(write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        environments:
          broken: {agents: {writer: {pool: nowhere}}}
        agents:
          writer: {uses: llm}
        steps:
          a: {agent: writer, prompt: x}
        """
    )
    assert validate_file(path) == []
    with pytest.raises(WorkflowError) as info:
        load_workflow(path, environment="broken")
    (p,) = info.value.problems
    assert p.message == "after --env broken: unknown pool 'nowhere'"


def test_set_nested_values_with_yaml_types(full: Path) -> None:
    wf = load_workflow(
        full,
        sets=[
            "config.model=llama3",
            "config.temperature=0.25",
            "config.style.voice=second",
            "config.new.deep.list=[1, two, {three: 3}]",
            "config.flag=true",
            "config.nothing=null",
            "config.quoted='42'",
            "defaults.retry.attempts=7",
            "steps.plot.with.premise=fixed",
        ],
    )
    assert wf.config["model"] == "llama3"
    assert wf.config["temperature"] == 0.25
    assert wf.config["style"] == {"voice": "second"}
    assert wf.config["new"] == {"deep": {"list": [1, "two", {"three": 3}]}}
    assert wf.config["flag"] is True
    assert wf.config["nothing"] is None
    assert wf.config["quoted"] == "42"
    assert wf.step("plot").retry.attempts == 7
    assert wf.step("plot").with_["premise"] == "fixed"
    assert wf.step("plot").deps == ("characters", "setting")  # no longer reads premise


def test_set_after_env(full: Path) -> None:
    wf = load_workflow(full, environment="offline", sets=["config.temperature=0.5"])
    assert wf.config["temperature"] == 0.5
    assert wf.agents["writer"].uses == "builtin/grammar"


def test_set_into_a_list_index(full: Path) -> None:
    wf = load_workflow(full, sets=["steps.blurbs.for_each.1=index card"])
    assert wf.step("blurbs").for_each == ["back cover", "index card"]


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("config.model", "is not path=value"),
        ("=3", "is not path=value"),
        ("name.x=1", "is not a mapping"),
        ("steps.blurbs.for_each.9=x", "is not an index"),
    ],
)
def test_bad_set_is_an_input_error(full: Path, item: str, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        load_workflow(full, sets=[item])
    assert fragment in info.value.message


def test_set_that_breaks_the_schema_points_at_the_original_line(full: Path) -> None:
    with pytest.raises(WorkflowError) as info:
        load_workflow(full, sets=["defaults.retry.attempts=zero"])
    (p,) = info.value.problems
    assert p.message == "after --set: attempts must be an integer, not a string"
    assert p.line == 22
    assert p.path == "$.defaults.retry.attempts"


# --- odd but legal YAML ------------------------------------------------------------------


def test_bad_step_id_points_at_the_key(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a: {uses: template, with: {template: x}}
          2nd: {uses: template, with: {template: x}}
        """,
    )
    assert (p.line, p.col, p.message) == (5, 3, "invalid name '2nd' in steps")
    assert p.hint and "'-'" in p.hint  # step ids may hold '-'


@pytest.mark.parametrize(
    "extra",
    ["1.5: x", "~: x", "true: x", "artifacts: {1: x}", "artifacts: {~: x}", "steps2: {3: {}}",
     "inputs: {1: {type: string}}", "outputs: {2: '{{ inputs.x }}'}", "agents: {7: {uses: llm}}"],
)
def test_keys_that_are_not_strings_are_problems_not_crashes(
    write_workflow: Any, extra: str
) -> None:
    problems = load_problems(
        write_workflow,
        "apiVersion: storyflow/v1\nname: x\nsteps:\n  a: {uses: template, with: {template: x}}\n"
        + extra + "\n",
    )
    assert all(p.line >= 1 and p.col >= 1 for p in problems)


def test_recursive_alias_is_a_problem(write_workflow: Any) -> None:
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps: &s
          a: {uses: template, with: {template: x}}
          b: {loop: {steps: *s}}
        """,
    )
    assert (p.line, p.col) == (5, 14)
    assert "alias" in p.message


def test_alias_bomb_is_rejected_quickly(write_workflow: Any) -> None:
    levels = ['  l0: &l0 ["{{ x }}", "{{ x }}", "{{ x }}", "{{ x }}", "{{ x }}", "{{ x }}"]']
    for i in range(1, 10):
        levels.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 6) + "]")
    text = (
        "apiVersion: storyflow/v1\nname: x\nconfig:\n" + "\n".join(levels) + "\n"
        "steps:\n  a: {uses: template, with: {template: x}}\noutputs:\n  o: *l9\n"
    )
    (p,) = load_problems(write_workflow, text)  # 6**10 values once expanded
    assert "aliases expand" in p.message


def test_plain_aliases_are_fine(write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        agents:
          writer: &w {uses: llm, with: {temperature: 0.5}}
          editor: *w
        steps:
          a: &step {agent: writer, prompt: "hi"}
          b: *step
        """
    )
    wf = load_workflow(path)
    assert wf.agents["editor"].with_ == {"temperature": 0.5}
    assert wf.step("b").prompt == "hi"


def test_every_string_of_a_mapping_is_checked(write_workflow: Any) -> None:
    """A template that reads nothing does not stop the check of the next one."""
    (p,) = load_problems(
        write_workflow,
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          a:
            uses: template
            with: {template: "{{ 1 + 1 }}", other: "{{ 'text' }}", last: "{{ inputs.nope }}"}
        """,
    )
    assert (p.line, p.message) == (6, "unknown input 'nope'")


def test_byte_order_mark_and_crlf_line_ends(write_workflow: Any) -> None:
    text = (
        "\ufeffapiVersion: storyflow/v1\r\nname: x\r\nsteps:\r\n"
        "  a: {uses: template, with: {template: hi}}\r\n"
        '  b: {uses: template, with: {template: "{{ steps.c.output }}"}}\r\n'
    )
    (p,) = load_problems(write_workflow, text.encode("utf-8"))
    assert (p.line, p.col, p.message) == (5, 40, "unknown step 'c'")
    fixed = write_workflow(text.replace("steps.c", "steps.a").encode("utf-8"), "fixed.yaml")
    assert load_workflow(fixed).step("b").deps == ("a",)


def test_the_loader_resolves_scalars_as_ruamel_does() -> None:
    """storyflow's loader picks the YAML version's resolver once per load, where ruamel
    looks it up for each scalar: the data must be the same, YAML 1.2 and 1.1 alike."""
    from ruamel.yaml import YAML

    from storyflow.spec.yaml_source._parse import safe_load

    scalars = ["1", "-2", "0o17", "017", "0x1f", "1.5", "1e3", ".inf", "-.Inf", ".nan", "yes",
               "No", "on", "true", "False", "~", "null", "", "2024-01-02",
               "2024-01-02T03:04:05Z", "1_000", "0b101", "12:30:00", "'7'", "text"]
    body = "".join(f"k{i}: {s}\n" for i, s in enumerate(scalars)) + "list: [1, yes, ~, 0o7]\n"
    for text in (body, "%YAML 1.1\n---\n" + body):
        ours, error = safe_load(text, allow_duplicates=False)
        assert error is None
        theirs = YAML(typ="safe").load(text)
        assert repr(ours) == repr(theirs)  # repr: NaN is not equal to itself
