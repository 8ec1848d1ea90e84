"""Workflow files: YAML → JSON Schema → semantic checks → frozen `Workflow`.

Every problem is collected (syntax, duplicates, schema, names, cycles, templates,
agent ``with:`` keys, and each environment merged onto the file) and reported with
file:line:col, its JSON path and a hint. The raw mapping never leaves this package.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from storyflow.errors import InputError, Problem, WorkflowError
from storyflow.spec.model import Agent, Budget, Loop, Pool, RetryPolicy, Step, Workflow

if TYPE_CHECKING:
    from storyflow.spec.semantic import Analysis
    from storyflow.spec.yaml_source import Source

__all__ = [
    "Agent",
    "Budget",
    "Loop",
    "Pool",
    "Problem",
    "RetryPolicy",
    "Step",
    "Workflow",
    "load_workflow",
    "template_engine",
    "validate_file",
]

_TEMPLATES: Any = None


def template_engine() -> Any:
    """The process-wide template engine (compiles each distinct template once)."""
    global _TEMPLATES
    if _TEMPLATES is None:
        from storyflow.spec.templates import Templates

        _TEMPLATES = Templates()
    return _TEMPLATES


def validate_file(
    path: str | Path,
    *,
    kinds: Mapping[str, tuple[str, ...]] | None = None,
    environment: str | None = None,
    sets: Sequence[str] = (),
    every_environment: bool = False,
) -> list[Problem]:
    """Every problem in the file (errors and warnings), sorted by position.

    ``environment`` (or, with ``every_environment``, each environment the file
    defines) is also checked merged onto the file: its problems name it, point into
    the overlay when the value comes from there, and leave out what the file alone
    has. ``sets`` are checked the way `run` applies them.
    """
    if sets:
        try:
            load_workflow(path, kinds=kinds, environment=environment, sets=sets)
        except WorkflowError as exc:
            return exc.problems
        return []
    from storyflow.spec import environments, yaml_source

    src = yaml_source.load(path)
    problems, data, _ = _check(src, kinds, trusted=False)
    if isinstance(data, dict) and (environment is not None or every_environment):
        defined = environments.names(data)
        if environment is not None and environment not in defined:
            problems.append(
                src.problem(("environments",), f"unknown environment {environment!r}",
                            hint=_environment_hint(environment, defined), at_key=True)
            )
        else:
            which = [environment] if environment is not None else defined
            problems += environments.check(src, data, which, template_engine(), kinds, problems)
    return _dedupe(problems)


def load_workflow(
    path: str | Path,
    *,
    kinds: Mapping[str, tuple[str, ...]] | None = None,
    environment: str | None = None,
    sets: Sequence[str] = (),
    text: str | None = None,
    known_valid: Callable[[str], bool] | None = None,
    parsed: ParsedCache | None = None,
) -> Workflow:
    """Load, check and build a workflow. Raises `WorkflowError` or `InputError`.

    ``known_valid(source_hash)`` lets a caller vouch that this exact source already
    passed the JSON Schema (a resumed run, a re-run): the schema pass, the dearest
    check, is then skipped. Semantic checks always run; they also infer dependencies.
    ``parsed`` keeps the parsed data of valid files, so an unchanged file is not
    parsed again (YAML parsing is most of the cost of loading a large workflow).
    """
    from storyflow.spec import build, yaml_source

    src = yaml_source.load(path, text, parsed)
    source_hash = _source_hash(src.text, environment, sets)
    trusted = known_valid is not None and not src.problems and known_valid(source_hash)
    problems, data, analysis = _check(src, kinds, trusted=trusted)
    if any(p.severity == "error" for p in problems):
        raise WorkflowError(_dedupe(problems))
    assert isinstance(data, dict) and analysis is not None
    if environment is not None or sets:
        data, analysis = _parameterised(src, data, kinds, environment, sets, trusted=trusted)
    if parsed is not None and not src.cached and not src.problems:
        parsed.put(src.path, yaml_source.text_hash(src.text), src.data)
    return build.build(
        data,
        analysis,
        path=str(path),
        environment=environment,
        source_hash=source_hash,
    )


def _check(
    src: Source, kinds: Mapping[str, tuple[str, ...]] | None, *, trusted: bool
) -> tuple[list[Problem], dict[str, Any] | None, Analysis | None]:
    """The file's problems, its data when it is a mapping, and the semantic analysis."""
    from storyflow.spec import semantic

    problems = list(src.problems)
    data = src.data
    if data is None and not problems:
        problems.append(
            Problem("the file is empty", file=src.path, hint="start with apiVersion: storyflow/v1")
        )
    if data is not None and not isinstance(data, dict):
        problems.append(
            src.problem(
                (),
                "a workflow file must be a mapping of keys",
                hint="start with apiVersion: storyflow/v1",
            )
        )
    if not isinstance(data, dict):
        return problems, None, None
    if not trusted:
        from storyflow.spec import schema

        problems += schema.check(src, data)
    analysis = semantic.check(src, data, template_engine(), kinds)
    problems += analysis.problems
    return problems, data, analysis


def _parameterised(
    src: Source,
    data: dict[str, Any],
    kinds: Mapping[str, tuple[str, ...]] | None,
    environment: str | None,
    sets: Sequence[str],
    *,
    trusted: bool,
) -> tuple[dict[str, Any], Analysis]:
    """``data`` with ``--env``/``--set`` applied, checked again; raises `WorkflowError`."""
    from storyflow.spec import environments, schema, semantic

    merged = apply_parameters(data, environment, sets)
    # Values an environment brings are located in its overlay; --set values have no place.
    osrc = environments.OverlaySource(src, environment, data) if environment is not None else src
    after: list[Problem] = []
    if not trusted:  # an environment changes only its sections; --set may change anything
        after += (schema.check(osrc, merged) if sets
                  else schema.check_sections(osrc, merged, environments.MERGED))
    analysis = semantic.check(osrc, merged, template_engine(), kinds)
    after += analysis.problems
    if any(p.severity == "error" for p in after):
        origin = f"--env {environment}" if environment else "--set"
        raise WorkflowError(
            [replace(p, message=f"after {origin}: {p.message}") for p in _dedupe(after)]
        )
    return merged, analysis


def _environment_hint(name: str, defined: Iterable[str]) -> str:
    from storyflow.spec.units import did_you_mean

    return (did_you_mean(name, defined, what="environments")
            or "this workflow defines no environments")


class ParsedCache(Protocol):
    """Where the parsed data of valid workflow files is kept (the run store)."""

    def get(self, path: str, text_hash: str) -> Any:
        """The data parsed from ``path`` when its text hashed to ``text_hash``, else None."""
        ...

    def put(self, path: str, text_hash: str, data: Any) -> None:
        """Keep the data parsed from ``path``."""
        ...


def _source_hash(text: str, environment: str | None, sets: Sequence[str]) -> str:
    """Identifies the workflow as run: its bytes, its parameters, this storyflow."""
    from storyflow import __version__

    digest = hashlib.sha256(text.encode())
    digest.update(repr((environment, list(sets), __version__)).encode())
    return digest.hexdigest()[:16]


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[int, int, str]] = set()
    out = []
    for p in sorted(problems, key=lambda p: (p.line, p.col)):
        key = (p.line, p.col, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def apply_parameters(
    data: dict[str, Any], environment: str | None, sets: Sequence[str]
) -> dict[str, Any]:
    """Deep-merge ``environments.NAME`` and apply ``--set a.b=value``; returns a copy."""
    from storyflow.spec.environments import merge
    from storyflow.spec.yaml_source import parse_scalar

    data = copy.deepcopy(data)
    if environment is not None:
        envs = data.get("environments") or {}
        if environment not in envs:
            raise InputError(
                f"unknown environment {environment!r}", hint=_environment_hint(environment, envs)
            )
        data = merge(data, envs[environment] or {})
    for item in sets:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted.strip():
            raise InputError(
                f"--set {item!r} is not path=value", hint="for example --set config.temperature=0.2"
            )
        _set_path(data, dotted.strip(), parse_scalar(raw, f"--set {dotted.strip()}"))
    return data


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise InputError(f"--set {dotted}: {part!r} is not an index of that list")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
        elif isinstance(cur, dict):
            if last:
                cur[part] = value
            else:
                cur = cur.setdefault(part, {})
        else:
            where = ".".join(parts[:i])
            raise InputError(f"--set {dotted}: {where} is not a mapping")
