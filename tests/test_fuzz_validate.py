"""Damaged workflow files: `validate` reports problems, it never crashes.

A valid workflow is broken at random (characters deleted, lines duplicated or swapped,
YAML punctuation and tabs inserted, indentation changed, keys renamed); whatever comes
out, `validate_file` returns a list of located problems, and a file it finds valid also
loads, plans and draws. A few of the damaged files go through the real command too.

`test_mutants_give_problems_not_exceptions` is the seeded campaign of issue #13: 2,000
mutants a run of the example workflows and of small hand-written ones (lines deleted,
duplicated and swapped, characters flipped, deep nesting, huge strings, odd unicode,
tabs, anchors and aliases), each validated in process by the function `storyflow
validate` calls; twenty of them go through the real command. Then deep nesting (at,
past and far past the limit, in every YAML shape) and huge inputs.
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storyflow.agents.registry import kinds as known_kinds
from storyflow.engine.plan import plan
from storyflow.errors import InputError, Problem, WorkflowError
from storyflow.spec import load_workflow, validate_file
from storyflow.ui.graph import render

REPO = Path(__file__).resolve().parents[1]

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


_LINE_BREAKS = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


def _check_problems(problems: list[Problem], path: Path, text: str) -> None:
    assert isinstance(problems, list)
    n_lines = len(_LINE_BREAKS.split(text))  # YAML also breaks lines at \r, NEL, LS, PS
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


# --------------------------------------------------------------------------- the campaign

FUZZ_SEED = 13
"""The campaign's seed: the same mutants on every run, so a failure reproduces."""
MUTANTS = 2000
"""Mutants validated in process per run (issue #13 asks for at least 2,000)."""
THROUGH_CLI = 20
"""Of them, how many also go through the real `storyflow validate`."""

SMALL = [
    # anchors, aliases and merge keys
    """\
apiVersion: storyflow/v1
name: anchors
defaults: &d {timeout: 5m, retry: {attempts: 2}}
agents:
  base: &base {uses: template, with: {template: "{{ inputs.x }}"}}
  other: {<<: *base}
inputs:
  x: {type: string, default: &v "a value"}
steps:
  a: {agent: base}
  b: {uses: template, with: {template: *v}, needs: [a]}
""",
    # a shell-string command, block scalars, a map and a loop
    """\
apiVersion: storyflow/v1
name: shell
inputs:
  title: {type: string, default: "x; touch pwned"}
steps:
  list: {uses: template, with: {template: "{{ [1, 2, 3] }}"}}
  echo:
    for_each: steps.list.output
    uses: command
    with:
      run: |
        echo {{ item }} {{ inputs.title | shquote }}
      output: text
  polish:
    loop:
      max_iterations: 2
      until: loop.iteration >= 2
      steps:
        note: {uses: template, with: {template: "{{ steps.echo.output | tojson }}"}}
outputs:
  all: "{{ steps.polish.output.note }}"
""",
    # environments, pools, budgets, a human step
    """\
apiVersion: storyflow/v1
name: envs
config: {model: m}
pools:
  llm: {concurrency: 2, rate: 10/min}
budget: {tokens: 1000}
environments:
  offline: {agents: {w: {uses: builtin/grammar, with: {grammar: g.yaml}}}}
agents:
  w: {uses: llm, with: {model: "{{ config.model }}"}, pool: llm}
steps:
  ask: {uses: human, with: {question: "Go?", schema: {type: boolean}}}
  write: {agent: w, prompt: "Go: {{ steps.ask.output }}", when: steps.ask.output}
""",
]

DEEP = ["[", "{a: ", "- ", "{? [", "[{a: "]
ODD = ["\u202e", "\u200b", "\ufeff", "\u2028", "\u0085", "\x00", "\x7f", "\U0001f600",
       "e\u0301", "\u00a0", "\t", "\r", "\r\n", "\x1b[31m", "\\", "\udcff", "\ud800"]
TOKENS = [":", ": ", "- ", "{", "}", "[", "]", ",", "&a ", "*a", "*nowhere", "!!python/object ",
          "!!binary ", "? ", "|", ">-", "#", "'", '"', "{{", "}}", "{%", "%}", "<<: *a",
          "&a [*a]", "~", "null", ".inf", "0o17", "2026-01-01", "---\n", "...\n", "%YAML 1.1\n"]


def _corpus() -> list[str]:
    texts = [SEED, *SMALL]
    for path in sorted((REPO / "workflows").glob("*.yaml")):
        texts.append(path.read_text(encoding="utf-8"))
    return texts


def _mutate(rng: random.Random, text: str) -> tuple[str, str]:
    """One mutation of ``text``: (its name, the new text)."""
    lines = text.split("\n")
    op = rng.choices(
        ["delete_line", "dup_line", "swap_lines", "flip", "cut", "token", "deep", "huge",
         "unicode", "tabs", "alias", "truncate", "indent"],
        weights=[10, 8, 8, 14, 6, 14, 6, 2, 8, 5, 6, 3, 7],
    )[0]
    i = rng.randrange(len(lines))
    at = rng.randrange(len(text) + 1)
    if op == "delete_line":
        del lines[i]
    elif op == "dup_line":
        lines.insert(i, lines[i])
    elif op == "swap_lines":
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "flip" and text:
        k = min(at, len(text) - 1)
        return op, text[:k] + rng.choice(TOKENS + ODD + list("aZ9 _-.")) [:1] + text[k + 1:]
    elif op == "cut":
        return op, text[:at] + text[at + rng.randint(1, 60):]
    elif op == "token":
        return op, text[:at] + rng.choice(TOKENS) + text[at:]
    elif op == "deep":
        n = rng.choice([10, 150, 199, 200, 201, 300, 1000, 5000, 40000])
        opener = rng.choice(DEEP)
        closer = "".join({"[": "]", "{": "}"}.get(c, "") for c in reversed(opener))
        nest = opener * n + "x" + (closer * n if rng.random() < 0.8 else "")
        key = lines[i].split(":")[0] if ":" in lines[i] else "  config"
        lines[i] = f"{key}: {nest}"
    elif op == "huge":
        size = rng.choice([10_000, 200_000, 2_000_000])
        word = rng.choice(["a", "{{ x }} ", "\u00e9", "- ", "[", " "])
        return op, text[:at] + word * (size // len(word)) + text[at:]
    elif op == "unicode":
        return op, text[:at] + "".join(rng.choices(ODD, k=rng.randint(1, 3))) + text[at:]
    elif op == "tabs":
        lines[i] = lines[i].replace("  ", "\t", rng.randint(1, 3))
    elif op == "alias" and ":" in lines[i]:
        key, _, value = lines[i].partition(":")
        lines[i] = f"{key}: &a {value.strip() or '{}'}"
        j = rng.randrange(len(lines))
        if ":" in lines[j] and j != i:
            k2, _, _ = lines[j].partition(":")
            lines[j] = f"{k2}: {rng.choice(['*a', '[*a, *a]', '{x: *a}', '*b'])}"
    elif op == "truncate":
        return op, text[:at]
    elif op == "indent":
        delta = rng.choice([-4, -2, -1, 1, 2, 3, 8])
        lines[i] = " " * delta + lines[i] if delta > 0 else lines[i][-delta:]
    return op, "\n".join(lines)


@functools.cache
def _mutants(n: int) -> list[tuple[str, str]]:
    """``n`` seeded mutants: (the mutations applied, the text)."""
    rng = random.Random(FUZZ_SEED)
    corpus = _corpus()
    weights = [3 if len(t) < 3000 else 1 for t in corpus]  # small files are cheap to check
    out = []
    for _ in range(n):
        text = rng.choices(corpus, weights)[0]
        ops = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            op, text = _mutate(rng, text)
            ops.append(op)
        out.append(("+".join(ops), text))
    return out


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `workflows/` (grammars, sub-workflows, helpers), where mutants are written."""
    root = tmp_path_factory.mktemp("campaign")
    shutil.copytree(REPO / "workflows", root / "workflows")
    return root / "workflows"


def _write(path: Path, text: str) -> str:
    """Write ``text`` (a lone surrogate encoded as is, \\udcff as the byte 0xff: neither is
    UTF-8); the text a reader sees."""
    raw = b"\xff".join(part.encode("utf-8", "surrogatepass") for part in text.split("\udcff"))
    path.write_bytes(raw)
    return raw.decode("utf-8", "replace")


def _validates(path: Path, text: str, ops: str) -> list[Problem]:
    """`validate_file` as `storyflow validate` calls it; a failure names the mutant."""
    try:
        problems = validate_file(path, kinds=known_kinds(), every_environment=True)
        _check_problems(problems, path, text)
    except Exception as exc:
        keep = path.with_name(f"failed-{ops}.yaml")
        shutil.copyfile(path, keep)
        raise AssertionError(f"{ops}: {type(exc).__name__}: {exc} (the mutant: {keep})") from exc
    return problems


def test_mutants_give_problems_not_exceptions(campaign_dir: Path) -> None:
    started = time.perf_counter()
    path = campaign_dir / "mutant.yaml"
    valid = 0
    for ops, text in _mutants(MUTANTS):
        seen = _write(path, text)
        problems = _validates(path, seen, ops)
        if any(p.severity == "error" for p in problems):
            continue
        valid += 1
        try:  # valid after all: it loads and plans (an input error is documented: exit 2)
            plan(load_workflow(path, kinds=known_kinds()))
        except (WorkflowError, InputError):
            pass
    assert valid > 0  # some mutations leave a file valid: the check after it runs too
    assert time.perf_counter() - started < 60, "the campaign must stay fast"


def test_some_mutants_through_the_cli(campaign_dir: Path, state_dir: Path) -> None:
    """A sample of the campaign (each kind of mutation) through the real command, four
    files a process: exit 0 or 2, every file reported, never a traceback."""
    by_op: dict[str, list[str]] = {}
    for ops, text in _mutants(MUTANTS):
        by_op.setdefault(ops.split("+")[0], []).append(text)
    chosen = [texts[k] for k in range(2) for texts in by_op.values() if len(texts) > k]
    chosen = chosen[:THROUGH_CLI]
    assert len(chosen) >= THROUGH_CLI
    paths = []
    for i, text in enumerate(chosen):
        paths.append(campaign_dir / f"cli-{i}.yaml")
        _write(paths[-1], text)
    env = {"STORYFLOW_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"}
    for batch in (paths[k:k + 4] for k in range(0, len(paths), 4)):
        result = subprocess.run(
            [sys.executable, "-m", "storyflow", "validate", "--format", "json", *map(str, batch)],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )
        assert result.returncode in (0, 2), result.stderr
        assert "Traceback" not in result.stderr
        assert "internal error" not in result.stderr
        files = json.loads(result.stdout)["files"]
        assert [f["file"] for f in files] == [str(p) for p in batch]


# --------------------------------------------------------------------------- deep and huge

def _deep_flow(n: int) -> str:
    return "[" * n + "1" + "]" * n


DEEP_CASES: dict[str, Callable[[int], str]] = {
    "flow sequences": lambda n: f"config:\n  k: {_deep_flow(n)}\n",
    "flow mappings": lambda n: "config:\n  k: " + "{a: " * n + "1" + "}" * n + "\n",
    "block sequences": lambda n: "config:\n  k:\n    " + "- " * n + "x\n",
    "block mappings": lambda n: "config:\n  k:\n" + "".join(
        " " * (i + 3) + "a:\n" for i in range(n)) + " " * (n + 3) + "x\n",
}
"""Shapes of ``n`` lists or mappings under ``config.k``: with the top-level mapping and
``config``, the file nests n + 2 deep."""
HEAD = "apiVersion: storyflow/v1\nname: deep\n"
TAIL = "steps:\n  s: {uses: template, with: {template: x}}\n"


@pytest.mark.parametrize("shape", list(DEEP_CASES))
@pytest.mark.parametrize("n", [198, 199, 1000, 40000])
def test_deep_nesting_is_refused_where_it_passes_the_limit(
    tmp_path: Path, shape: str, n: int
) -> None:
    if shape == "block mappings" and n > 1000:
        n = 1000  # indentation grows with depth: 40,000 levels would be 800 MB of spaces
    path = tmp_path / "deep.yaml"
    path.write_text(HEAD + DEEP_CASES[shape](n) + TAIL, encoding="utf-8")
    problems = validate_file(path, kinds=known_kinds(), every_environment=True)
    if n + 2 <= 200:
        assert [p for p in problems if p.severity == "error"] == []
        return
    (p,) = problems
    assert p.message == "lists and mappings nested deeper than 200 levels"
    assert p.line >= 4 and p.col >= 1 and p.path.startswith("$.config.k")
    assert "at most 200 deep" in (p.hint or "")


def test_aliases_cannot_nest_past_the_limit(tmp_path: Path) -> None:
    """Each alias stands for 150 levels: the text is shallow, the data is not."""
    lines = [HEAD.rstrip("\n"), "config:", f"  l0: &l0 {_deep_flow(150)}"]
    lines += [f"  l{k}: &l{k} " + "[" * 150 + f"*l{k - 1}" + "]" * 150 for k in range(1, 4)]
    path = tmp_path / "aliases.yaml"
    path.write_text("\n".join(lines) + "\n" + TAIL, encoding="utf-8")
    (p,) = validate_file(path)
    assert "YAML aliases nest this file deeper than 200 levels" in p.message
    assert p.path.startswith("$.config.l1")


def test_huge_values_validate(tmp_path: Path) -> None:
    """A 4 MB prompt, 20,000 config keys, a 1 MB line of junk: answers, in seconds."""
    started = time.perf_counter()
    big = tmp_path / "big.yaml"
    big.write_text(HEAD + "config:\n  text: '" + "a" * 4_000_000 + "'\n"
                   + "".join(f"  k{i}: {i}\n" for i in range(20_000)) + TAIL, encoding="utf-8")
    assert validate_file(big, kinds=known_kinds(), every_environment=True) == []
    junk = tmp_path / "junk.yaml"
    junk.write_text(HEAD + "steps: " + "}{][,:" * 200_000 + "\n", encoding="utf-8")
    problems = validate_file(junk)
    assert problems and all(p.severity == "error" for p in problems)
    assert time.perf_counter() - started < 20
