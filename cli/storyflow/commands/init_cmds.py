"""`storyflow init [DIR] [--template NAME] [--force]`: scaffold a project from a template."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from storyflow.commands.app import app, guarded


@app.command()
@guarded
def init(
    directory: Path = typer.Argument(
        Path("."), help="Where to write the project (created if missing)."
    ),
    template: str = typer.Option(
        "short-story", "--template", "-t", help="short-story, novella, batch or blank."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite files that exist already."),
) -> None:
    """Write a working project: a workflow, its grammars and helpers, a README.

    Templates: short-story (planners, section writers, an editor's revise loop),
    novella (an outline, an optional approval, chapters as sub-workflows), batch
    (one short story per line of a JSONL file) and blank (one step). Existing files
    are never overwritten without --force.
    """
    from storyflow.scaffold import files_of, get, write

    chosen = get(template)
    written = write(directory, files_of(chosen, directory), force=force)
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(f"next: storyflow run {shlex.quote(str(directory / chosen.main))}")
