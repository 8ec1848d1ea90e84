"""The plan (order, levels, dependents, fingerprints) and its pictures (mermaid, dot, text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storyflow.engine.plan import Plan, plan
from storyflow.spec import load_workflow
from storyflow.ui.graph import render

SMALL = """\
    apiVersion: storyflow/v1
    name: tiny-story
    agents:
      writer: {uses: llm, with: {temperature: 0.5}}
    steps:
      premise: {agent: writer, prompt: "Premise"}
      scenes:
        for_each: ["a", "b"]
        agent: writer
        prompt: "{{ item }} after {{ previous }} from {{ steps.premise.output }}"
      ask: {uses: human, with: {question: "ok?"}, needs: premise}
      polish:
        loop:
          max_iterations: 2
          until: steps.critique.output.verdict == "good"
          steps:
            critique: {agent: writer, prompt: "{{ steps.scenes.output }}"}
            revise: {agent: writer, prompt: "{{ steps.critique.output }}"}
      final:
        uses: template
        with: {template: "{{ steps.polish.output }}"}
        needs: [ask]
        retry: {attempts: 2}
        timeout: 30s
      child: {uses: workflow, with: {path: child.yaml}}
"""


CHILD = """\
apiVersion: storyflow/v1
name: child
steps:
  only: {uses: template, with: {template: "x"}}
"""


@pytest.fixture(autouse=True)
def child_workflow(write_workflow: Any) -> Path:
    """The sub-workflow SMALL's `child` step runs (validation checks that it exists)."""
    path: Path = write_workflow(CHILD, "child.yaml")
    return path


@pytest.fixture
def small(write_workflow: Any) -> Path:
    path: Path = write_workflow(SMALL)
    return path


def compiled(path: Path) -> Plan:
    return plan(load_workflow(path))


# --- order, levels, dependents -----------------------------------------------------------


def test_order_is_topological_with_file_order_ties(small: Path) -> None:
    p = compiled(small)
    assert p.order == ("premise", "scenes", "ask", "polish", "final", "child")
    assert len(p) == 6
    assert p.count_all() == 8  # the loop body counts once


def test_levels(small: Path) -> None:
    p = compiled(small)
    assert p.levels() == [["premise", "child"], ["scenes", "ask"], ["polish"], ["final"]]
    assert p.nodes["final"].level == 3


def test_deps_and_dependents(small: Path) -> None:
    p = compiled(small)
    assert p.nodes["premise"].dependents == ("scenes", "ask")
    assert p.nodes["final"].deps == ("ask", "polish")
    assert p.nodes["polish"].deps == ("scenes",)
    assert p.nodes["child"].deps == ()
    assert p.nodes["child"].dependents == ()


def test_loop_body_is_its_own_plan(small: Path) -> None:
    body = compiled(small).nodes["polish"].body
    assert body is not None
    assert body.order == ("critique", "revise")
    assert body.nodes["revise"].deps == ("critique",)
    assert body.nodes["critique"].deps == ()  # steps.scenes is the loop's dependency
    assert compiled(small).nodes["premise"].body is None


def test_downstream(small: Path) -> None:
    p = compiled(small)
    assert p.downstream(["scenes"]) == {"scenes", "polish", "final"}
    assert p.downstream(["premise"]) == {"premise", "scenes", "ask", "polish", "final"}
    assert p.downstream(["child"]) == {"child"}
    assert p.downstream(["nope"]) == set()
    assert p.downstream([]) == set()


def test_order_puts_late_file_steps_after_their_deps(write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          c: {uses: template, with: {template: "{{ steps.b.output }}"}}
          b: {uses: template, with: {template: "{{ steps.a.output }}"}}
          a: {uses: template, with: {template: "a"}}
          d: {uses: template, with: {template: "d"}}
        """
    )
    p = compiled(path)
    # a ready step is taken in file order, among those ready at that moment
    assert p.order == ("a", "b", "c", "d")
    assert p.levels() == [["a", "d"], ["b"], ["c"]]


def test_wide_and_deep_plan(write_workflow: Any) -> None:
    lines = ["apiVersion: storyflow/v1", "name: wide", "steps:"]
    lines.append('  root: {uses: template, with: {template: "r"}}')
    for i in range(50):
        read = "{{ steps.root.output }}"
        lines.append(f'  w{i}: {{uses: template, with: {{template: "{read}"}}}}')
    reads = " ".join(f"{{{{ steps.w{i}.output }}}}" for i in range(50))
    lines.append(f'  join: {{uses: template, with: {{template: "{reads}"}}}}')
    p = compiled(write_workflow("\n".join(lines) + "\n"))
    assert [len(level) for level in p.levels()] == [1, 50, 1]
    assert len(p.nodes["join"].deps) == 50
    assert p.downstream(["w7"]) == {"w7", "join"}


# --- fingerprints ---------------------------------------------------------------------


def fingerprints(p: Plan) -> dict[str, str]:
    return {sid: node.fingerprint for sid, node in p.nodes.items()}


def test_fingerprints_are_stable_across_loads(small: Path, write_workflow: Any) -> None:
    first = fingerprints(compiled(small))
    assert fingerprints(compiled(small)) == first
    # the same definition in another file, another order of keys: same fingerprints
    reordered = SMALL.replace(
        'premise: {agent: writer, prompt: "Premise"}', 'premise: {prompt: "Premise", agent: writer}'
    )
    assert fingerprints(compiled(write_workflow(reordered, "copy.yaml"))) == first
    assert len(set(first.values())) == len(first)


def test_fingerprint_changes_when_the_prompt_changes(small: Path, write_workflow: Any) -> None:
    before = fingerprints(compiled(small))
    changed = write_workflow(SMALL.replace('"Premise"', '"Premise, darker"'), "changed.yaml")
    after = fingerprints(compiled(changed))
    assert after["premise"] != before["premise"]
    # only the step itself: downstream steps change at run time through their inputs
    assert {k for k in before if before[k] != after[k]} == {"premise"}


@pytest.mark.parametrize(
    ("old", "new", "changed"),
    [
        ("{temperature: 0.5}", "{temperature: 0.6}", {"premise", "scenes", "polish"}),
        ('question: "ok?"', 'question: "sure?"', {"ask"}),
        ('for_each: ["a", "b"]', 'for_each: ["a", "b", "c"]', {"scenes"}),
        ("max_iterations: 2", "max_iterations: 3", {"polish"}),
        ('== "good"', '== "great"', {"polish"}),
        ('prompt: "{{ steps.critique.output }}"', 'prompt: "{{ steps.critique.output }}!"',
         {"polish"}),
    ],
)
def test_fingerprint_covers_the_definition(
    small: Path, write_workflow: Any, old: str, new: str, changed: set[str]
) -> None:
    assert old in SMALL
    before = fingerprints(compiled(small))
    after = fingerprints(compiled(write_workflow(SMALL.replace(old, new), "changed.yaml")))
    assert {k for k in before if before[k] != after[k]} == changed


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("retry: {attempts: 2}", "retry: {attempts: 5, delay: 3s}"),
        ("timeout: 30s", "timeout: 1h"),
        ("needs: [ask]", "needs: [ask]\n        allow_failure: true\n        description: Glue."),
    ],
)
def test_fingerprint_ignores_retry_timeout_and_bookkeeping(
    small: Path, write_workflow: Any, old: str, new: str
) -> None:
    before = fingerprints(compiled(small))
    after = fingerprints(compiled(write_workflow(SMALL.replace(old, new), "changed.yaml")))
    assert after == before


# --- pictures -------------------------------------------------------------------------


def test_text_graph(small: Path) -> None:
    assert render(compiled(small), "text") == (
        "premise (writer)\n"
        "scenes (writer) × for_each 2 items [in order]  ← premise\n"
        "ask (human approval)  ← premise\n"
        'polish loop ≤2 until steps.critique.output.verdict == "good"  ← scenes\n'
        "    critique (writer)\n"
        "    revise (writer)  ← critique\n"
        "final (template)  ← ask, polish\n"
        "child (sub-workflow child.yaml)\n"
    )


def test_mermaid_graph(small: Path) -> None:
    assert render(compiled(small), "mermaid") == (
        "flowchart TD\n"
        '  premise["premise (writer)"]\n'
        '  scenes[["scenes (writer) × for_each 2 items [in order]"]]\n'
        '  ask{{"ask (human approval)"}}\n'
        '  subgraph polish ["polish loop ≤2 until '
        'steps.critique.output.verdict == #quot;good#quot;"]\n'
        "    direction TB\n"
        '    polish__critique["critique (writer)"]\n'
        '    polish__revise["revise (writer)"]\n'
        "    polish__critique --> polish__revise\n"
        "  end\n"
        '  final["final (template)"]\n'
        '  child[/"child (sub-workflow child.yaml)"/]\n'
        "  premise --> scenes\n"
        "  premise --> ask\n"
        "  scenes --> polish\n"
        "  ask --> final\n"
        "  polish --> final\n"
        '  polish -. "until steps.critique.output.verdict == #quot;good#quot;" .-> polish\n'
    )


def test_dot_graph(small: Path) -> None:
    assert render(compiled(small), "dot", title="tiny-story") == (
        'digraph "tiny-story" {\n'
        "  rankdir=TB;\n"
        "  node [shape=box, style=rounded];\n"
        '  "premise" [label="premise (writer)", shape=box];\n'
        '  "scenes" [label="scenes (writer) × for_each 2 items [in order]", shape=box3d];\n'
        '  "ask" [label="ask (human approval)", shape=hexagon];\n'
        '  subgraph "cluster_polish" {\n'
        '    label="polish loop ≤2 until steps.critique.output.verdict == \\"good\\""; '
        "style=dashed;\n"
        '    "polish" [shape=point, label=""];\n'
        '    "polish.critique" [label="critique (writer)", shape=box];\n'
        '    "polish.revise" [label="revise (writer)", shape=box];\n'
        '    "polish.critique" -> "polish.revise";\n'
        "  }\n"
        '  "final" [label="final (template)", shape=box];\n'
        '  "child" [label="child (sub-workflow child.yaml)", shape=component];\n'
        '  "premise" -> "scenes";\n'
        '  "premise" -> "ask";\n'
        '  "scenes" -> "polish";\n'
        '  "ask" -> "final";\n'
        '  "polish" -> "final";\n'
        "}\n"
    )


def test_mermaid_ids_are_unique_and_never_keywords(write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: x
        steps:
          end: {uses: template, with: {template: "e"}}
          my-step: {uses: template, with: {template: "{{ steps.end.output }}"}}
          my_step: {uses: template, with: {template: "{{ steps['my-step'].output }}"}}
          graph: {uses: template, with: {template: "g"}}
        """
    )
    out = render(compiled(path), "mermaid")
    assert out.splitlines()[1:] == [
        '  end_["end (template)"]',
        '  my_step["my-step (template)"]',
        '  my_step_2["my_step (template)"]',
        '  graph_["graph (template)"]',
        "  end_ --> my_step",
        "  my_step --> my_step_2",
    ]


def test_nested_loops_in_every_format(write_workflow: Any) -> None:
    path = write_workflow(
        """\
        apiVersion: storyflow/v1
        name: nested
        steps:
          outer:
            loop:
              until: loop.iteration >= 2
              steps:
                inner:
                  loop:
                    max_iterations: 5
                    steps:
                      leaf: {uses: template, with: {template: "x"}}
        """
    )
    p = compiled(path)
    assert render(p, "text") == (
        "outer loop ≤3 until loop.iteration >= 2\n"
        "    inner loop ≤5\n"
        "        leaf (template)\n"
    )
    mermaid = render(p, "mermaid")
    assert "    subgraph outer__inner" in mermaid
    assert '      outer__inner__leaf["leaf (template)"]' in mermaid
    assert [line for line in mermaid.splitlines() if line.strip() == "end"] == ["    end", "  end"]
    dot = render(p, "dot", title="nested")
    assert '    subgraph "cluster_outer.inner" {' in dot
    assert '      "outer.inner.leaf" [label="leaf (template)", shape=box];' in dot
