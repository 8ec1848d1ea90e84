"""The options every command that executes a run shares (run, resume, fork, replay):
one definition each, so their spelling, defaults and help stay the same everywhere, and
`check_output_flags`, the check each of them makes of how the options combine."""

from __future__ import annotations

import typer

from storyflow.errors import UsageError

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


def check_output_flags(*, json_mode: bool, stream_events: bool) -> None:
    """Refuse ``--stream-events`` without ``--json``: it only adds events to the JSON
    output, so alone it would do nothing. Called before the command touches anything."""
    if stream_events and not json_mode:
        raise UsageError(
            "--stream-events needs --json: it adds the step.delta events to the JSON "
            "output, and without --json there is none",
            hint="add --json; or, to watch a step's text as it is written, "
            "use --follow STEP instead",
        )
