"""``storyflow gc``: remove old runs, then the cache entries no run refers to.

What goes and what never does is the store's business (`storyflow.store.Store.gc`):
a run goes whole, with its sub-workflow runs; a live run, a kept run's fork parent and
the newest run of each workflow stay. This command reads the rule off the command line
and prints what went: one line per run, the runs kept against the rule, a summary.
"""

from __future__ import annotations

import json
import re
from typing import Any

import typer

from storyflow.commands.app import app, err, guarded, state_dir
from storyflow.errors import UsageError

_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])", re.ASCII)  # digits 0-9 only
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE_HINT = "give a number and a unit (s, m, h, d, w), like 90m, 12h, 30d or 2w"


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` as seconds; `UsageError` otherwise."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise UsageError(f"--older-than {text!r} is not an age", hint=_AGE_HINT)
    return float(match[1]) * _UNIT_S[match[2]]


@app.command()
@guarded
def gc(
    keep: int | None = typer.Option(
        None, "--keep", min=0, metavar="N", help="Keep the newest N runs; remove older ones."
    ),
    older_than: str | None = typer.Option(
        None, "--older-than", metavar="AGE",
        help="Remove runs unchanged for longer than AGE: 90m, 12h, 30d, 2w.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
    json_mode: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove old runs and the cache entries no run refers to.

    Give exactly one rule: --keep N keeps the newest N top-level runs, --older-than AGE
    removes the runs that have not changed (ended, been resumed) for longer than AGE. A
    run goes whole: its records, its folder (event log, artifacts) and its sub-workflow
    runs. Never removed: a run a live process holds, a run a kept fork or replay was
    made from, and the newest run of each workflow. --dry-run lists what would go.
    """
    from storyflow.store import Store

    if (keep is None) == (older_than is None):
        raise UsageError(
            "give --keep N or --older-than AGE" if keep is None
            else "give --keep N or --older-than AGE, not both",
            hint="storyflow gc --older-than 30d, or storyflow gc --keep 20; "
            "--dry-run shows what would go",
        )
    older_than_s = None if older_than is None else parse_age(older_than)
    with Store(state_dir()) as store:
        report = store.gc(keep=keep, older_than_s=older_than_s, dry_run=dry_run)
        now = store.clock()
    for damage in report.damaged:
        err(f"warning: {damage}; gc leaves it alone")
    if report.damaged:
        err("  hint: `storyflow doctor` checks the store")
    if json_mode:
        typer.echo(json.dumps(gc_document(report, now), indent=2))
        return
    typer.echo("\n".join(gc_text(report, now)))


def gc_document(report: Any, now: float) -> dict[str, Any]:
    """The ``gc --json`` object."""
    return {
        "dry_run": report.dry_run,
        "runs": [
            {
                "run_id": r.run_id, "workflow": r.workflow, "status": r.status,
                "created_at": r.created_at, "last_active": r.last_active,
                "age_s": round(max(0.0, now - r.last_active), 3),
                "children": list(r.children), "step_records": r.step_records,
                "bytes": r.bytes,
            }
            for r in report.runs
        ],
        "kept": [
            {"run_id": s.run_id, "workflow": s.workflow, "reason": s.reason,
             "detail": s.detail}
            for s in report.spared
        ],
        "recovered": list(report.recovered),
        "totals": {
            "runs": len(report.runs), "child_runs": report.child_runs,
            "step_records": report.step_records, "cache_entries": report.cache_entries,
            "bytes": report.bytes,
        },
    }


def gc_text(report: Any, now: float) -> list[str]:
    """One line per run removed (or that would be), the runs kept against the rule,
    then the summary."""
    lines: list[str] = []
    if report.recovered:
        lines.append(f"finished removing what an interrupted gc left: "
                     f"{', '.join(report.recovered)}")
    if report.runs:
        rows = [[r.run_id, r.workflow, r.status, age(now - r.last_active),
                 _children(len(r.children))] for r in report.runs]
        lines += _table(rows, ["RUN", "WORKFLOW", "STATUS", "AGE", ""])
    for s in report.spared:
        lines.append(f"kept {s.run_id} ({s.workflow}): {s.detail}")
    verb = "would remove" if report.dry_run else "removed"
    n = len(report.runs)
    summary = (
        f"{verb} {n} run{'s' if n != 1 else ''}"
        + (f" (+{_children(report.child_runs)})" if report.child_runs else "")
        + f", {report.step_records} step record{'s' if report.step_records != 1 else ''}"
        + f", {report.cache_entries} cache entr{'ies' if report.cache_entries != 1 else 'y'}"
        + f", {size(report.bytes)}"
    )
    lines.append(summary + ("; nothing was removed (--dry-run)" if report.dry_run else ""))
    return lines


def _children(n: int) -> str:
    return "" if n == 0 else f"{n} sub-workflow run{'s' if n != 1 else ''}"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def age(seconds: float) -> str:
    """A run's age for people: ``45s``, ``12m``, ``5h``, ``42d``."""
    s = max(0.0, seconds)
    if s < 60:
        return f"{int(s)}s"
    if s < 3600:
        return f"{int(s // 60)}m"
    if s < 2 * 86400:
        return f"{int(s // 3600)}h"
    return f"{int(s // 86400)}d"


def size(n: int) -> str:
    """Bytes for people: ``512 B``, ``12.3 KB``, ``3.1 MB`` (powers of 1000)."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:.1f} {unit}"
