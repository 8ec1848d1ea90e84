"""Templates Jinja refuses or Python cannot compile are refused by ``validate`` and ``run``
alike, quickly, at their place, with a hint and exit 2, never a traceback.

* ``{{ steps.a.output +}}``: only ``}}`` or ``-}}`` closes a ``{{ … }}``, so Jinja reads
  a ``+`` with nothing after it; the plain-reference fast path gives the same verdict.
* A reference with more than 100 segments, an expression nested more than 100 deep,
  blocks more than 40 deep, loops more than 20: Jinja compiles a template to Python,
  whose parser refuses such nesting (after seconds of code generation). Within the
  limits, a path that misses at run time fails its step with a readable error.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.exceptions import TemplateSyntaxError

from storyflow.spec.templates import (
    MAX_BLOCKS,
    MAX_LOOPS,
    MAX_NESTING,
    TemplateError,
    Templates,
)
from storyflow.spec.templates._sandbox import make_environment

Cli = Callable[..., subprocess.CompletedProcess[str]]

HEAD = """\
apiVersion: storyflow/v1
name: limits
steps:
  a: {uses: template, with: {template: "hi"}}
"""
PLUS_HINT = "only `}}` or `-}}` closes a {{ … }}: `+}}` leaves a `+` with nothing after it"
SPLIT_HINT = "split it: compute parts in earlier steps, or write simpler expressions"
PATH_HINT = "read a shorter path: pick the part out in an earlier step, or nest the data less"


def _clean(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr


def _step(name: str, source: str, key: str = "with") -> str:
    """A template step reading ``source`` (in ``with.template``, or as its ``when``)."""
    if key == "when":
        return f"  {name}:\n    uses: template\n    when: {json.dumps(source)}\n" \
               f"    with: {{template: x}}\n"
    return f"  {name}:\n    uses: template\n    with: {{template: {json.dumps(source)}}}\n"


def _errors(text: str, stderr: str, path: Path) -> list[tuple[str, str]]:
    """Each ``error:`` line of ``stderr`` with the hint under it, its place checked
    against ``text``: the line of the template's string, and the column of its quote."""
    lines = text.splitlines()
    out = []
    report = stderr.splitlines()
    for i, line in enumerate(report):
        if ": error: " not in line:
            continue
        place, message = line.split(": error: ", 1)
        lineno, col = (int(n) for n in place.removeprefix(f"{path}:").split(":"))
        assert lines[lineno - 1][col - 1] == '"', (line, lines[lineno - 1])
        hint = next((h.strip().removeprefix("hint: ") for h in report[i + 1:i + 3]
                     if h.strip().startswith("hint: ")), "")
        out.append((message, hint))
    return out


# --------------------------------------------------------------------------- `+}}`

PLUS_SOURCES = ["{{ steps.a.output +}}", "{{+ steps.a.output +}}", "{{steps.a.output+}}",
                "{{- steps.a.output | upper +}}"]


@pytest.mark.parametrize("source", PLUS_SOURCES)
def test_jinja_refuses_a_plus_before_the_closing_braces(source: str) -> None:
    """Jinja's own verdict, plain and in the sandbox storyflow renders in."""
    for env in (jinja2.Environment(), make_environment()):
        with pytest.raises(TemplateSyntaxError, match="unexpected 'end of print statement'"):
            env.parse(source)


def test_validate_and_run_refuse_a_plus_before_the_closing_braces(
    cli: Cli, write_workflow: Callable[..., Path]
) -> None:
    text = HEAD + "".join(_step(f"s{i}", src) for i, src in enumerate(PLUS_SOURCES))
    path = write_workflow(text)
    expected = [("template syntax error: unexpected 'end of print statement'", PLUS_HINT)]
    for command in ("validate", "run"):
        result = cli(command, path)
        _clean(result, 2)
        assert _errors(text, result.stderr, path) == expected * len(PLUS_SOURCES)


def test_a_plus_before_the_closing_braces_of_a_when_is_refused(
    cli: Cli, write_workflow: Callable[..., Path]
) -> None:
    text = HEAD + _step("b", "{{ steps.a.output +}}", key="when")
    path = write_workflow(text)
    for command in ("validate", "run"):
        result = cli(command, path)
        _clean(result, 2)
        [(message, _)] = _errors(text, result.stderr, path)
        assert message.startswith("template syntax error: ")


def test_whitespace_control_jinja_accepts_still_reads_plain(
    cli: Cli, write_workflow: Callable[..., Path]
) -> None:
    """``{{-``, ``{{+`` and ``-}}`` are Jinja's whitespace control: valid, values kept."""
    for source in ("{{+ steps.a.output }}", "{{- steps.a.output -}}", "{{ steps.a.output -}}"):
        for env in (jinja2.Environment(), make_environment()):
            env.parse(source)
        path = write_workflow(HEAD + _step("b", source)
                              + f"outputs:\n  got: {json.dumps(source.replace('a.', 'b.'))}\n")
        assert cli("validate", path).returncode == 0
        result = cli("run", path, "--json")
        _clean(result, 0)
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["outputs"] == {"got": "hi"}, summary


# --------------------------------------------------------------------------- nesting

def _segments(n: int) -> str:
    return "".join(f".k{i}" for i in range(n))


def _nested_fors(n: int) -> str:
    return "".join(f"{{% for i{i} in [1] %}}" for i in range(n)) + "x" + "{% endfor %}" * n


TOO_DEEP = [
    ("{{ steps.a.output" + _segments(300) + " }}",
     "template reference steps.a.output.k0… has 302 segments; a reference may have at "
     "most 100 after its name", PATH_HINT),
    ("{{ steps.a.output" + "[0]" * 300 + " }}",
     "template reference steps.a.output[0]… has 302 segments; a reference may have at "
     "most 100 after its name", PATH_HINT),
    ("part {{ steps.a.output" + _segments(99) + " }} ends",
     "template reference steps.a.output.k0… has 101 segments; a reference may have at "
     "most 100 after its name", PATH_HINT),
    ("{{ (steps.a.output" + "[-1]" * 150 + ") | length }}",
     "template reference steps.a.output[-1]… has 152 segments; a reference may have at "
     "most 100 after its name", PATH_HINT),
    ("{{ steps.a.output" + " | upper" * 300 + " }}",
     "template nests expressions (operators, filters, brackets …) more than 100 deep",
     SPLIT_HINT),
    ("{{ " + "(steps.a.output ~ " * 300 + "'x'" + ")" * 300 + " }}",
     "template nested too deeply to read (brackets, operators or blocks inside one another)",
     SPLIT_HINT),
    (_nested_fors(21) + "{{ steps.a.output }}",
     "template nests {% for %} loops more than 20 deep", SPLIT_HINT),
    ("{% if true %}" * 41 + "{{ steps.a.output }}" + "{% endif %}" * 41,
     "template nests blocks ({% if %}, {% for %} …) more than 40 deep", SPLIT_HINT),
]


def test_validate_and_run_refuse_templates_nested_too_deeply(
    cli: Cli, write_workflow: Callable[..., Path]
) -> None:
    """Every one is reported, at its string, with a hint; nothing runs."""
    text = HEAD + "".join(_step(f"s{i}", src) for i, (src, _, _) in enumerate(TOO_DEEP))
    text += _step("w", "{{ steps.a.output" + "[0]" * 300 + " }}", key="when")
    path = write_workflow(text)
    expected = [(message, hint) for _, message, hint in TOO_DEEP] + [TOO_DEEP[1][1:]]
    for command in ("validate", "run"):
        start = time.monotonic()
        result = cli(command, path)
        elapsed = time.monotonic() - start
        _clean(result, 2)
        assert _errors(text, result.stderr, path) == expected
        assert elapsed < 10, elapsed  # compiling them took seconds each, then crashed
        assert "run.started" not in result.stdout


AGENTS = """\
def nested(**kwargs):
    value = "bottom"
    for _ in range(98):
        value = {"k": value}
    return value
"""


def test_a_reference_at_the_limit_runs_and_a_miss_fails_its_step(
    cli: Cli, write_workflow: Callable[..., Path], tmp_path: Path
) -> None:
    """100 segments read their value; a long path that misses, or walks past text, fails
    its step with the read that missed, and the run ends failed (exit 1)."""
    (tmp_path / "deep_agents.py").write_text(AGENTS, encoding="utf-8")
    path = write_workflow(
        "apiVersion: storyflow/v1\nname: limits\nsteps:\n"
        '  a: {uses: python, with: {callable: "deep_agents:nested"}}\n'
        '  t: {uses: template, with: {template: "hi"}}\n'
        + _step("deepest", "{{ steps.a.output" + ".k" * 98 + " }}")
        + _step("miss", "{{ steps.a.output.x" + ".k" * 90 + " }}")
        + _step("past", "{{ steps.t.output" + _segments(98) + " }}")
        + "outputs:\n  deepest: \"{{ steps.deepest.output }}\"\n"
    )
    assert cli("validate", path).returncode == 0
    start = time.monotonic()
    result = cli("run", path, "--json")
    assert time.monotonic() - start < 10
    _clean(result, 1)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failed = {e["step"]: e["error"] for e in events if e.get("type") == "step.failed"}
    assert failed["miss"]["message"] == "'steps.a.output' has no attribute 'x'"
    assert failed["past"]["message"] == (
        "'steps.t.output' is a str and has no attribute 'k0'")
    run_id = events[-1]["run_id"]
    shown = json.loads(cli("show", run_id, "--json").stdout)
    steps = {s["id"]: s for s in shown["steps"]}
    assert steps["deepest"]["status"] == "succeeded"
    assert steps["deepest"]["output"] == "bottom"


# --------------------------------------------------------------------------- Templates

def _outcome(call: Callable[[], Any]) -> tuple[str, Any, Any]:
    try:
        return "ok", call(), None
    except TemplateError as exc:
        return "error", str(exc), exc.hint


def _deep(n: int) -> Any:
    value: Any = "bottom"
    for _ in range(n):
        value = {"k": value}
    return value


@pytest.mark.parametrize("n", [MAX_NESTING - 1, MAX_NESTING, MAX_NESTING + 1, 300, 5000])
def test_the_fast_path_and_jinja_agree_on_the_limit(n: int) -> None:
    """``{{ p }}`` (read without Jinja) and ``{{ (p) }}`` (Jinja's) accept the same paths
    and refuse the others with the same error, before reading anything, quickly."""
    path = "data" + ".k" * n
    scope = {"data": _deep(min(n, 150))}
    for form in ("{{ " + path + " }}", "{{ (" + path + ") }}", "text {{ " + path + " }}"):
        t = Templates()
        start = time.monotonic()
        problems = [(str(e), e.lineno, e.hint) for e in t.problems(form)]
        rendered = _outcome(lambda form=form, t=t: t.render(form, scope))
        evaluated = _outcome(lambda t=t: t.evaluate(path, scope))
        assert time.monotonic() - start < 1.5, form[:40]
        if n <= MAX_NESTING:
            assert problems == []
            assert rendered[0] == evaluated[0] == "ok"
            assert t.references(form) == Templates().references(f"{{{{ {path} }}}}")
        else:
            message = (f"template reference data.k.k.k… has {n} segments; a reference may "
                       "have at most 100 after its name")
            assert problems == [(message, 1, PATH_HINT)]
            assert rendered == evaluated == ("error", message, PATH_HINT)
            with pytest.raises(TemplateError, match="segments"):
                t.references(form)


def test_the_place_of_a_long_reference_is_its_line() -> None:
    path = "steps.a.output" + "[0]" * MAX_NESTING
    for source in (f"one\ntwo {{{{\n {path} }}}}", f"one\n{{{{ a }}}} {{{{\n {path} }}}}",
                   f"one\n{{{{ a }}}} {{{{\n ({path}) }}}}", f"\n\n{{{{ {path} }}}}"):
        [problem] = Templates().problems(source)
        assert problem.lineno == 3, source
        assert str(problem).endswith("(template line 3)")


@pytest.mark.parametrize(
    ("build", "limit"),
    [
        (lambda n: "{{ a" + " | lower" * n + " }}", MAX_NESTING),
        (lambda n: "{{ a" + " + 1" * n + " }}", MAX_NESTING),
        (lambda n: "{{ " + "not " * n + "a }}", MAX_NESTING),
        (lambda n: "{{ a" + "[0:1]" * (n - 1) + " }}", MAX_NESTING),
        (lambda n: "{% if a %}" * n + "x" + "{% endif %}" * n, MAX_BLOCKS),
        (lambda n: "{% for x in a recursive %}" * n + "{{ loop(x) }}" + "{% endfor %}" * n,
         MAX_LOOPS),
        (lambda n: "{% for x in a if x %}" * MAX_LOOPS + "{% macro m() %}" * (n - MAX_LOOPS)
         + "x" + "{% endmacro %}" * (n - MAX_LOOPS) + "{% endfor %}" * MAX_LOOPS, MAX_BLOCKS),
    ],
    ids=["filters", "operators", "nots", "slices", "ifs", "recursive loops", "loops, macros"],
)
def test_at_the_limit_a_template_compiles_and_past_it_is_refused(
    build: Callable[[int], str], limit: int
) -> None:
    """Python's compiler takes everything within the limits (no SyntaxError reaches a
    run), in well under a second; one more level is a TemplateError before compiling."""
    source = build(limit)
    t = Templates()
    assert t.problems(source) == []
    start = time.monotonic()
    t._template(source)
    assert time.monotonic() - start < 1.5
    past = build(limit + 1)
    [problem] = t.problems(past)
    assert f"more than {limit} deep" in str(problem)
    with pytest.raises(TemplateError, match=f"more than {limit} deep"):
        t.render(past, {"a": [1]})


def test_a_chain_jinja_parses_without_recursing_is_refused_not_a_crash() -> None:
    """``a + a + … + a`` parses as deep as it is long; every walk of it is iterative."""
    source = "{{ a" + " + a" * 20_000 + " }}"
    t = Templates()
    start = time.monotonic()
    assert [str(e) for e in t.problems(source)] == [
        "template nests expressions (operators, filters, brackets …) more than 100 deep"]
    with pytest.raises(TemplateError, match="more than 100 deep"):
        t.render(source, {"a": 1})
    with pytest.raises(TemplateError, match="more than 100 deep"):
        t.evaluate(source, {"a": 1})
    assert time.monotonic() - start < 5
