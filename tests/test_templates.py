"""Tests for storyflow.spec.templates: rendering, expressions, sandbox, references."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import jinja_compiles
from storyflow.errors import PermanentError
from storyflow.spec.templates import Reference, TemplateError, Templates


@pytest.fixture
def t() -> Templates:
    return Templates()


@pytest.fixture
def scope() -> dict[str, Any]:
    return {
        "inputs": {"premise": "a dragon learns to knit", "count": 3},
        "config": {"tone": "wry"},
        "steps": {
            "plot": {
                "output": {
                    "sections": [{"title": "Opening"}, {"title": "Middle"}, {"title": "End"}],
                    "meta": {"words": 1200},
                    "items": ["a", "b"],
                },
                "status": "succeeded",
                "attempts": 1,
            },
            "critique": {"output": {"score": 8, "ok": True}, "status": "succeeded"},
        },
        "item": {"name": "chapter one"},
        "index": 0,
    }


# --------------------------------------------------------------------------- rendering


class TestNativeValues:
    def test_list(self, t: Templates, scope: dict[str, Any]) -> None:
        out = t.render("{{ steps.plot.output.sections }}", scope)
        assert out == scope["steps"]["plot"]["output"]["sections"]
        assert isinstance(out, list)

    def test_dict(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ steps.plot.output.meta }}", scope) == {"words": 1200}

    def test_int(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ inputs.count }}", scope) == 3
        assert t.render("{{ inputs.count * 2 + 1 }}", scope) == 7

    def test_bool(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ steps.critique.output.ok }}", scope) is True
        assert t.render("{{ steps.critique.output.score > 9 }}", scope) is False

    def test_literal_containers(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ [inputs.count, 'x'] }}", scope) == [3, "x"]
        assert t.render("{{ {'n': inputs.count} }}", scope) == {"n": 3}

    def test_string_value_stays_a_string(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ steps.plot.output.sections[1].title }}", scope) == "Middle"

    @pytest.mark.parametrize(
        "source", ["  {{ inputs.count }}", "{{ inputs.count }}\n", "\n\t{{inputs.count}}  \n"]
    )
    def test_whitespace_around_single_expression(
        self, t: Templates, scope: dict[str, Any], source: str
    ) -> None:
        assert t.render(source, scope) == 3

    def test_whitespace_control_markers(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{- inputs.count -}}", scope) == 3

    def test_mapping_key_wins_over_method(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ steps.plot.output.items }}", scope) == ["a", "b"]
        assert t.render("{{ (steps.plot.output.items) }}", scope) == ["a", "b"]
        assert t.render("{{ steps.plot.output['items'] }}", scope) == ["a", "b"]

    def test_negative_index(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ steps.plot.output.sections[-1].title }}", scope) == "End"


class TestText:
    def test_mixed_text(self, t: Templates, scope: dict[str, Any]) -> None:
        out = t.render("Premise: {{ inputs.premise }} ({{ inputs.count }})", scope)
        assert out == "Premise: a dragon learns to knit (3)"

    def test_two_expressions_are_text(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ inputs.count }} and {{ inputs.count }}", scope) == "3 and 3"
        assert t.render("{{ inputs.count }}{{ inputs.count }}", scope) == "33"

    def test_statement_is_text(self, t: Templates, scope: dict[str, Any]) -> None:
        src = "{% for s in steps.plot.output.sections %}{{ s.title }};{% endfor %}"
        assert t.render(src, scope) == "Opening;Middle;End;"
        assert t.render("{% if true %}{{ inputs.count }}{% endif %}", scope) == "3"

    def test_braces_inside_a_string_literal(self, t: Templates) -> None:
        assert t.render('{{ "}}" }}', {}) == "}}"
        assert t.render('{{ "{{" }}', {}) == "{{"
        assert t.render("{{ '{%' }}", {}) == "{%"

    def test_bare_tuple_falls_back_to_text(self, t: Templates) -> None:
        assert t.render("{{ 1, 2 }}", {}) == "(1, 2)"

    def test_trailing_newline_kept(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("x {{ inputs.count }}\n", scope) == "x 3\n"

    def test_plain_string_unchanged(self, t: Templates) -> None:
        s = "no markers here, not even {# a comment #}"
        assert t.render(s, {}) is s
        assert t.cache_size() == 0

    def test_filters(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ inputs.premise | upper }}", scope) == "A DRAGON LEARNS TO KNIT"
        assert t.render("{{ inputs.premise | wordcount }}", scope) == 5
        assert t.render('{{ "don\'t stop" | wordcount }}', scope) == 2
        assert t.render("{{ steps.plot.output.meta | tojson }}", scope) == '{"words": 1200}'
        assert t.render("{{ {'b': 'é', 'a': '<'} | tojson }}", {}) == '{"b": "é", "a": "<"}'
        assert t.render("{{ '[1, {\"a\": 2}]' | fromjson }}", {}) == [1, {"a": 2}]
        assert t.render("{{ inputs.missing | default('none') }}", scope) == "none"

    def test_loop_object_inside_template(self, t: Templates) -> None:
        src = "{% for x in xs %}{{ loop.index }}{% endfor %}"
        assert t.render(src, {"xs": ["a", "b"], "loop": {"iteration": 4}}) == "12"


class TestRecursive:
    def test_dict_and_list(self, t: Templates, scope: dict[str, Any]) -> None:
        value = {
            "prompt": "Write about {{ inputs.premise }}",
            "sections": "{{ steps.plot.output.sections }}",
            "nested": [{"n": "{{ inputs.count }}"}, "plain", 5, None, True],
            "number": 1.5,
        }
        out = t.render(value, scope)
        assert out == {
            "prompt": "Write about a dragon learns to knit",
            "sections": scope["steps"]["plot"]["output"]["sections"],
            "nested": [{"n": 3}, "plain", 5, None, True],
            "number": 1.5,
        }
        assert out is not value
        assert out["nested"] is not value["nested"]
        assert value["prompt"] == "Write about {{ inputs.premise }}"  # input untouched

    @pytest.mark.parametrize("value", [None, 3, 2.5, True, b"{{ x }}"])
    def test_non_strings_pass_through(self, t: Templates, value: object) -> None:
        assert t.render(value, {}) is value

    def test_is_template(self, t: Templates) -> None:
        assert t.is_template("{{ x }}")
        assert t.is_template("a {% if x %}b{% endif %}")
        assert not t.is_template("plain {# comment #}")
        assert not t.is_template(3)
        assert not t.is_template(["{{ x }}"])


# --------------------------------------------------------------------------- expressions


class TestEvaluate:
    @pytest.mark.parametrize(
        "expr",
        [
            "steps.critique.output.score >= 8",
            "{{ steps.critique.output.score >= 8 }}",
            "  {{ steps.critique.output.score >= 8 }}\n",
            "steps.critique.output.ok",
            "{{ steps.critique.output.ok }}",
            "steps.plot.status == 'succeeded' and inputs.count > 2",
        ],
    )
    def test_true(self, t: Templates, scope: dict[str, Any], expr: str) -> None:
        assert t.evaluate(expr, scope) is True

    def test_native_values(self, t: Templates, scope: dict[str, Any]) -> None:
        assert (
            t.evaluate("steps.plot.output.sections", scope)
            == (scope["steps"]["plot"]["output"]["sections"])
        )
        assert t.evaluate("inputs.count - 3", scope) == 0
        assert t.evaluate("false", scope) is False

    @pytest.mark.parametrize("value", [True, False])
    def test_bool_passthrough(self, t: Templates, value: bool) -> None:
        assert t.evaluate(value, {}) is value

    def test_undefined(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(
            TemplateError, match=r"'steps\.critique\.output' has no attribute 'scor'"
        ):
            t.evaluate("steps.critique.output.scor > 3", scope)

    def test_syntax_error(self, t: Templates) -> None:
        with pytest.raises(TemplateError, match="syntax"):
            t.evaluate("a and", {})
        with pytest.raises(TemplateError):
            t.evaluate("{{ a }} and {{ b }}", {"a": 1, "b": 2})
        with pytest.raises(TemplateError):
            t.evaluate("", {})


# --------------------------------------------------------------------------- errors


class TestUndefined:
    def test_missing_attribute(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError) as info:
            t.render("{{ steps.plot.output.sectons }}", scope)
        err = info.value
        assert str(err) == "'steps.plot.output' has no attribute 'sectons'"
        assert err.hint == "did you mean 'sections'?"
        assert isinstance(err, PermanentError)
        assert err.__cause__ is not None

    def test_missing_input(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError, match="'inputs' has no attribute 'premis'") as info:
            t.render("Premise: {{ inputs.premis }}", scope)
        assert info.value.hint == "did you mean 'premise'?"

    def test_missing_name(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError, match="'inputz' is undefined") as info:
            t.render("{{ inputz.premise }}", scope)
        assert info.value.hint == "did you mean 'inputs'?"

    def test_missing_step(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError, match=r"'steps' has no attribute 'plto'"):
            t.render("{{ steps.plto.output }}", scope)

    def test_index_out_of_range(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError, match=r"has no item 7 \(it has 3 items\)"):
            t.render("{{ steps.plot.output.sections[7].title }}", scope)

    def test_jinja_path_gives_the_same_message(self, t: Templates, scope: dict[str, Any]) -> None:
        messages = []
        for src in ("{{ inputs.premis }}", "{{ (inputs.premis) }}", "x {{ inputs.premis }}"):
            with pytest.raises(TemplateError) as info:
                t.render(src, scope)
            messages.append(str(info.value))
        assert messages == ["'inputs' has no attribute 'premis'"] * 3

    def test_message_names_the_failing_read(self, t: Templates, scope: dict[str, Any]) -> None:
        src = "{% if steps.nope is defined %}{{ steps.nope.x }}{% endif %}{{ inputs.bad }}"
        with pytest.raises(TemplateError, match="'inputs' has no attribute 'bad'"):
            t.render(src, scope)

    def test_undefined_inside_a_literal(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError, match="'inputs' has no attribute 'nope'"):
            t.render("{{ [inputs.nope] }}", scope)
        with pytest.raises(TemplateError, match="'inputs' has no attribute 'nope'"):
            t.render("list: {{ {'k': inputs.nope} }}", scope)

    def test_runtime_errors_are_translated(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError, match="division by zero") as info:
            t.render("{{ inputs.count / 0 }}", scope)
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        with pytest.raises(TemplateError):
            t.render("{{ 'not json' | fromjson }}", {})
        with pytest.raises(TemplateError):
            t.render("{{ inputs.premise + 1 }}", scope)

    def test_runtime_error_lineno(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError) as info:
            t.render("line one\n{{ inputs.nope }}\nline three", scope)
        assert info.value.lineno == 2


class TestSyntax:
    SOURCE = "Title: {{ inputs.premise }}\nBody: {{ inputs.premise + }}\nEnd."

    def test_render_syntax_error_lineno(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError) as info:
            t.render(self.SOURCE, scope)
        assert info.value.lineno == 2
        assert "syntax error" in str(info.value)

    def test_check(self, t: Templates) -> None:
        err = t.check(self.SOURCE)
        assert isinstance(err, TemplateError)
        assert err.lineno == 2
        assert t.check("Title: {{ inputs.premise }}\nok") is None
        assert t.check("plain text") is None
        assert t.check("{% for x in y %}") is not None

    def test_check_single_expression_lineno(self, t: Templates) -> None:
        err = t.check("\n\n  {{ a + }}")
        assert err is not None and err.lineno == 3

    def test_check_expression(self, t: Templates) -> None:
        assert t.check("steps.a.output.ok and inputs.x > 1", expression=True) is None
        assert t.check("{{ steps.a.output.ok }}", expression=True) is None
        err = t.check("steps.a.output.ok and", expression=True)
        assert err is not None and err.lineno == 1
        assert t.check("a b", expression=True) is not None

    def test_unknown_tag(self, t: Templates) -> None:
        err = t.check("a\n{% frobnicate %}")
        assert err is not None and err.lineno == 2


class TestSandbox:
    @pytest.mark.parametrize(
        "source",
        [
            "{{ ''.__class__ }}",
            "{{ ''.__class__.__mro__ }}",
            "{{ ''.__class__.mro() }}",
            "{{ ().__class__.__bases__[0].__subclasses__() }}",
            "{{ inputs.__class__ }}",
            "{{ cycler.__init__.__globals__ }}",
            "{{ lipsum.__globals__ }}",
            "{{ namespace.__init__.__globals__['os'] }}",
            "{{ '{0.__class__}'.format(1) }}",
            "{{ self._TemplateReference__context }}",
            "x {{ ''.__class__ }} y",
            "{{ inputs.premise.__len__() }}",
        ],
    )
    def test_internals_are_unreachable(
        self, t: Templates, scope: dict[str, Any], source: str
    ) -> None:
        with pytest.raises(TemplateError):
            t.render(source, scope)

    @pytest.mark.parametrize(
        "source",
        [
            "{% include 'x' %}",
            "{% import 'x' as y %}",
            "{% from 'x' import y %}",
            "{% extends 'base' %}",
            "text\n{% include '/etc/passwd' %}",
        ],
    )
    def test_no_loader(self, t: Templates, source: str) -> None:
        with pytest.raises(TemplateError, match="cannot use"):
            t.render(source, {})
        assert t.check(source) is not None

    def test_scope_is_immutable(self, t: Templates, scope: dict[str, Any]) -> None:
        with pytest.raises(TemplateError):
            t.render("{{ steps.plot.output.sections.append(1) }}", scope)
        with pytest.raises(TemplateError):
            t.render("{% set _ = inputs.update({'count': 9}) %}", scope)
        assert len(scope["steps"]["plot"]["output"]["sections"]) == 3
        assert scope["inputs"]["count"] == 3

    def test_resource_limits(self, t: Templates) -> None:
        with pytest.raises(TemplateError):
            t.render("{{ 'a' * 100000000 }}", {})
        with pytest.raises(TemplateError):
            t.render("{{ 2 ** 100000000 }}", {})
        with pytest.raises(TemplateError):
            t.render("{% for i in range(10 ** 9) %}{% endfor %}", {})
        assert t.render("{{ 'ab' * 3 }}", {}) == "ababab"
        assert t.render("{{ 2 ** 10 }}", {}) == 1024

    def test_fast_path_never_reads_object_attributes(self, t: Templates) -> None:
        class Thing:
            secret = "s"

        with pytest.raises(TemplateError):
            t.render("{{ thing.__init__ }}", {"thing": Thing()})
        # plain public attributes are left to the sandbox, which allows them
        assert t.render("{{ thing.secret }}", {"thing": Thing()}) == "s"


# --------------------------------------------------------------------------- references


class TestReferences:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("{{ steps.plot.output }}", {Reference("steps", "plot", "output")}),
            ("{{ steps['plot'].status }}", {Reference("steps", "plot", "status")}),
            ("{{ steps.plot.attempts > 1 }}", {Reference("steps", "plot", "attempts")}),
            ("{{ steps.plot.output.sections[0].title }}", {Reference("steps", "plot", "output")}),
            ("{{ steps[x] }}", {Reference("steps", None, None), Reference("x", None, None)}),
            ("{{ inputs.premise | upper }}", {Reference("inputs", "premise", None)}),
            ("{{ inputs }}", {Reference("inputs", None, None)}),
            (
                "{{ steps[inputs.which].output }}",
                {Reference("steps", None, None), Reference("inputs", "which", None)},
            ),
            (
                "A {{ item.name }} #{{ index }} after {{ previous }}",
                {
                    Reference("item", "name", None),
                    Reference("index", None, None),
                    Reference("previous", None, None),
                },
            ),
            ("{{ loop.previous.draft }}", {Reference("loop", "previous", "draft")}),
            (
                "{{ run.id }} {{ secrets.API_KEY }}",
                {
                    Reference("run", "id", None),
                    Reference("secrets", "API_KEY", None),
                },
            ),
            ("{{ env.HOME | default('x') }}", {Reference("env", "HOME", None)}),
            ("{{ steps.a.output.items() }}", {Reference("steps", "a", "output")}),
            ("{{ range(3) | list }} {{ 'x' }}", set()),
            ("plain text", set()),
            ("{# only {{ a comment }} #}", set()),
        ],
    )
    def test_cases(self, t: Templates, source: str, expected: set[Reference]) -> None:
        assert t.references(source) == expected

    def test_for_loop_locals_are_not_references(self, t: Templates) -> None:
        src = "{% for s in steps.plot.output.sections %}{{ s.title }} {{ loop.index }}{% endfor %}"
        assert t.references(src) == {Reference("steps", "plot", "output")}

    def test_loop_name_outside_a_for_is_a_reference(self, t: Templates) -> None:
        src = "{% for x in xs %}{{ loop.index }}{% endfor %}{{ loop.iteration }}"
        assert t.references(src) == {
            Reference("xs", None, None),
            Reference("loop", "iteration", None),
        }

    def test_set_macro_with_locals(self, t: Templates) -> None:
        src = (
            "{% set a = inputs.x %}{{ a.b }}"
            "{% macro m(p) %}{{ p.q }}{{ config.tone }}{% endmacro %}{{ m(item) }}"
            "{% with q = steps.w.output %}{{ q.x }}{% endwith %}"
            "{% for k, v in d.items() if v.ok %}{{ k }}{% endfor %}"
        )
        assert t.references(src) == {
            Reference("inputs", "x", None),
            Reference("config", "tone", None),
            Reference("item", None, None),
            Reference("steps", "w", "output"),
            Reference("d", "items", None),
        }

    def test_expression(self, t: Templates) -> None:
        assert t.references("steps.critique.output.score >= 8", expression=True) == {
            Reference("steps", "critique", "output")
        }
        assert t.references("{{ inputs.n }}", expression=True) == {Reference("inputs", "n", None)}

    def test_syntax_error_raises(self, t: Templates) -> None:
        with pytest.raises(TemplateError) as info:
            t.references("ok\n{{ steps. }}")
        assert info.value.lineno == 2
        with pytest.raises(TemplateError):
            t.references("a and", expression=True)


# --------------------------------------------------------------------------- caching, fast path


class TestCache:
    def test_compiled_once(self, t: Templates, scope: dict[str, Any]) -> None:
        src = "Hello {{ inputs.premise }}"
        assert t.cache_size() == 0
        first = t.render(src, scope)
        assert t.cache_size() == 1
        second = t.render(src, {**scope, "inputs": {"premise": "other"}})
        assert t.cache_size() == 1
        assert (first, second) == ("Hello a dragon learns to knit", "Hello other")

    def test_expression_compiled_once(self, t: Templates, scope: dict[str, Any]) -> None:
        for _ in range(3):
            t.evaluate("inputs.count > 2", scope)
            t.render("{{ inputs.count + 1 }}", scope)
        assert t.cache_size() == 2

    def test_check_parses_without_compiling(
        self, t: Templates, scope: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        src = "Hello {{ inputs.premise }}"
        assert t.check(src) is None
        assert t.cache_size() == 0  # validation never pays for code generation
        parses = 0
        real = t._compute_chains

        def counting(source: str, *, expression: bool) -> Any:
            nonlocal parses
            parses += 1
            return real(source, expression=expression)

        monkeypatch.setattr(t, "_compute_chains", counting)
        assert t.references(src) == {Reference("inputs", "premise", None)}
        assert parses == 0  # the tree parsed by check() is reused
        t.render(src, scope)
        assert t.cache_size() == 1

    def test_plain_reference_needs_no_jinja(self, t: Templates) -> None:
        assert t.check("{{ steps.plot.output }}") is None
        assert t.references("{{ steps.plot.output }}") == {Reference("steps", "plot", "output")}
        assert t.references("steps.a.status", expression=True) == {
            Reference("steps", "a", "status")
        }
        assert t._chain_cache == {}

    def test_fast_path_compiles_nothing(self, t: Templates, scope: dict[str, Any]) -> None:
        assert t.render("{{ steps.plot.output.sections[0].title }}", scope) == "Opening"
        assert t.evaluate("steps.critique.output.ok", scope) is True
        assert t.cache_size() == 0


_KEYS = ["a", "b", "title", "items", "keys", "count", "x_1"]
_leaves = st.one_of(
    st.integers(-5, 5), st.text(max_size=4), st.booleans(), st.none(), st.floats(allow_nan=False)
)
_data = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5),
    ),
    max_leaves=25,
)
_segment = st.one_of(
    st.sampled_from(_KEYS).map(lambda k: f".{k}"),
    st.integers(-4, 4).map(lambda i: f"[{i}]"),
)
_TEMPLATES = Templates()



@settings(max_examples=300, deadline=None)
@given(
    data=st.dictionaries(st.sampled_from(_KEYS), _data, max_size=5),
    root=st.sampled_from(["data", "data", "data", "nope"]),
    segments=st.lists(_segment, max_size=5),
    opener=st.sampled_from(["{{ ", "{{", "{{- ", "{{+"]),
    closer=st.sampled_from([" }}", "}}", " -}}", "-}}", " +}}", "+}}"]),
)
def test_fast_path_matches_jinja(
    data: dict[str, Any], root: str, segments: list[str], opener: str, closer: str
) -> None:
    """A plain path, with any of Jinja's whitespace controls around it, is accepted exactly
    when Jinja compiles it, and reads as Jinja reads it."""
    path = root + "".join(segments)
    scope = {"data": data}
    # The parentheses keep the same Jinja semantics but take the path off the fast path.
    results = []
    for source in (f"{opener}{path}{closer}", f"{opener}({path}){closer}"):
        try:
            results.append(("ok", _TEMPLATES.render(source, scope)))
        except TemplateError as exc:
            results.append(("error", str(exc)))
    assert results[0] == results[1]
    plain = f"{opener}{path}{closer}"
    accepted = jinja_compiles(plain)
    assert (_TEMPLATES.problems(plain) == []) is accepted, plain
    if not accepted:
        assert results[0][0] == "error"
        return
    try:
        expected = _TEMPLATES.evaluate(f"({path})", scope)
    except TemplateError as exc:
        assert results[0] == ("error", str(exc))
    else:
        assert results[0] == ("ok", expected)
