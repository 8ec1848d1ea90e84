"""Commands that read a workflow without running it: validate, graph, schema."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import typer

from storyflow.commands.app import app, err, guarded
from storyflow.errors import EXIT_USAGE, Problem, UsageError


def known_kinds() -> Mapping[str, tuple[str, ...]]:
    from storyflow.agents.registry import kinds

    return kinds()


@app.command()
@guarded
def validate(
    files: list[Path] = typer.Argument(..., help="Workflow files to check.", show_default=False),
    fmt: str = typer.Option("text", "--format", help="text, json or github (annotations)."),
    env: str | None = typer.Option(
        None, "--env", help="Check only this environment (default: every one the file defines)."
    ),
) -> None:
    """Check workflow files against the schema and semantic rules; nothing runs.

    Each environment is checked merged onto the file, as `run --env NAME` would use it.
    """
    from storyflow.spec import validate_file

    if fmt not in ("text", "json", "github"):
        raise UsageError(f"unknown format {fmt!r}", hint="use text, json or github")
    kinds = known_kinds()
    results: list[tuple[Path, list[Problem]]] = []
    for f in files:
        # An --env the file does not define is one of its problems, located at `environments:`.
        results.append((f, validate_file(f, kinds=kinds, environment=env, every_environment=True)))
    failed = any(p.severity == "error" for _, ps in results for p in ps)
    if fmt == "json":
        typer.echo(
            json.dumps(
                {
                    "valid": not failed,
                    "files": [
                        {
                            "file": str(f),
                            "valid": not any(p.severity == "error" for p in ps),
                            "problems": [_problem_json(p) for p in ps],
                        }
                        for f, ps in results
                    ],
                },
                indent=2,
            )
        )
    elif fmt == "github":
        for _, ps in results:
            for p in ps:
                level = "error" if p.severity == "error" else "warning"
                msg = _gh_data(p.message + (f" (hint: {p.hint})" if p.hint else ""))
                typer.echo(
                    f"::{level} file={_gh_property(p.file)},line={p.line},col={p.col},"
                    f"title={_gh_property('storyflow ' + p.path)}::{msg}"
                )
    else:
        for f, ps in results:
            for p in ps:
                err(p.format())
            n = sum(1 for p in ps if p.severity == "error")
            if n:
                err(f"{f}: {n} error{'s' if n != 1 else ''}")
            else:
                typer.echo(f"{f}: valid")
    if failed:
        raise typer.Exit(EXIT_USAGE)


def _gh_data(text: str) -> str:
    """Escape the message of a GitHub Actions workflow command."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: str) -> str:
    """Escape a property value (file=, title=) of a GitHub Actions workflow command."""
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")


def _problem_json(p: Problem) -> dict[str, object]:
    return {
        "file": p.file,
        "line": p.line,
        "col": p.col,
        "path": p.path,
        "message": p.message,
        "hint": p.hint,
        "severity": p.severity,
    }


@app.command()
@guarded
def graph(
    file: Path = typer.Argument(..., help="Workflow file.", show_default=False),
    fmt: str = typer.Option("mermaid", "--format", help="mermaid, dot or text."),
    env: str | None = typer.Option(None, "--env", help="Apply this environment first."),
) -> None:
    """Draw the compiled workflow: steps, dependencies, maps and loops."""
    from storyflow.engine.plan import plan
    from storyflow.spec import load_workflow
    from storyflow.ui.graph import FORMATS, render

    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint="use " + ", ".join(FORMATS))
    wf = load_workflow(file, kinds=known_kinds(), environment=env)
    typer.echo(render(plan(wf), fmt, title=wf.name), nl=False)


@app.command()
@guarded
def schema(
    name: str = typer.Argument(
        "workflow", help="workflow, or an output schema: events, show, report, runs, diff, gc."
    ),
) -> None:
    """Print a JSON Schema: the workflow file's (for editors) or an output's."""
    from storyflow.spec.schema import WORKFLOW_SCHEMA, schema_path
    from storyflow.spec.units import did_you_mean

    suffix = ".schema.json"
    # Only a name the package ships: not a path (`../x`, `/tmp/x`), nor one too long for one.
    names = sorted(p.name[: -len(suffix)]
                   for p in schema_path(WORKFLOW_SCHEMA).parent.glob(f"*{suffix}"))
    if name not in names:
        shown = name if len(name) <= 60 else f"{name[:40]}… ({len(name)} characters)"
        raise UsageError(f"no schema named {shown!r}",
                         hint=did_you_mean(name[:100], names, what="schemas"))
    typer.echo(schema_path(name + suffix).read_text(encoding="utf-8"), nl=False)
