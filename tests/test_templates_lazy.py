"""jinja2 is imported on first need: plain references (``{{ steps.a.output }}``) never load it.

A workflow whose templates are all plain references, or that has none, runs and
validates without importing jinja2 (~13 ms and ~3 MB per process); the first template
that is not plain loads it, and renders exactly as before. The subprocesses run the
real CLI in-process and report which jinja2 modules ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI_TIMEOUT_S, cli_env, jinja_compiles
from storyflow.spec.templates import TemplateError, Templates

_CLI_PROBE = """\
import json, sys
sys.argv = ["storyflow", *json.loads(sys.argv[1])]
from storyflow.commands import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
jinja = sorted(m for m in sys.modules if m == "jinja2" or m.startswith("jinja2."))
print("PROBE " + json.dumps({"exit": code, "jinja2": "jinja2" in sys.modules, "modules": jinja}))
"""

_AGENTS = """\
import json
from pathlib import Path

def one(**kwargs):
    return 1

def record(n=None, **kwargs):
    with open(Path(__file__).with_name("calls.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(n) + "\\n")
    return {"got": n}
"""

_WORKFLOW = """\
apiVersion: storyflow/v1
name: lazy
steps:
  a: {uses: python, with: {callable: "agents_lazy:one"}}
  b:
    uses: python
    when: "{{ steps.a.output }}"
    with: {callable: "agents_lazy:record", n: B}
  c:
    uses: python
    when: steps.b.output.got
    with: {callable: "agents_lazy:record", n: "{{ steps.b.output.got }}"}
outputs:
  final: "{{ steps.c.output.got }}"
"""


def _project(tmp_path: Path, n_of_b: str = '"{{ steps.a.output }}"') -> Path:
    (tmp_path / "agents_lazy.py").write_text(_AGENTS, encoding="utf-8")
    (tmp_path / "wf.yaml").write_text(_WORKFLOW.replace("n: B", f"n: {n_of_b}"),
                                      encoding="utf-8")
    return tmp_path


def _probe(cwd: Path, *args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Run ``storyflow ARGS`` in a fresh interpreter; what it reported, and the process."""
    result = subprocess.run(
        [sys.executable, "-c", _CLI_PROBE, json.dumps(args)],
        cwd=cwd,
        env=cli_env(cwd / "state"),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"no probe line\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    return json.loads(lines[-1].removeprefix("PROBE ")), result


def _calls(project: Path) -> list[Any]:
    text = (project / "calls.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------- the CLI


def test_run_of_plain_references_imports_no_jinja2(tmp_path: Path) -> None:
    project = _project(tmp_path)
    report, proc = _probe(project, "run", "wf.yaml", "--no-progress")
    assert report["exit"] == 0, proc.stdout + proc.stderr
    assert "run.succeeded" in proc.stdout
    assert _calls(project) == [1, 1]  # native values, both `when`s true
    assert report["modules"] == [] and not report["jinja2"]


def test_validate_of_plain_references_imports_no_jinja2(tmp_path: Path) -> None:
    project = _project(tmp_path)
    report, proc = _probe(project, "validate", "wf.yaml")
    assert report["exit"] == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout
    assert report["modules"] == []


def test_validate_still_finds_bad_plain_references_without_jinja2(tmp_path: Path) -> None:
    project = _project(tmp_path, '"{{ steps.nope.output }}"')
    report, proc = _probe(project, "validate", "wf.yaml")
    assert report["exit"] == 2
    assert "nope" in proc.stdout + proc.stderr
    assert report["modules"] == []


@pytest.mark.parametrize(
    ("n_of_b", "received"),
    [
        ('"{{ steps.a.output | string }}"', "1"),
        ('"n={{ steps.a.output }}"', "n=1"),
        ('"{{ steps.a.output + 1 }}"', 2),
    ],
)
def test_a_template_that_is_not_plain_loads_jinja2_and_works(
    tmp_path: Path, n_of_b: str, received: Any
) -> None:
    project = _project(tmp_path, n_of_b)
    report, proc = _probe(project, "validate", "wf.yaml")
    assert report["exit"] == 0, proc.stdout + proc.stderr
    # validate parses it (unknown filters …), unless it is text around plain references
    assert report["jinja2"] == (not n_of_b.startswith('"n='))

    report, proc = _probe(project, "run", "wf.yaml", "--no-progress")
    assert report["exit"] == 0, proc.stdout + proc.stderr
    assert report["jinja2"] and "jinja2.sandbox" in report["modules"]
    assert _calls(project) == [received, received]


def test_shell_warning_for_a_plain_reference_needs_no_jinja2(tmp_path: Path) -> None:
    # (text around it, "echo {{ … }}", is not a plain reference: Jinja parses that)
    (tmp_path / "wf.yaml").write_text(textwrap.dedent("""\
        apiVersion: storyflow/v1
        name: shell
        steps:
          a: {uses: command, with: {run: "echo date"}}
          b: {uses: command, with: {run: "{{ steps.a.output }}"}}
        """), encoding="utf-8")
    report, proc = _probe(tmp_path, "validate", "wf.yaml")
    assert report["exit"] == 0, proc.stdout + proc.stderr
    assert "{{ steps.a.output }} reaches the shell unquoted" in proc.stdout + proc.stderr
    assert report["modules"] == []

    text = (tmp_path / "wf.yaml").read_text(encoding="utf-8")
    (tmp_path / "wf.yaml").write_text(text.replace("output }}", "output | shquote }}"),
                                      encoding="utf-8")
    report, proc = _probe(tmp_path, "validate", "wf.yaml")
    assert report["exit"] == 0, proc.stdout + proc.stderr
    assert "unquoted" not in proc.stdout + proc.stderr
    assert report["jinja2"]


# --------------------------------------------------------------------------- the API

_API_PROBE = """\
import sys
from storyflow.spec.templates import (
    MAX_CACHE, MAX_EXPONENT, MAX_SEQUENCE, Reference, TemplateError, Templates, Unquoted,
)
t = Templates()
scope = {"steps": {"a": {"output": {"x": [1, {"y": 2}]}}}}
assert t.render("{{ steps.a.output.x[1].y }}", scope) == 2
assert t.render({"k": ["{{ steps.a.output.x.0 }}", "no template"], "n": 3}, scope) == {
    "k": [1, "no template"], "n": 3}
assert t.evaluate("steps.a.output.x[0]", scope) == 1
assert t.evaluate("{{ steps.a.output }}", scope) == {"x": [1, {"y": 2}]}
assert t.evaluate(True, scope) is True
assert t.problems("{{ steps.a.output }}") == [] and t.problems("plain") == []
assert t.problems("steps.a.output", expression=True) == []
assert t.check("{{ steps.b.output }}") is None
assert t.references("{{ steps.a.output.x }}") == {Reference("steps", "a", "output")}
assert t.references("steps.a", expression=True) == {Reference("steps", "a", None)}
assert t.references("plain") == set()
assert t.is_template("{{ x }}") and not t.is_template("x")
assert [u.text for u in t.unquoted_in_shell("echo {{ steps.a.output }}")] == [
    "{{ steps.a.output }}"]
assert t.cache_size() == 0
print(sorted(m for m in sys.modules if m == "jinja2" or m.startswith("jinja2.")))
"""


def test_the_plain_api_imports_no_jinja2() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _API_PROBE], capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- same results

_SCOPE: dict[str, Any] = {
    "inputs": {"premise": "a dragon", "count": 3, "tags": ["x", "y"], "none": None},
    "steps": {
        "a": {"output": 5, "status": "succeeded"},
        "plot": {"output": {"sections": [{"title": "Opening"}], "items": "K"}},
        "n": {"output": None},
        "s": {"output": "str"},
    },
    "config": {},
}

_MISSES = [
    # (path, message, hint): what Jinja gave for these before jinja2 became lazy
    ("steps.nope.output", "'steps' has no attribute 'nope'", "available: a, n, plot, s"),
    ("steps.a.nope", "'steps.a' has no attribute 'nope'", "available: output, status"),
    ("nope", "'nope' is undefined", "available: config, inputs, steps"),
    ("nope.x", "'nope' is undefined", "available: config, inputs, steps"),
    ("inputs.tags[5]", "'inputs.tags' has no item 5 (it has 2 items)", None),
    ("steps.plot.output.sections[0].titel",
     "'steps.plot.output.sections[0]' has no attribute 'titel'", "did you mean 'title'?"),
    ("steps.n.output.x", "'steps.n.output' is None, so it has no attribute 'x'", None),
    ("steps.a.output.x", "'steps.a.output' is a int and has no attribute 'x'", None),
    ("steps.s.output.x", "'steps.s.output' is a str and has no attribute 'x'", None),
]


def _outcome(call: Any) -> tuple[str, Any, Any, Any]:
    try:
        return ("ok", call(), None, None)
    except TemplateError as exc:
        return ("error", str(exc), exc.lineno, exc.hint)


@pytest.mark.parametrize(("path", "message", "hint"), _MISSES)
def test_a_plain_miss_gives_the_error_it_always_gave(
    path: str, message: str, hint: str | None
) -> None:
    t = Templates()
    expected = ("error", message, None, hint)
    assert _outcome(lambda: t.render(f"{{{{ {path} }}}}", _SCOPE)) == expected
    assert _outcome(lambda: t.evaluate(path, _SCOPE)) == expected
    assert _outcome(lambda: t.evaluate(f"{{{{ {path} }}}}", _SCOPE)) == expected
    # the same read through Jinja (parentheses keep it off the plain path)
    assert _outcome(lambda: Templates().render(f"{{{{ ({path}) }}}}", _SCOPE)) == expected
    assert _outcome(lambda: t.render(f"line1\n{{{{ {path} }}}}", _SCOPE)) == (
        "error", f"{message} (template line 2)", 2, hint)


@pytest.mark.parametrize(
    ("plain", "value"),
    [
        ("steps.a.output", 5),
        ("steps.plot.output.sections[0].title", "Opening"),
        ("steps.plot.output.sections.0", {"title": "Opening"}),
        ("steps.plot.output.items", "K"),  # the key wins over dict.items
        ("inputs.tags[-1]", "y"),
        ("inputs.none", None),
    ],
)
def test_plain_and_jinja_reads_agree(plain: str, value: Any) -> None:
    t = Templates()
    assert t.render(f"{{{{ {plain} }}}}", _SCOPE) == value
    assert t.evaluate(plain, _SCOPE) == value
    assert t._backend is None  # read without Jinja
    assert t.render(f"{{{{ ({plain}) }}}}", _SCOPE) == value
    assert t.evaluate(f"({plain})", _SCOPE) == value
    assert t.render(f"v={{{{ {plain} }}}}", _SCOPE) == f"v={value}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ steps.a.output | nofilter }}",
         ("error", "template syntax error: No filter named 'nofilter'.", 1, None)),
        ("{{ steps.a.output", ("error", "template syntax error: unexpected end of template, "
                               "expected 'end of print statement'.", 1, None)),
        ("{{ 1/0 }}", ("error", "template error: ZeroDivisionError: division by zero", None,
                       None)),
        ("{% include 'x' %}", ("error", "templates cannot use {% include %}", 1,
                               "put the text in the workflow, or pass it in through inputs "
                               "or a step")),
        ("{{ steps.a.__class__ }}", ("error", "template blocked by the sandbox: access to "
                                     "attribute '__class__' of 'dict' object is unsafe.", None,
                                     "templates may only read workflow data, not Python "
                                     "internals")),
        ("{{ [steps.nope] }}", ("error", "'steps' has no attribute 'nope'", None,
                                "available: a, n, plot, s")),
        ("{{ a, b }}", ("error", "'a' is undefined", 1, "available: config, inputs, steps")),
        ("{{ steps.a.output | string }}", ("ok", "5", None, None)),
        ("{% for x in inputs.tags %}{{ x }}{% endfor %}", ("ok", "xy", None, None)),
    ],
)
def test_templates_that_are_not_plain_behave_as_before(
    source: str, expected: tuple[str, Any, Any, Any]
) -> None:
    assert _outcome(lambda: Templates().render(source, _SCOPE)) == expected


def test_the_jinja_side_is_built_once_and_caches_as_before() -> None:
    t = Templates()
    assert t.render("{{ steps.a.output }}", _SCOPE) == 5
    assert t._backend is None and t.cache_size() == 0
    assert t.render("{{ steps.a.output + 1 }}", _SCOPE) == 6
    backend = t._backend
    assert backend is not None and t.cache_size() == 1
    assert t.render("n={{ steps.a.output }}", _SCOPE) == "n=5"
    assert t.evaluate("steps.a.output > 2", _SCOPE) is True
    assert t._backend is backend and t.cache_size() == 3
    assert t.problems("{{ x | nofilter }}")[0].message == "template uses an unknown filter " \
        "'nofilter'"
    assert t.references("{{ x.y | string }}") == t.references("{{ x.y }}")


# ------------------------------------------------------------ text of plain references


def test_validate_of_text_with_plain_references_imports_no_jinja2(tmp_path: Path) -> None:
    """`validate` checks ``"Chapter {{ steps.a.output }} ends"`` without Jinja's parser;
    a bad name in such a text is still found, at its place."""
    project = _project(tmp_path, '"part {{ steps.a.output }} of {{ steps.a.output }}"')
    report, proc = _probe(project, "validate", "wf.yaml")
    assert report["exit"] == 0, proc.stdout + proc.stderr
    assert report["modules"] == []
    project = _project(tmp_path, '"part {{ steps.nope.output }}"')
    report, proc = _probe(project, "validate", "wf.yaml")
    assert report["exit"] == 2
    assert "nope" in proc.stdout + proc.stderr and "wf.yaml:" in proc.stdout + proc.stderr


@pytest.mark.parametrize("template", ["{{ steps.a.output%s }}", "part {{ steps.a.output%s }}"])
def test_a_plain_reference_past_the_limit_is_refused_without_jinja2(
    tmp_path: Path, template: str
) -> None:
    """The fast path enforces the segment limit itself, with Jinja's side's error."""
    project = _project(tmp_path, json.dumps(template % (".k" * 101)))
    report, proc = _probe(project, "validate", "wf.yaml")
    assert report["exit"] == 2
    assert ("template reference steps.a.output.k… has 103 segments; a reference may have "
            "at most 100 after its name") in proc.stderr
    assert report["modules"] == []


_FRAGMENTS = ["text ", " +1", "}}", "{", "}", "{{ a.b }}", "{{ steps.s1.output }}",
              "{{- x[0] -}}", "{{ y.0.z }}", "{{ a | upper }}", "{% if a %}", "{% endif %}",
              "{# note #}", "{{ true }}", "{{ 'q' }}", "{{", "{{ a }", "{{{ a }}}", "\n",
              "{{ a + 1 }}", "{{ loop.index }}", "{{ a[-1] }}", "{{ a +}}", "{{+ a }}",
              "{{ b -}}", "in {{ range }}", "={{ dict.x }}", "~{{ namespace }}",
              "{{ steps.s1.output +}}", "{{-a.b+}}", "{{+ y.0.z +}}", "{{ a - }}",
              "{{ a.1.2 }}", "{{ x[ 0 ] -}}", "{{ a | nope }}", "{{ a +\n}}"]
# (a global only after text: a string that is just ``{{ range }}`` is a plain reference,
# whose `references` have always named it)


def _jinja_view(source: str) -> tuple[list[str], set[Any]] | None:
    """Problems and references as Jinja's own parse sees them (None: a syntax error)."""
    t = Templates()
    try:
        parsed = t._parsed(source, expression=False)
    except TemplateError:
        return None
    refs = {(c.root, str(c.segments[0]) if c.segments else None,
             str(c.segments[1]) if len(c.segments) > 1 else None) for c in parsed.chains}
    return [str(i) for i in parsed.issues], refs



@pytest.mark.parametrize("seed", range(4))
def test_storyflow_accepts_what_jinja_compiles_and_reads_what_it_reads(seed: int) -> None:
    """storyflow accepts a template exactly when Jinja compiles it (each fragment alone,
    then random texts of them), whether the fast path or Jinja's side reads it; a text
    the fast path takes reads exactly the references Jinja's parse finds, without Jinja."""
    import random

    rng = random.Random(seed)
    sources = [*_FRAGMENTS, *(f" {f}\n" for f in _FRAGMENTS)]
    sources += ["".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 6)))
                for _ in range(400)]
    taken = 0
    for source in sources:
        if "{{" not in source and "{%" not in source:
            continue
        t = Templates()
        problems = t.problems(source)
        accepted = jinja_compiles(source)
        assert (problems == []) is accepted, (source, problems)
        if not accepted:
            with pytest.raises(TemplateError):
                t.render(source, {"a": {"b": 1}, "steps": {"s1": {"output": 2}}})
            continue
        if t._backend is not None:
            continue  # read by Jinja's side
        taken += 1
        jinja = _jinja_view(source)
        assert jinja is not None, source
        issues, refs = jinja
        assert issues == [], source
        assert {(r.root, r.key, r.attr) for r in t.references(source)} == refs, source
    assert taken > 20


@pytest.mark.parametrize(
    ("source", "lineno"),
    [("x {{ a +}}", 1), ("x {{+a+}}", 1), ("{{ a }} and {{ b.c +}}", 1),
     ("line1\nline2 {{ steps.a.output +}}", 2)],
)
def test_a_plus_before_the_closing_braces_of_text_is_a_syntax_error(
    source: str, lineno: int
) -> None:
    """Only ``-}}`` (not ``+}}``) closes a ``{{ … }}``: validate reports what run would."""
    t = Templates()
    found = t.problems(source)
    assert [(e.lineno, e.message.split(" (template line")[0]) for e in found] == [
        (lineno, "template syntax error: unexpected 'end of print statement'")]
    with pytest.raises(TemplateError, match="end of print statement"):
        t.references(source)
    with pytest.raises(TemplateError, match="end of print statement"):
        t.render(source, {"a": 1, "b": {"c": 2}, "steps": {"a": {"output": 3}}})


def test_text_opened_with_a_plus_is_still_plain() -> None:
    t = Templates()
    assert t.problems("x {{+ a.b }} {{ c -}}") == []
    assert {(r.root, r.key) for r in t.references("x {{+ a.b }} {{ c -}}")} == {
        ("a", "b"), ("c", None)}
    assert t._backend is None


def test_a_jinja_global_in_text_is_no_reference() -> None:
    """``{{ range }}`` in text reads Jinja's global, not the scope, as Jinja's parse says."""
    from storyflow.spec.templates._plain import JINJA_GLOBALS
    from storyflow.spec.templates._sandbox import make_environment

    assert frozenset(make_environment().globals) == JINJA_GLOBALS
    t = Templates()
    source = "x {{ range }} {{ inputs.x }} {{ dict.y }} {{ lipsum }}"
    assert {(r.root, r.key, r.attr) for r in t.references(source)} == {("inputs", "x", None)}
    assert t.problems(source) == []
    assert t._backend is None
    assert _jinja_view(source) == ([], {("inputs", "x", None)})
