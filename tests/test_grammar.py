"""The Tracery grammar engine, the ``builtin/grammar`` agent, and the offline flagship.

Engine tests expand small grammars with a seeded `random.Random`; agent tests call the
agent directly with a `Call` (async code runs under ``asyncio.run``); the end-to-end
tests run ``workflows/short-story.yaml`` through the real CLI in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from conftest import WORKFLOWS
from storyflow.agents import grammar_agent, registry
from storyflow.agents.base import Call
from storyflow.agents.grammar import (
    MAX_DEPTH,
    Action,
    Grammar,
    GrammarError,
    Rule,
    Tag,
    article,
    capitalize_all,
    first_plural,
    parse,
    past,
    plural,
    possessive,
    replace,
)
from storyflow.agents.grammar_agent import GrammarAgent, seed_for
from storyflow.errors import PermanentError
from storyflow.spec.yaml_source import load_data_file

FLAGSHIP = WORKFLOWS / "short-story.yaml"
GRAMMARS = WORKFLOWS / "grammars"


def expand(data: dict[str, Any], rule: str = "#origin#", seed: int = 1) -> str:
    return Grammar.from_data(data).flatten(rule, random.Random(seed))


# -- the engine: expansion ----------------------------------------------------------------------


def test_a_bare_string_is_a_one_item_list() -> None:
    assert expand({"origin": "hello #who#", "who": "world"}) == "hello world"
    assert expand({"origin": ["only"]}) == "only"


def test_expansion_is_recursive() -> None:
    assert expand({"origin": "#a#!", "a": "<#b#>", "b": "(#c#)", "c": "deep"}) == "<(deep)>!"
    # `[#c#]` is an action, expanded for its effects only, so it leaves no text:
    assert expand({"origin": "#a#!", "a": "<#b#>", "b": "[#c#]", "c": "deep"}) == "<>!"


def test_numbers_in_a_grammar_are_text() -> None:
    assert expand({"origin": "#n# #f#", "n": 3, "f": [1.5]}) == "3 1.5"


def test_escapes_keep_special_characters() -> None:
    assert expand({"origin": r"\#tag\# and \[x\] and #a#", "a": "ok"}) == "#tag# and [x] and ok"


def test_an_empty_tag_expands_to_nothing() -> None:
    assert expand({"origin": "a##b"}) == "ab"


# -- the engine: modifiers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("cat", "cats"), ("fly", "flies"), ("day", "days"), ("box", "boxes"),
        ("church", "churches"), ("bush", "bushes"), ("buzz", "buzzes"), ("bus", "buses"),
        ("lighthouse keeper", "lighthouse keepers"), ("", ""),
    ],
)
def test_plural(word: str, expected: str) -> None:
    assert plural(word) == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("owl", "an owl"), ("cat", "a cat"), ("Apple", "an Apple"), ("hour", "an hour"),
        ("honest man", "an honest man"), ("unicorn", "a unicorn"), ("user", "a user"),
        ("European", "a European"), ("one-eyed cat", "a one-eyed cat"), ("8", "an 8"),
        ("umbrella", "an umbrella"), ("house", "a house"),
    ],
)
def test_article(word: str, expected: str) -> None:
    assert article(word) == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("bake", "baked"), ("try", "tried"), ("play", "played"), ("walk", "walked"),
        ("walk home", "walked home"), ("carry the map", "carried the map"),
    ],
)
def test_past(word: str, expected: str) -> None:
    assert past(word) == expected


def test_possessive_and_capitalize_all() -> None:
    assert possessive("Ann") == "Ann’s"
    assert possessive("James") == "James’"
    assert capitalize_all("the old customs-house door") == "The Old Customs-House Door"


def test_every_modifier_in_a_grammar() -> None:
    data = {
        "origin": "#w.capitalize#|#w.capitalizeAll#|#n.s#|#n.a#|#v.ed#|#w.uppercase#|"
        "#u.lowercase#|#p.possessive#",
        "w": "old map", "n": "owl", "v": "try", "u": "LOUD", "p": "Silas",
    }
    assert expand(data) == "Old map|Old Map|owls|an owl|tried|OLD MAP|loud|Silas’"


def test_modifiers_chain_left_to_right() -> None:
    data = {"origin": "#animal.s.capitalize# and #animal.a.uppercase#", "animal": "ibex"}
    assert expand(data) == "Ibexes and AN IBEX"


def test_an_unknown_modifier_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(GrammarError, match=r"unknown modifier \.capitalise") as info:
        Grammar.from_data({"origin": "#a.capitalise#", "a": "x"})
    assert info.value.hint == "did you mean 'capitalize'?"


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("dog of war", "dogs of war"), ("dog", "dogs"), ("fly in the ointment",
        "flies in the ointment"), ("box  of\ttricks", "boxes  of\ttricks"),
        ("  cat nap", "  cats nap"), ("", ""), ("   ", "   "),
    ],
)
def test_first_plural(phrase: str, expected: str) -> None:
    assert first_plural(phrase) == expected


def test_replace_is_literal_text() -> None:
    assert replace("a.b.c", ".", "-") == "a-b-c"
    assert replace("cost: $1", "$1", "$&") == "cost: $&"  # no patterns either side
    assert replace("banana", "an", "") == "ba"


def test_first_s_and_replace_in_a_grammar() -> None:
    data = {"origin": "#x.firstS#|#x.s#|#animal.replace(a,e)#", "x": "dog of war",
            "animal": "camel caravan"}
    assert expand(data) == "dogs of war|dog of wars|cemel cereven"


def test_replace_chains_with_other_modifiers() -> None:
    data = {
        "origin": "#animal.replace(a,e).capitalize#|#animal.capitalize.replace(C,K)#|"
        "#x.firstS.replace(war,peace).capitalizeAll#|#animal.replace(a,o).replace(o,u)#",
        "animal": "camel", "x": "dog of war",
    }
    assert expand(data) == "Cemel|Kamel|Dogs Of Peace|cumel"


@pytest.mark.parametrize(
    ("rule", "text", "expected"),
    [
        (r"#t.replace(\,,;)#", "Dover, Kent", "Dover; Kent"),  # an escaped comma
        ("#t.replace(.,!)#", "Stop. Go.", "Stop! Go!"),  # a dot needs no escape
        (r"#t.replace(\#,No. )#", r"room \#4", "room No. 4"),  # an escaped hash; spaces kept
        (r"#t.replace(\),\])#", "(a)", "(a]"),  # an escaped parenthesis and bracket
        ("#t.replace( ,)#", "a b c", "abc"),  # an empty replacement deletes
        ("#t.replace(a, e)#", "cat", "c et"),  # parameters are not stripped
        ("#t .replace(a,e) . capitalize#", "cat", "Cet"),  # names are
        ("#t.replace((,<)#", "f(x)", "f<x)"),  # '(' inside the parameters is text
    ],
)
def test_replace_parameters(rule: str, text: str, expected: str) -> None:
    assert expand({"origin": rule, "t": text}) == expected


def test_a_replace_inside_an_action_keeps_its_comma() -> None:
    # The comma between the parameters does not split the push list; the one after does.
    data = {"origin": "[w:#animal.replace(a,o)#,dog]#w# #w#", "animal": "camel"}
    assert sorted(expand(data).split()) == ["comel", "dog"]
    data = {"origin": "#[w:#animal.replace(a,o)#]story#", "story": "the #w#", "animal": "cat"}
    assert expand(data) == "the cot"


@pytest.mark.parametrize(
    ("rule", "message", "hint"),
    [
        ("#a.replace(a,e#", r"unclosed '\(' after \.replace in #a\.replace\(a,e#",
         "close the parameters with ')'"),
        ("#a.replace(a,b#c)#", r"unclosed '\(' after \.replace in #a\.replace\(a,b#",
         r"or '#' inside a parameter as \), \, or \#"),
        ("#a.replace(a)#", r"modifier \.replace\(old,new\) takes 2 parameters, got 1, in",
         "write .replace(old,new)"),
        ("#a.replace#", r"modifier \.replace\(old,new\) takes 2 parameters, got none, in "
         r"#a\.replace#$", "write .replace"),
        ("#a.replace(a,b,c)#", r"modifier \.replace\(old,new\) takes 2 parameters, got 3",
         r"as \, or \)"),
        ("#a.replace(,b)#", r"modifier \.replace\(old,new\) has an empty 'old' parameter, "
         r"in #a\.replace\(,b\)#$",
         "write .replace(old,new)"),
        ("#a.replace(a,b)x#", r"unexpected 'x' after \.replace\(\.\.\.\) in",
         "chain modifiers with '.'"),
        ("#a.s(x)#", r"modifier \.s takes no parameters, in #a\.s\(x\)#",
         "write .s without parentheses"),
        ("#a.replce(a,b)#", r"unknown modifier \.replce in", "did you mean 'replace'?"),
    ],
)
def test_a_malformed_modifier_is_an_error_with_a_hint(rule: str, message: str,
                                                      hint: str) -> None:
    with pytest.raises(GrammarError, match=f"^symbol 'origin': {message}") as info:
        Grammar.from_data({"origin": rule, "a": "x"})
    assert hint in (info.value.hint or "")


# -- the engine: actions ------------------------------------------------------------------------


def test_a_push_lasts_for_the_rest_of_the_expansion() -> None:
    data = {
        "origin": "[hero:#name#]#hero# met #friend#; #hero# again",
        "name": ["Ann", "Bo", "Cy", "Di"],
        "friend": "a friend of #hero#",
    }
    for seed in range(10):
        out = expand(data, seed=seed)
        hero = out.split(" ")[0]
        assert out == f"{hero} met a friend of {hero}; {hero} again"


def test_a_tag_preaction_lasts_only_for_its_tag() -> None:
    data = {
        "origin": "#[hero:Ann]story# / #hero#",
        "story": "#hero# sails",
        "hero": "nobody",
    }
    assert expand(data) == "Ann sails / nobody"


def test_the_documented_form_with_an_action_inside_a_tag() -> None:
    data = {"origin": "#[hero:#name#]story#", "story": "#hero#, #hero.uppercase#", "name": "Ann"}
    assert expand(data) == "Ann, ANN"


def test_pop_restores_the_previous_value() -> None:
    data = {"origin": "#x# [x:two]#x# [x:three]#x# [x:POP]#x# [x:POP]#x#", "x": "one"}
    assert expand(data) == "one two three two one"


def test_pushes_nest_and_pushed_text_is_final() -> None:
    # The inner push is expanded when the outer one is: the hero's title is fixed once.
    data = {
        "origin": "[hero:#title# #name#]#hero#; #hero#",
        "title": ["Captain", "Doctor", "Mx"],
        "name": ["Ann", "Bo", "Cy"],
    }
    for seed in range(10):
        first, second = expand(data, seed=seed).split("; ")
        assert first == second
        assert re.fullmatch(r"(Captain|Doctor|Mx) (Ann|Bo|Cy)", first)


def test_an_action_without_a_target_runs_a_rule_for_its_actions() -> None:
    data = {
        "origin": ["[#she#]#they.capitalize# took #their# map."],
        "she": "[they:she][their:her]",
    }
    assert expand(data) == "She took her map."


def test_an_action_may_push_several_alternatives() -> None:
    data = {"origin": "[c:red,green,blue]#c# #c# #c#"}
    words = expand(data).split()
    assert sorted(words) == ["blue", "green", "red"]  # one deck: each once before any repeats


def test_an_escaped_comma_stays_in_the_pushed_value() -> None:
    assert expand({"origin": r"[c:red\, very red]#c#"}) == "red, very red"


def test_pop_of_nothing_is_an_error() -> None:
    with pytest.raises(GrammarError, match=r"\[x:POP\] has nothing to pop"):
        expand({"origin": "#x#[x:POP]", "x": "one"})
    with pytest.raises(GrammarError, match=r"\[y:POP\] has nothing to pop"):
        expand({"origin": "[y:POP]"})


# -- the engine: errors ---------------------------------------------------------------------------


def test_an_unknown_symbol_names_itself_the_caller_and_the_nearest_symbol() -> None:
    data = {"origin": "#story#", "story": "#charcter# sails", "character": "Ann"}
    with pytest.raises(GrammarError) as info:
        expand(data)
    assert info.value.message == (
        "unknown symbol #charcter# (while expanding #story#); did you mean 'character'?"
    )
    assert info.value.hint == "did you mean 'character'?"


def test_runaway_recursion_stops_at_the_depth_limit() -> None:
    with pytest.raises(GrammarError, match=f"deeper than {MAX_DEPTH} levels at #loop#"):
        expand({"origin": "#loop#", "loop": "and #loop#"})
    with pytest.raises(GrammarError, match="deeper than 5 levels"):
        Grammar.from_data({"a": "#a#"}).flatten("#a#", random.Random(0), max_depth=5)


def test_an_exponential_grammar_stops_at_the_step_budget() -> None:
    data: dict[str, Any] = {f"l{i}": f"#l{i + 1}##l{i + 1}#" for i in range(20)}
    data["l20"] = "x"
    with pytest.raises(GrammarError, match="symbol expansions"):
        expand(data, "#l0#")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"origin": "#open"}, "symbol 'origin': unclosed '#'"),
        ({"origin": "[x:1"}, "symbol 'origin': unclosed '\\['"),
        ({"origin": "x]"}, "symbol 'origin': unmatched '\\]'"),
        ({"origin": "[bad name.x:1]"}, "is not a symbol name"),
        ({"origin": []}, "symbol 'origin' has no alternatives"),
        ({"origin": [{"a": 1}]}, "alternatives must be strings, not dict"),
        ({"a.b": "x"}, "bad symbol name 'a.b'"),
        (["not", "a", "mapping"], "a grammar is a mapping"),
    ],
)
def test_malformed_grammars_are_reported_when_loaded(data: Any, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        Grammar.from_data(data)


# -- the engine: randomness ---------------------------------------------------------------------

STORY = {
    "origin": "#hero.capitalize# #verb.ed# #object.a# in #place#.",
    "hero": ["the keeper", "a child", "the mayor", "an old sailor", "the baker", "a cat"],
    "verb": ["find", "bury", "carry", "lose", "mend", "steal", "open"],
    "object": ["map", "key", "owl", "letter", "hourglass", "umbrella", "oar"],
    "place": ["the fog", "the attic", "the harbour", "the chapel", "the orchard"],
}


def test_the_same_seed_gives_the_same_text() -> None:
    assert expand(STORY, seed=42) == expand(STORY, seed=42)


def test_different_seeds_give_different_texts() -> None:
    assert len({expand(STORY, seed=s) for s in range(30)}) > 20


def test_the_global_random_generator_is_never_used() -> None:
    random.seed(1234)
    before = random.getstate()
    expand(STORY, seed=3)
    assert random.getstate() == before


def test_no_alternative_repeats_twice_in_a_row() -> None:
    data = {"origin": "#x#" * 200, "x": ["a", "b"]}
    out = expand(data)
    assert "aa" not in out and "bb" not in out
    data = {"origin": "#x#" * 100, "x": list("abcde")}
    for seed in range(20):
        out = expand(data, seed=seed)
        assert all(out[i] != out[i + 1] for i in range(len(out) - 1))
        assert sorted(out[:5]) == list("abcde")  # a shuffled deck: all of them, then again


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**64))
def test_any_seed_is_deterministic_and_fully_expanded(seed: int) -> None:
    grammar = Grammar.from_data(STORY)
    first = grammar.flatten("#origin#", random.Random(seed))
    assert first == grammar.flatten("#origin#", random.Random(seed))
    assert "#" not in first and first.endswith(".") and first[0].isupper()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30))
def test_modifiers_accept_any_text(text: str) -> None:
    for fn in (plural, article, past, possessive, capitalize_all):
        assert isinstance(fn(text), str)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_characters="\\"), max_size=40))
def test_the_parser_never_crashes(text: str) -> None:
    try:
        parse(text)
    except GrammarError:
        pass


def escape(text: str) -> str:
    """``text`` as a literal modifier parameter."""
    return re.sub(r"([\\#\[\](),])", r"\\\1", text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30), x=st.text(min_size=1, max_size=8))
def test_replace_with_itself_is_the_identity(text: str, x: str) -> None:
    grammar = Grammar.from_data({"origin": f"#t.replace({escape(x)},{escape(x)})#"})
    assert grammar.with_literals({"t": [text]}).expand("origin", random.Random(0)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30), old=st.text(min_size=1, max_size=8),
       new=st.text(max_size=8))
def test_replace_in_a_grammar_is_str_replace(text: str, old: str, new: str) -> None:
    grammar = Grammar.from_data({"origin": f"#t.replace({escape(old)},{escape(new)})#"})
    out = grammar.with_literals({"t": [text]}).expand("origin", random.Random(0))
    assert out == text.replace(old, new)


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text(alphabet="abcdehsxyz", min_size=1, max_size=8), min_size=1,
                      max_size=5))
def test_first_s_pluralises_only_the_first_word(words: list[str]) -> None:
    assert first_plural(" ".join(words)) == " ".join([plural(words[0]), *words[1:]])


def test_literals_are_never_expanded() -> None:
    grammar = Grammar.from_data({"origin": "#premise#"}).with_literals(
        {"premise": ["a #strange# [premise:x]"]}
    )
    assert grammar.expand("origin", random.Random(0)) == "a #strange# [premise:x]"


# -- the agent ----------------------------------------------------------------------------------


def run(agent_call: Call) -> Any:
    return asyncio.run(GrammarAgent().run(agent_call))


def make_call(
    folder: Path,
    inputs: dict[str, Any],
    *,
    schema: dict[str, Any] | None = None,
    seed: int | None = 7,
    step_id: str = "draft",
    log: list[str] | None = None,
) -> Call:
    return Call(
        run_id="run-1", step_id=step_id, attempt=1, inputs=inputs, workflow_dir=folder,
        run_dir=folder / "run", secrets={}, timeout_s=None, output_schema=schema,
        log=log.append if log is not None else (lambda line: None), seed=seed,
    )


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    grammar_agent.clear_cache()
    yield
    grammar_agent.clear_cache()


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_the_registry_serves_the_grammar_agent() -> None:
    agent = registry.get("builtin/grammar")
    assert isinstance(agent, GrammarAgent)
    assert (agent.kind, agent.required) == ("builtin/grammar", ())


def test_a_yaml_grammar_file_relative_to_the_workflow(tmp_path: Path) -> None:
    write(tmp_path, "grammars/g.yaml", "origin: 'The #animal# sleeps.'\nanimal: [owl]\n")
    assert run(make_call(tmp_path, {"grammar": "grammars/g.yaml"})) == "The owl sleeps."


def test_a_json_grammar_file_and_a_start_symbol(tmp_path: Path) -> None:
    write(tmp_path, "g.json", json.dumps({"origin": "no", "title": "#a.capitalizeAll#",
                                          "a": "the long way"}))
    out = run(make_call(tmp_path, {"grammar": "g.json", "start": "title"}))
    assert out == "The Long Way"


def test_an_absolute_grammar_path(tmp_path: Path) -> None:
    path = write(tmp_path, "elsewhere/g.yaml", "origin: yes\n")
    assert run(make_call(tmp_path / "wf", {"grammar": str(path)})) == "yes"


def test_an_inline_grammar(tmp_path: Path) -> None:
    inputs = {"grammar": {"origin": "#[x:Ann]greet#", "greet": "Hello, #x#."}}
    assert run(make_call(tmp_path, inputs)) == "Hello, Ann."


def test_the_output_is_stripped(tmp_path: Path) -> None:
    assert run(make_call(tmp_path, {"grammar": {"origin": "  text\n\n"}})) == "text"


def test_vars_become_symbols(tmp_path: Path) -> None:
    inputs = {
        "grammar": {"origin": "#premise.capitalize# (#n#, #x#, #none#|#flag#)", "premise": "x"},
        "vars": {"premise": "a keeper finds a map", "n": 3, "x": ["only"], "none": None,
                 "flag": True},
    }
    assert run(make_call(tmp_path, inputs)) == "A keeper finds a map (3, only, |true)"


def test_list_vars_are_alternatives(tmp_path: Path) -> None:
    inputs = {"grammar": {"origin": "#c# #c# #c#"}, "vars": {"c": ["red", "green", "blue"]}}
    assert sorted(run(make_call(tmp_path, inputs)).split()) == ["blue", "green", "red"]


def test_a_var_value_is_plain_text_never_a_rule(tmp_path: Path) -> None:
    inputs = {"grammar": {"origin": "#p#"}, "vars": {"p": "issue #42 [draft]"}}
    assert run(make_call(tmp_path, inputs)) == "issue #42 [draft]"


def test_the_prompt_becomes_a_symbol(tmp_path: Path) -> None:
    inputs = {"grammar": {"origin": "Asked: #prompt#"}, "prompt": "Write a story"}
    assert run(make_call(tmp_path, inputs)) == "Asked: Write a story"


@pytest.mark.parametrize(
    ("vars_", "message"),
    [
        ({"c": {"name": "Ann"}}, r"`with.vars.c` is a dict"),
        ({"c": [["nested"]]}, r"`with.vars.c\[0\]` is a list"),
        ({"a.b": "x"}, r"`with.vars` name 'a.b' cannot be a grammar symbol"),
        ("not a mapping", r"`with.vars` must be a mapping"),
    ],
)
def test_bad_vars_are_permanent_errors(tmp_path: Path, vars_: Any, message: str) -> None:
    with pytest.raises(PermanentError, match=message) as info:
        run(make_call(tmp_path, {"grammar": {"origin": "x"}, "vars": vars_}))
    assert info.value.hint


def test_a_missing_grammar_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="cannot read grammar file") as info:
        run(make_call(tmp_path, {"grammar": "grammars/nope.yaml"}))
    assert str(tmp_path / "grammars" / "nope.yaml") in info.value.message
    assert "relative to the workflow" in (info.value.hint or "")


def test_a_grammar_file_with_bad_yaml(tmp_path: Path) -> None:
    write(tmp_path, "g.yaml", "origin: [unclosed\n")
    with pytest.raises(PermanentError, match=r"g.yaml:\d+:\d+: YAML syntax error"):
        run(make_call(tmp_path, {"grammar": "g.yaml"}))


def test_a_malformed_grammar_file_names_the_file_and_symbol(tmp_path: Path) -> None:
    write(tmp_path, "g.yaml", "origin: '#open'\n")
    with pytest.raises(PermanentError, match=r"grammar \S*g\.yaml: symbol 'origin': unclosed '#'"):
        run(make_call(tmp_path, {"grammar": "g.yaml"}))


def test_an_unknown_symbol_is_a_permanent_error_with_a_hint(tmp_path: Path) -> None:
    write(tmp_path, "g.yaml", "origin: '#hero# sails'\nheroes: [Ann]\n")
    with pytest.raises(PermanentError) as info:
        run(make_call(tmp_path, {"grammar": "g.yaml"}))
    assert info.value.message == (
        "grammar g.yaml: unknown symbol #hero# (while expanding #origin#); "
        "did you mean 'heroes'?"
    )
    assert info.value.hint == "did you mean 'heroes'?"


def test_an_unknown_start_symbol(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"start symbol #titel# is not in the grammar") as info:
        run(make_call(tmp_path, {"grammar": {"origin": "x", "title": "y"}, "start": "titel"}))
    assert info.value.hint == "did you mean 'title'?"


@pytest.mark.parametrize("spec", [42, "", ["a"]])
def test_a_bad_grammar_value(tmp_path: Path, spec: Any) -> None:
    with pytest.raises(PermanentError, match=r"with\.grammar"):
        run(make_call(tmp_path, {"grammar": spec}))


def test_without_a_grammar_the_builtin_default_writes(tmp_path: Path) -> None:
    log: list[str] = []
    out = run(make_call(tmp_path, {"prompt": "a lighthouse keeper finds a map"}, log=log))
    assert isinstance(out, str) and len(out.split()) > 10
    assert "default grammar" in log[0]
    # ...which is what an environment that switches an llm agent to this kind gets:
    out = run(make_call(tmp_path, {"model": "gpt-4o-mini", "system": "You are a novelist."}))
    assert isinstance(out, str) and out


# -- the agent: seeding -------------------------------------------------------------------------


def test_the_seed_decides_the_text(tmp_path: Path) -> None:
    inputs = {"grammar": STORY}
    same = {run(make_call(tmp_path, inputs, seed=7)) for _ in range(3)}
    assert len(same) == 1
    outputs = {run(make_call(tmp_path, inputs, seed=s)) for s in range(20)}
    assert len(outputs) > 12


def test_each_step_and_each_input_gets_its_own_text(tmp_path: Path) -> None:
    inputs = {"grammar": STORY}
    by_step = {run(make_call(tmp_path, inputs, step_id=f"s{i}")) for i in range(20)}
    assert len(by_step) > 12
    by_var = {run(make_call(tmp_path, {**inputs, "vars": {"v": i}})) for i in range(20)}
    assert len(by_var) > 12


def test_the_seed_is_a_stable_hash() -> None:
    # Not Python's salted hash(): the value is the same in every process, forever.
    assert seed_for(7, "plot", {"a": 1, "b": [2]}) == seed_for(7, "plot", {"b": [2], "a": 1})
    assert seed_for(None, "x", {}) == seed_for(0, "x", {})
    assert seed_for(7, "plot", {}) == 2298875796114943248


# -- the agent: output_schema -------------------------------------------------------------------

CHARACTER = {
    "origin": ["[#she#]", "[#he#]"],
    "she": "[they:she][name:#womanName#]",
    "he": "[they:he][name:#manName#]",
    "womanName": ["Ann", "Ilse", "Maren"],
    "manName": ["Bo", "Tobias", "Silas"],
    "want": "to find what #they# lost",
    "beat": ["a storm", "a letter", "a stranger", "a silence", "a door"],
    "title": "The #noun.capitalize#",
    "noun": ["map", "tide"],
    "label": ["north", "south"],
}


def check(schema: dict[str, Any], output: Any) -> None:
    errors = list(Draft202012Validator(schema).iter_errors(output))
    assert not errors, errors[0].message


def test_an_object_schema_reads_each_property_from_its_symbol(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "required": ["name", "they", "want"],
        "properties": {"name": {"type": "string"}, "they": {"type": "string"},
                       "want": {"type": "string"}},
    }
    for seed in range(10):
        out = run(make_call(tmp_path, {"grammar": CHARACTER}, schema=schema, seed=seed))
        check(schema, out)
        # the start symbol ran first, so the name and the pronoun agree
        women = CHARACTER["womanName"]
        assert (out["they"] == "she") == (out["name"] in women)
        assert out["want"] == f"to find what {out['they']} lost"


def test_arrays_numbers_booleans_and_enums(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "beats": {"type": "array", "items": {"type": "string"}},
            "labels": {"type": "array", "items": {"type": "string"}, "minItems": 5},
            "nouns": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "score": {"type": "integer", "minimum": 6, "maximum": 9},
            "weight": {"type": "number"},
            "draft": {"type": "boolean"},
            "mood": {"type": "string", "enum": ["wry", "eerie"]},
            "kind": {"const": "story"},
            "optional": {"type": "string"},
        },
    }
    seen: dict[str, set[Any]] = {"score": set(), "draft": set()}
    for seed in range(30):
        out = run(make_call(tmp_path, {"grammar": CHARACTER}, schema=schema, seed=seed))
        check(schema, out)
        assert len(out["beats"]) == 3 and len(set(out["beats"])) == 3  # `beat`, no repeats
        assert len(out["labels"]) == 5 and len(out["nouns"]) == 2
        assert set(out["labels"]) <= {"north", "south"} and set(out["nouns"]) == {"map", "tide"}
        assert 6 <= out["score"] <= 9 and isinstance(out["score"], int)
        assert 1 <= out["weight"] <= 10
        assert out["mood"] in ("wry", "eerie") and out["kind"] == "story"
        assert "optional" not in out  # no symbol and not required: left out
        seen["score"].add(out["score"])
        seen["draft"].add(out["draft"])
    assert seen["score"] == {6, 7, 8, 9} and seen["draft"] == {True, False}


def test_an_array_of_objects(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "sections": {
                "type": "array",
                "minItems": 4,
                "items": {"type": "object", "required": ["title", "beat"],
                          "properties": {"title": {"type": "string"},
                                         "beat": {"type": "string"},
                                         "words": {"type": "integer", "minimum": 100,
                                                   "maximum": 200}}},
            }
        },
    }
    out = run(make_call(tmp_path, {"grammar": CHARACTER}, schema=schema))
    check(schema, out)
    assert len(out["sections"]) == 4
    assert all(s["title"].startswith("The ") for s in out["sections"])


def test_a_top_level_array_schema_expands_the_start_symbol(tmp_path: Path) -> None:
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 2}
    out = run(make_call(tmp_path, {"grammar": CHARACTER, "start": "label"}, schema=schema))
    assert sorted(out) == ["north", "south"]


def test_a_string_schema_gives_plain_text(tmp_path: Path) -> None:
    out = run(make_call(tmp_path, {"grammar": CHARACTER, "start": "title"},
                        schema={"type": "string"}))
    assert out in ("The Map", "The Tide")


def test_a_required_property_without_a_symbol_is_an_error(tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["plot"], "properties": {"plot": {"type": "string"}}}
    with pytest.raises(PermanentError, match=r"output_schema needs plot but the grammar has no "
                                             r"symbol #plot#") as info:
        run(make_call(tmp_path, {"grammar": CHARACTER}, schema=schema))
    assert "add a 'plot' symbol" in (info.value.hint or "")


# -- the agent: the grammar cache ---------------------------------------------------------------


def test_a_grammar_file_is_parsed_once_while_unchanged(tmp_path: Path) -> None:
    path = write(tmp_path, "g.yaml", "origin: first\n")
    first = grammar_agent.load_grammar(path)
    assert grammar_agent.load_grammar(tmp_path / "." / "g.yaml") is first
    assert list(grammar_agent.cache_info()) == [path.resolve()]
    assert run(make_call(tmp_path, {"grammar": "g.yaml"})) == "first"
    assert grammar_agent.load_grammar(path) is first

    path.write_text("origin: second one\n", encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert run(make_call(tmp_path, {"grammar": "g.yaml"})) == "second one"
    assert grammar_agent.load_grammar(path) is not first
    assert len(grammar_agent.cache_info()) == 1


def test_the_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grammar_agent, "CACHE_SIZE", 3)
    paths = [write(tmp_path, f"g{i}.yaml", f"origin: g{i}\n") for i in range(5)]
    for p in paths:
        grammar_agent.load_grammar(p)
    assert list(grammar_agent.cache_info()) == [p.resolve() for p in paths[2:]]


# -- the flagship's grammars --------------------------------------------------------------------


def _referenced(rules: tuple[Rule, ...]) -> tuple[set[str], set[str]]:
    """Symbols the rules read and symbols their actions push."""
    used: set[str] = set()
    pushed: set[str] = set()

    def walk(rule: Rule) -> None:
        for section in rule:
            if isinstance(section, Tag):
                if section.symbol:
                    used.add(section.symbol)
                for action in section.preactions:
                    act(action)
            elif isinstance(section, Action):
                act(section)

    def act(action: Action) -> None:
        if action.target is not None:
            pushed.add(action.target)
        for rule in action.rules or ():
            walk(rule)

    for rule in rules:
        walk(rule)
    return used, pushed


def _flagship_vars() -> dict[str, set[str]]:
    """Grammar file → every name a flagship step passes it (vars, start symbols)."""
    wf = load_data_file(FLAGSHIP)
    out: dict[str, set[str]] = {}
    steps = list(wf["steps"].values())
    for step in steps:  # grows: a loop's body steps are checked too
        steps.extend((step.get("loop") or {}).get("steps", {}).values())
        agent = wf["agents"].get(step.get("agent", ""), {})
        grammar = agent.get("with", {}).get("grammar")
        if grammar is not None:
            out.setdefault(grammar, set()).update(step.get("with", {}).get("vars", {}))
    return out


def test_every_flagship_grammar_refers_only_to_what_it_is_given() -> None:
    given_vars = _flagship_vars()
    assert sorted(given_vars) == sorted(f"grammars/{p.name}" for p in GRAMMARS.glob("*.yaml"))
    for rel, names in given_vars.items():
        grammar = grammar_agent.load_grammar(WORKFLOWS / rel)
        used: set[str] = set()
        pushed: set[str] = set()
        for symbol in grammar.symbols:
            u, p = _referenced(grammar.alternatives(symbol) or ())
            used |= u
            pushed |= p
        missing = used - set(grammar.symbols) - pushed - names
        assert not missing, f"{rel} reads symbols nobody defines: {sorted(missing)}"


def test_every_flagship_grammar_is_rich() -> None:
    """Most symbols offer a real choice, so seeds tell noticeably different stories."""
    for path in GRAMMARS.glob("*.yaml"):
        grammar = grammar_agent.load_grammar(path)
        counts = [len(grammar.alternatives(s) or ()) for s in grammar.symbols]
        choices = [c for c in counts if c > 1]
        assert len(choices) >= 5, path.name
        assert sum(choices) / len(choices) >= 3.5, path.name


# -- end to end: the flagship through the real CLI ----------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess[str]]


def run_flagship(cli: Runner, *args: str) -> tuple[dict[str, Any], str]:
    """Run the flagship with --json; return the run.summary event and story.md's text."""
    proc = cli("run", FLAGSHIP, "--json", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    summary = events[-1]
    assert summary["type"] == "run.summary" and summary["status"] == "succeeded"
    story = Path(summary["run_dir"]) / "story.md"
    assert story.is_file()
    return summary, story.read_text(encoding="utf-8")


def step_outputs(cli: Runner, run_id: str) -> dict[str, Any]:
    proc = cli("show", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    return {s["id"]: s["output"] for s in json.loads(proc.stdout)["steps"]}


def test_the_flagship_validates(cli: Runner) -> None:
    proc = cli("validate", FLAGSHIP)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_flagship_tells_a_whole_story_offline(cli: Runner) -> None:
    summary, story = run_flagship(cli)
    outputs = step_outputs(cli, summary["run_id"])
    character = outputs["character"]
    title = outputs["title"]

    assert len(story.split()) >= 400
    assert story.startswith(f"# {title}\n\n")
    assert summary["outputs"]["title"] == title
    assert summary["outputs"]["story"] == story
    # the names hold from the first section to the last
    sections = [outputs[s]["text"] for s in
                ("exposition", "rising_action", "climax", "falling_action", "resolution")]
    assert all(character["name"] in text for text in sections)
    assert story.count(outputs["setting"]["place"]) >= 3
    assert outputs["conflict"]["opponent_short"] in story
    assert "A lighthouse keeper finds a map" in story
    # each section opens on the image the previous one ended with
    for before, text in zip(("exposition", "rising_action", "falling_action"),
                            ("rising_action", "climax", "resolution"), strict=True):
        assert outputs[before]["thread"].lower() in outputs[text]["text"].lower()
    # the editor's loop keeps the best-scored reading; its notes close the story
    assert "Editor's note" in story and outputs["edit"]["critique"]["notes"] in story
    assert "#" not in story.replace(f"# {title}", "")  # every tag expanded

    again, story_again = run_flagship(cli)
    assert again["run_id"] != summary["run_id"]
    assert story_again == story

    _, other = run_flagship(cli, "--set", "seed=8")
    assert other != story
    assert len(other.split()) >= 400


@pytest.mark.slow
@pytest.mark.parametrize("tone", ["eerie", "hopeful", "wry"])
def test_the_flagship_honours_the_inputs(cli: Runner, tone: str) -> None:
    premise = "A clockmaker hears the sea"
    summary, story = run_flagship(cli, "-i", f"premise={premise}.", "-i", f"tone={tone}")
    assert premise in story and f"{premise}.." not in story
    assert len(story.split()) >= 400
    setting = step_outputs(cli, summary["run_id"])["setting"]
    tone_words = load_data_file(GRAMMARS / "settings.yaml")[f"{tone}Light"]
    assert setting["light"] in tone_words


MODIFIER_WORKFLOW = """\
apiVersion: storyflow/v1
name: modifiers
seed: 1
agents:
  writer: {uses: builtin/grammar, with: {grammar: g.yaml}}
steps:
  line: {agent: writer}
outputs:
  line: "{{ steps.line.output }}"
"""


def test_first_s_and_replace_through_the_cli(cli: Runner, tmp_path: Path) -> None:
    """Run a workflow whose grammar has a malformed .replace, fix the grammar, resume."""
    wf = write(tmp_path, "wf.yaml", MODIFIER_WORKFLOW)
    grammar = write(tmp_path, "g.yaml", "origin: '#beast.replace(a,e#'\nbeast: camel\n")
    proc = cli("run", wf, "--json")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["status"] == "failed"
    assert summary["error"]["message"] == (
        f"step line failed: grammar {grammar}: symbol 'origin': unclosed '(' after .replace "
        f"in #beast.replace(a,e#"
    )
    failed = [json.loads(line) for line in proc.stdout.splitlines() if '"step.failed"' in line]
    assert "close the parameters with ')'" in failed[0]["error"]["hint"]

    grammar.write_text(
        "origin: '#beast.replace(a,e).capitalize# / #beast.firstS# / "
        "#place.replace(\\,,;).replace(.,!)#'\n"
        "beast: camel of war\nplace: Dover, Kent.\n",
        encoding="utf-8",
    )
    proc = cli("resume", summary["run_id"], "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    resumed = json.loads(proc.stdout.splitlines()[-1])
    assert resumed["status"] == "succeeded"
    assert resumed["outputs"]["line"] == "Cemel of wer / camels of war / Dover; Kent!"
