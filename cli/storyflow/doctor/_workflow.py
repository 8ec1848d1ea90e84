"""Checks of a workflow file: it validates, and each agent it uses can work."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storyflow.doctor._check import Check, Target, literal
from storyflow.doctor._executor import executor_checks
from storyflow.doctor._llm import Endpoints, llm_checks, secrets_check

_PROBLEMS_SHOWN = 3
_CONFIG_KEYS = {
    "python": ("callable",),
    "command": ("run", "cwd"),
    "llm": ("base_url", "model"),
    "workflow": ("path",),
    "builtin/grammar": ("grammar",),
}
"""Per agent kind, the ``with`` keys its checks read."""


@dataclass
class _Context:
    folder: Path
    """The workflow's folder: python modules import from it, relative paths start there."""
    environ: Mapping[str, str]
    kinds: Mapping[str, tuple[str, ...]]
    endpoints: Endpoints = field(default_factory=dict)


def workflow_checks(
    file: Path,
    *,
    environment: str | None,
    environ: Mapping[str, str],
    kinds: Mapping[str, tuple[str, ...]],
    executor: str | None = None,
) -> list[Check]:
    """The file validates (with ``environment`` applied), then each agent it uses, then
    the executor it runs on (``executor``: ``--executor``, over the file's)."""
    from storyflow.errors import InputError, WorkflowError
    from storyflow.spec import load_workflow

    try:
        wf = load_workflow(file, kinds=kinds, environment=environment)
    except WorkflowError as exc:
        errors = [p for p in exc.problems if p.severity == "error"]
        shown = "; ".join(f"{p.file}:{p.line}:{p.col}: {p.message}"
                          for p in errors[:_PROBLEMS_SHOWN])
        more = len(errors) - _PROBLEMS_SHOWN
        return [Check("workflow", "fail", shown + (f" (+{more} more)" if more > 0 else ""),
                      f"storyflow validate {file} lists every problem with a hint")]
    except InputError as exc:
        return [Check("workflow", "fail", exc.message, exc.hint or "")]
    checks = [Check("workflow", "ok", f"{file} is valid ({wf.name}, {len(wf.steps)} steps)")]
    ctx = _Context(Path(wf.path).resolve().parent, environ, kinds)
    for target in _targets(wf):
        checks += _agent_checks(target, ctx)
    for name, agent in wf.agents.items():
        if agent.secrets:
            checks.append(secrets_check(name, agent.secrets, environ))
    callables = [spec for t in _targets(wf) if t.kind == "python"
                 if (spec := literal(t.with_.get("callable"))) is not None]
    checks += executor_checks(wf.executor, executor, ctx.folder, list(dict.fromkeys(callables)))
    return checks


def _targets(wf: Any) -> Iterator[Target]:
    """Each distinct configuration of each agent: the file's agents, then as steps merge
    their ``with`` over them (a step may give the callable or the model itself)."""
    seen: dict[str, set[str]] = {}

    def target(label: str, kind: str, with_: Mapping[str, Any], secrets: tuple[str, ...],
               where: str) -> Iterator[Target]:
        keys = _CONFIG_KEYS.get(kind, ())
        config = json.dumps({k: with_.get(k) for k in keys}, sort_keys=True, default=str)
        configs = seen.setdefault(label, set())
        if config in configs:
            return
        name = label if not configs else f"{label} in {where}"
        configs.add(config)
        yield Target(name, kind, with_, secrets)

    def steps(all_steps: Any, prefix: str) -> Iterator[Target]:
        for step in all_steps:
            where = f"step {prefix}{step.id}"
            if step.loop is not None:
                yield from steps(step.loop.steps, f"{prefix}{step.id}.")
                continue
            if step.agent is not None:
                agent = wf.agents.get(step.agent)
                secrets = agent.secrets if agent is not None else ()
                yield from target(f"agent {step.agent}", step.uses or "", step.with_, secrets,
                                  where)
            elif step.uses is not None:
                yield from target(f"{where}", step.uses, step.with_, (), where)
            for fb in step.fallbacks:
                agent = wf.agents.get(fb.agent)
                yield from target(f"agent {fb.agent}", fb.uses, fb.with_,
                                  agent.secrets if agent else (), where)

    used = {s.agent for s in _all_steps(wf.steps)} | {
        fb.agent for s in _all_steps(wf.steps) for fb in s.fallbacks
    }
    for name, agent in wf.agents.items():
        if name not in used:  # defined, but no step uses it: check it as written
            yield from target(f"agent {name}", agent.uses, agent.with_, agent.secrets, "agents")
    yield from steps(wf.steps, "")


def _all_steps(all_steps: Any) -> Iterator[Any]:
    for step in all_steps:
        yield step
        if step.loop is not None:
            yield from _all_steps(step.loop.steps)


def _agent_checks(t: Target, ctx: _Context) -> list[Check]:
    if t.kind == "python":
        return [_python_agent(t, ctx.folder)]
    if t.kind == "command":
        return [_command_agent(t, ctx.folder)]
    if t.kind == "llm":
        return llm_checks(t, ctx.environ, ctx.endpoints)
    if t.kind == "workflow":
        return [_workflow_agent(t, ctx)]
    if t.kind == "builtin/grammar":
        return [_grammar_agent(t, ctx.folder)]
    if t.kind in ("template", "human"):
        return [Check(t.label, "ok", f"{t.kind}: nothing to reach")]
    return [Check(t.label, "ok", f"third-party kind {t.kind}: not checked")]


def _python_agent(t: Target, folder: Path) -> Check:
    spec = literal(t.with_.get("callable"))
    if spec is None:
        return Check(t.label, "warn", "with.callable is not a plain string: not checked")
    module_name, _, attr_path = spec.partition(":")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        return Check(t.label, "fail", f"cannot import {module_name!r} for {spec!r}: {exc}",
                     f"put {module_name.replace('.', '/')}.py in {folder}, or install it")
    except Exception as exc:
        return Check(t.label, "fail", f"importing {module_name!r} raised "
                     f"{type(exc).__name__}: {exc}", "fix the module; it runs when imported")
    missing = object()
    for part in attr_path.split(".") if attr_path else ():
        obj = getattr(obj, part, missing)
        if obj is missing:
            return Check(t.label, "fail", f"module {module_name!r} has no {attr_path!r}",
                         "check the name after the colon in with.callable")
    if not callable(obj):
        return Check(t.label, "fail", f"{spec} is a {type(obj).__name__}, not a callable",
                     'with.callable names a function: "module:function"')
    return Check(t.label, "ok", f"{spec} imports and is callable")


def _command_agent(t: Target, folder: Path) -> Check:
    run = t.with_.get("run")
    if isinstance(run, str):
        shell = shutil.which("sh")
        if shell is None:
            return Check(t.label, "fail", "a string `run` needs sh, which is not on PATH",
                         "install a POSIX shell, or give `run` as an argv list")
        return Check(t.label, "ok", f"shell command, sh at {shell}")
    if not isinstance(run, list) or not run:
        return Check(t.label, "fail", "with.run is missing", "give run: [argv...] or a string")
    argv0 = literal(run[0])
    if argv0 is None:
        return Check(t.label, "warn", "the program (run[0]) is a template: not checked")
    if os.sep in argv0 or "/" in argv0:
        cwd = literal(t.with_.get("cwd"))
        path = (folder / (cwd or "") / argv0).resolve()
        if not path.is_file():
            return Check(t.label, "fail", f"{argv0} not found ({path})",
                         "fix the path in with.run (relative to the workflow's folder)")
        if not os.access(path, os.X_OK):
            return Check(t.label, "fail", f"{path} is not executable", f"chmod +x {path}")
        return Check(t.label, "ok", f"{argv0} is executable")
    found = shutil.which(argv0)
    if found is None:
        return Check(t.label, "fail", f"command {argv0!r} is not on PATH",
                     f"install {argv0}, or give its full path in with.run")
    return Check(t.label, "ok", f"{argv0} at {found}")


def _workflow_agent(t: Target, ctx: _Context) -> Check:
    from storyflow.spec import validate_file

    raw = literal(t.with_.get("path"))
    if raw is None:
        return Check(t.label, "warn", "with.path is not a plain string: not checked")
    path = ctx.folder / raw
    if not path.is_file():
        return Check(t.label, "fail", f"sub-workflow {raw} not found ({path})",
                     "fix with.path (relative to the workflow's folder)")
    errors = [p for p in validate_file(path, kinds=ctx.kinds) if p.severity == "error"]
    if errors:
        p = errors[0]
        return Check(t.label, "fail", f"sub-workflow {raw} is invalid: {p.file}:{p.line}:{p.col}: "
                     f"{p.message}", f"storyflow validate {path}")
    return Check(t.label, "ok", f"sub-workflow {raw} is valid")


def _grammar_agent(t: Target, folder: Path) -> Check:
    grammar = t.with_.get("grammar")
    if grammar is None:
        return Check(t.label, "ok", "the built-in default grammar")
    if isinstance(grammar, Mapping):
        return Check(t.label, "ok", "an inline grammar")
    raw = literal(grammar)
    if raw is None:
        return Check(t.label, "warn", "with.grammar is a template: not checked")
    if not (folder / raw).is_file():
        return Check(t.label, "fail", f"grammar file {raw} not found ({folder / raw})",
                     "fix with.grammar (relative to the workflow's folder)")
    return Check(t.label, "ok", f"grammar file {raw} exists")
