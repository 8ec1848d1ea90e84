"""The options every command that executes a run shares (run, resume, fork, replay):
one definition each, so their spelling, defaults and help stay the same everywhere."""

from __future__ import annotations

import typer

MAX_PARALLEL = typer.Option(8, "--max-parallel", min=1, help="Steps running at once.")
JSON = typer.Option(False, "--json", help="One JSON event per line on stdout.")
NO_PROGRESS = typer.Option(False, "--no-progress", help="Plain lines, no live display.")
NO_CACHE = typer.Option(False, "--no-cache", help="Bypass the LLM call cache.")
FOLLOW = typer.Option(
    None, "--follow", help="Show this step's streamed text in full as it is written."
)
STREAM_EVENTS = typer.Option(
    False, "--stream-events", help="With --json: also the step.delta events (streamed text)."
)
EXECUTOR = typer.Option(
    None,
    "--executor",
    help="Where steps run: local, dask (a temporary local cluster) or a Dask "
    "scheduler address like tcp://HOST:8786.",
)
