"""`storyflow diff`: what differs between two runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import typer

from storyflow.commands.app import app, err, guarded, pick_run, state_dir
from storyflow.errors import UsageError

FORMATS = ("text", "json", "html")


@app.command()
@guarded
def diff(
    run_a: str = typer.Argument(..., help="Run A: a run id or a unique prefix.",
                                show_default=False),
    run_b: str = typer.Argument(..., help="Run B: a run id or a unique prefix.",
                                show_default=False),
    step: str | None = typer.Option(
        None, "--step",
        help="Only this step instance, with a map's items and a loop's iterations "
        "(LOOP.STEP: that step in every iteration; LOOP#2: one iteration), listed in full; "
        "artifacts are left out.",
    ),
    fmt: str = typer.Option("text", "--format", help="text, json or html."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the diff to this file instead of stdout."
    ),
    exit_code: bool = typer.Option(
        False, "--exit-code", help="Exit 1 when the runs differ, 0 when they do not."
    ),
) -> None:
    """What differs between two runs: workflow, inputs, --set, environment, status,
    lineage (fork or replay of the other), and per step instance its status, whether
    the fork kept it or ran it again, fingerprint, request, output (a word diff of
    text, a structural diff of JSON), attempts, time, tokens and cost, with totals;
    then the files of the two run folders (artifacts).

    Text output folds runs of equal steps into one line ("N steps equal") unless
    --step is given; --format json is documented by schemas/diff.schema.json;
    --format html writes one self-contained page, changed texts in two columns.
    Exits 0 whether or not the runs differ (like git diff); with --exit-code, 1 when
    they differ (with --step: when a selected step differs). Ids and times always
    differ and do not count.
    """
    from storyflow import compare
    from storyflow.commands.inspect_cmds import as_seen
    from storyflow.spec.units import did_you_mean
    from storyflow.store import Store

    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint="use " + ", ".join(FORMATS))
    damaged: dict[tuple[str, str], Any] = {}
    with Store(state_dir()) as store:
        sides = []
        for ref in (run_a, run_b):
            record = as_seen(store, pick_run(store, ref, False))
            ids, steps = _instances(store, record, damaged)
            sides.append(compare.RunRecords(record, ids, steps))
        a, b = sides
        if step is not None and not any(
                compare.selects(step, i) for i in (*a.ids, *b.ids)):
            raise UsageError(
                f"neither run has a step {step!r}",
                hint=did_you_mean(step, {*a.ids, *b.ids}, what="steps"),
            )
        runs = store.root / "runs"  # not `run_dir`: a read makes no folder
        artifacts = () if step is not None else compare.compare_folders(
            runs / a.record.run_id, runs / b.record.run_id)
    for damage in damaged.values():
        err(f"warning: {damage.describe()}; compared as not started")
    result = compare.build_diff(a, b, artifacts=artifacts, step=step)
    if fmt == "json":
        text = json.dumps(compare.to_document(result), indent=2, ensure_ascii=False) + "\n"
    elif fmt == "html":
        text = compare.render_html(result)
    else:
        width = 100 if output is not None else shutil.get_terminal_size((100, 24)).columns
        text = compare.render_text(result, width=min(width, 160))
    if output is None:
        typer.echo(text, nl=False)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
        err(f"diff written to {output}")
    if exit_code and result.summary.differs:
        raise typer.Exit(1)


def _instances(store: Any, record: Any, damaged: dict[tuple[str, str], Any]
               ) -> tuple[list[str], Any]:
    """Every step instance of the run, read once; damaged records named in ``damaged``
    (by run and instance: a run compared with itself is warned about once)."""
    from storyflow.store import instance_records

    lost: dict[str, Any] = {}
    ids, steps = instance_records(store, record, lost)
    damaged.update({(record.run_id, k): v for k, v in lost.items()})
    return ids, steps
