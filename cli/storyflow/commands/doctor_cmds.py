"""`storyflow doctor [FILE] [--executor E]`: health checks, each ``ok``, ``warn`` or ``fail``
with a fix."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import typer

from storyflow.commands.app import app, guarded, state_dir


@app.command()
@guarded
def doctor(
    file: Path | None = typer.Argument(
        None, help="Also check this workflow and its agents.", show_default=False
    ),
    env: str | None = typer.Option(None, "--env", help="Apply this environment first."),
    executor: str | None = typer.Option(
        None, "--executor",
        help="Check this executor instead of the workflow's: local, dask (a temporary "
        "local cluster) or a scheduler address tcp://HOST:PORT.",
    ),
    json_mode: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Health checks: Python, state dir and store; with FILE, the workflow and its agents.

    Each check is ok, warn or fail, with a fix. An LLM agent's endpoint is asked for
    its models (GET {base_url}/models, 5 s timeout). Secret values are never printed.
    On a Dask executor (the workflow's `executor:`, or --executor) the cluster is
    reached as a run reaches it: its workers, their storyflow version, and whether
    each imports every python callable.
    Exit status: 0 when no check failed (warnings allowed), 1 when any did.
    """
    from storyflow.commands.spec_cmds import known_kinds
    from storyflow.doctor import executor_checks, machine_checks, workflow_checks
    from storyflow.engine.executors import setting
    from storyflow.ui.tables import Section, print_sections

    if executor is not None:
        setting(None, executor)  # a bad value is a usage error before anything is checked
    checks = machine_checks(state_dir())
    if file is not None:
        checks += workflow_checks(file, environment=env, environ=os.environ, kinds=known_kinds(),
                                  executor=executor)
    elif executor is not None:
        checks += executor_checks(None, executor, None, [])
    failed = sum(1 for c in checks if c.status == "fail")
    if json_mode:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2, ensure_ascii=False))
    else:
        warned = sum(1 for c in checks if c.status == "warn")
        verdict = (f"{failed} failed, " if failed else "") + (
            f"{warned} warning{'s' if warned != 1 else ''}, " if warned else ""
        ) + f"{len(checks) - failed - warned} ok"
        print_sections([
            Section(
                "storyflow doctor",
                ("CHECK", "STATUS", "DETAIL", "FIX"),
                tuple((c.check, c.status, c.detail, c.fix) for c in checks),
                notes=(verdict,),
                styles={1: {"ok": "green", "warn": "yellow", "fail": "bold red"}},
            )
        ])
    if failed:
        raise typer.Exit(1)
