"""Damaged workflow files: `validate` reports problems, it never crashes.

A valid workflow is broken at random (characters deleted, lines duplicated or swapped,
YAML punctuation and tabs inserted, indentation changed, keys renamed); whatever comes
out, `validate_file` returns a list of located problems, and a file it finds valid also
loads, plans and draws. A few of the damaged files go through the real command too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storyflow.engine.plan import plan
from storyflow.errors import Problem
from storyflow.spec import load_workflow, validate_file
from storyflow.ui.graph import render

SEED = """\
apiVersion: storyflow/v1
name: fuzz-story
version: 1
inputs:
  premise: {type: string, default: "A lighthouse keeper finds a map"}
  sections: {type: integer, default: 3, minimum: 1, maximum: 12}
config: {model: gpt-4o-mini}
env: [STORY_LANG]
environments:
  offline: {agents: {writer: {uses: builtin/grammar}}}
defaults:
  timeout: 5m
  retry: {attempts: 3, delay: 2s, backoff: exponential}
pools:
  llm: {concurrency: 4, rate: 60/min}
agents:
  writer:
    uses: llm
    with: {model: "{{ config.model }}", system: "You are a novelist."}
    pool: llm
    secrets: [OPENAI_API_KEY]
    fallback: offline
  offline: {uses: builtin/grammar, with: {grammar: writer.yaml}}
steps:
  premise: {agent: writer, prompt: "Expand: {{ inputs.premise }}"}
  plot:
    agent: writer
    prompt: |
      Outline {{ inputs.sections }} sections for
      {{ steps.premise.output }}
    output_schema: {type: object, required: [sections]}
  draft:
    for_each: steps.plot.output.sections
    as: section
    agent: writer
    prompt: "Write {{ section.title }} after {{ previous }}"
  polish:
    needs: [draft]
    loop:
      max_iterations: 3
      until: steps.critique.output.score >= 8
      steps:
        critique: {agent: writer, prompt: "Score {{ steps.draft.output }}"}
        revise: {agent: writer, prompt: "Revise {{ steps.critique.output.notes }}"}
  assemble:
    uses: template
    with: {template: "{{ steps.polish.output.revise }}"}
    when: inputs.sections > 0
outputs:
  story: "{{ steps.assemble.output }}"
artifacts:
  story.md: "{{ steps.assemble.output }}"
"""

JUNK = [":", "{", "}", "[", "]", "-", "- ", "\t", '"', "'", "&a", "*a", "!!", "|", ">", "#",
        "{{", "}}", "{%", "%}", "?", ",", "\n", " ", "~", "null", "0x", "@", "`", "\\", "..",
        "\u00e9", "\x00", "\ufeff"]
WORDS = ["steps", "agent", "uses", "with", "loop", "needs", "for_each", "prompt", "x", "a",
         "agnet", "stpes", "inputs", "1", "true", "-", "../up", "premise", "until", "~", "1.5",
         "null", "&a", "*a"]


def _damage(draw: Any, text: str) -> str:
    lines = text.split("\n")
    op = draw(st.sampled_from(
        ["delete", "dup_line", "swap_lines", "insert", "indent", "replace_key", "truncate",
         "drop_line"]
    ))
    if op == "delete" and text:
        start = draw(st.integers(0, len(text) - 1))
        end = draw(st.integers(start, min(len(text), start + 40)))
        return text[:start] + text[end:]
    if op == "dup_line":
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, lines[i])
    elif op == "swap_lines":
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "insert":
        pos = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from(JUNK) | st.text(max_size=4))
        return text[:pos] + junk + text[pos:]
    elif op == "indent":
        i = draw(st.integers(0, len(lines) - 1))
        delta = draw(st.sampled_from([-4, -2, -1, 1, 2, 4]))
        lines[i] = " " * delta + lines[i] if delta > 0 else lines[i][-delta:]
    elif op == "replace_key" and any(":" in line for line in lines):
        keyed = [i for i, line in enumerate(lines) if ":" in line]
        i = draw(st.sampled_from(keyed))
        indent = len(lines[i]) - len(lines[i].lstrip(" -"))
        word = draw(st.sampled_from(WORDS) | st.from_regex(r"[a-z_]{1,8}", fullmatch=True))
        lines[i] = lines[i][:indent] + word + lines[i][lines[i].index(":"):]
    elif op == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    elif op == "drop_line":
        del lines[draw(st.integers(0, len(lines) - 1))]
    return "\n".join(lines)


@st.composite
def damaged(draw: Any) -> str:
    text = SEED
    for _ in range(draw(st.integers(1, 4))):
        text = _damage(draw, text)
    return text


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check_problems(problems: list[Problem], path: Path, text: str) -> None:
    assert isinstance(problems, list)
    n_lines = text.count("\n") + 1
    for p in problems:
        assert isinstance(p, Problem)
        assert p.file == str(path)
        assert p.message.strip()
        assert p.severity in ("error", "warning")
        assert 1 <= p.line <= n_lines + 1, (p, n_lines)
        assert p.col >= 1
        assert p.path.startswith("$")
        assert p.format().startswith(f"{path}:{p.line}:{p.col}: ")


def test_seed_is_valid(fuzz_dir: Path) -> None:
    path = fuzz_dir / "seed.yaml"
    path.write_text(SEED, encoding="utf-8")
    assert validate_file(path) == []
    assert validate_file(path, environment="offline") == []


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(text=damaged())
def test_damaged_text_gives_problems_not_exceptions(fuzz_dir: Path, text: str) -> None:
    path = fuzz_dir / "damaged.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    problems = validate_file(path)  # must not raise
    _check_problems(problems, path, text)
    if not any(p.severity == "error" for p in problems):
        # valid after all: it loads, plans and draws
        wf = load_workflow(path)
        compiled = plan(wf)
        for fmt in ("mermaid", "dot", "text"):
            assert render(compiled, fmt, title=wf.name)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    data=st.binary(max_size=20),
    pos=st.integers(0, len(SEED.encode())),
)
def test_damaged_bytes_give_problems_not_exceptions(
    fuzz_dir: Path, data: bytes, pos: int
) -> None:
    raw = SEED.encode()
    path = fuzz_dir / "bytes.yaml"
    path.write_bytes(raw[:pos] + data + raw[pos:])
    problems = validate_file(path)
    _check_problems(problems, path, raw.decode("utf-8", "replace"))


@pytest.mark.slow
def test_damaged_files_through_the_cli(fuzz_dir: Path, state_dir: Path) -> None:
    """A handful of damaged files through the real command: exit 0 or 2, never a traceback."""
    samples: list[str] = []

    @settings(max_examples=8, deadline=None, derandomize=True, database=None)
    @given(text=damaged())
    def collect(text: str) -> None:
        samples.append(text)

    collect()
    paths = []
    for i, text in enumerate(samples):
        path = fuzz_dir / f"cli-{i}.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        paths.append(path)
    # one process per file keeps each exit code attributable
    for path in paths:
        result = subprocess.run(
            [sys.executable, "-m", "storyflow", "validate", "--format", "json", str(path)],
            capture_output=True,
            text=True,
            env={"STORYFLOW_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin"},
            timeout=60,
            check=False,
        )
        assert result.returncode in (0, 2), (path.read_text(errors="replace"), result.stderr)
        assert "Traceback" not in result.stderr
        assert "internal error" not in result.stderr
