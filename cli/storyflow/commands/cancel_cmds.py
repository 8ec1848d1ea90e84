"""``storyflow cancel``: stop a live run that another process holds.

The request goes through the store: it is written into the run's lease, whose holder
reads it within a second (`storyflow.commands.stopping`) and stops as on SIGINT (exit
130): the run ends ``interrupted`` with the reason as its error, resumable. A run whose
holder is gone (killed, crashed, its heartbeat expired) is marked ``interrupted`` here,
after taking its lease over (which stops the commands it left running). A sub-workflow
run lives in its top-level run's process: cancelling it cancels that run.
"""

from __future__ import annotations

from typing import Any

import typer

from storyflow.commands.app import app, err, guarded, pick_run, state_dir

_POLL_S = 0.1
"""How often `cancel` looks whether the holder has stopped."""
_MARGIN_S = 5.0
"""Beyond the holder's grace period: how long `cancel` waits before giving up."""


@app.command()
@guarded
def cancel(
    run_ref: str | None = typer.Argument(None, metavar="RUN", help="Run id or unique prefix."),
    last: bool = typer.Option(False, "--last", help="The newest run."),
    reason: str | None = typer.Option(
        None, "--reason", help="Why: recorded as the run's error, shown by `show`."
    ),
) -> None:
    """Stop a live run held by another process: it ends interrupted, resumable.

    Exit 0 when the run was cancelled, 1 when it had already ended (or did not stop
    in time), 2 for an unknown run. A run whose process is gone is marked
    interrupted at once. Cancelling a sub-workflow run cancels its top-level run.
    """
    from storyflow.commands.stopping import grace_s
    from storyflow.engine.runs import top_run
    from storyflow.store import Store

    with Store(state_dir()) as store:
        record = pick_run(store, run_ref, last)
        top = top_run(store, record)
        if top.run_id != record.run_id:
            err(f"run {record.run_id} is a sub-workflow run of {top.run_id}: "
                f"cancelling {top.run_id}")
        if top.status != "running":
            err(f"run {top.run_id} has already ended: it is {top.status}; nothing to cancel")
            raise typer.Exit(1)
        request = {"reason": reason}
        status = _cancel(store, top.run_id, request, wait_s=grace_s() + _MARGIN_S)
    if status == "interrupted":
        typer.echo(f"cancelled run {top.run_id}: it is interrupted; "
                   f"continue with: storyflow resume {top.run_id}")
        return
    if status == "running":
        err(f"run {top.run_id} was asked to stop but has not stopped yet")
        err("  hint: `storyflow runs` shows when it does; or stop its process")
    else:
        err(f"run {top.run_id} ended {status} before it could be cancelled")
    raise typer.Exit(1)


def _cancel(store: Any, run_id: str, request: dict[str, Any], *, wait_s: float) -> str:
    """Cancel the top-level run ``run_id``; its status in the end (``running``: its
    holder did not stop within ``wait_s``)."""
    import time

    from storyflow.store import request_cancel

    asked = False
    deadline = time.monotonic() + wait_s
    while True:
        record = store.get_run(run_id)
        if record is None or record.status != "running":
            return "gone" if record is None else str(record.status)
        holder = store.holder(run_id)
        if holder is None or not holder.alive:
            if holder is None and asked:  # released meanwhile: its record is being closed
                time.sleep(_POLL_S)
                record = store.get_run(run_id)
                if record is not None and record.status != "running":
                    return str(record.status)
            marked = _mark_interrupted(store, run_id, request)
            if marked is not None:
                return marked
        elif not asked:
            asked = request_cancel(store, run_id, request.get("reason")) is not None
            continue
        if time.monotonic() >= deadline:
            return "running"
        time.sleep(_POLL_S)


def _mark_interrupted(store: Any, run_id: str, request: dict[str, Any]) -> str | None:
    """Take over a dead holder's lease and record the run ``interrupted`` (its event log
    told); its status then, or None if a live process holds it after all."""
    from storyflow.engine.runs import end_crashed
    from storyflow.errors import RunHeldError
    from storyflow.store import EventLog

    try:
        lease = store.acquire_lease(run_id)
    except RunHeldError:
        return None
    with lease:
        record = store.get_run(run_id)
        if record is None or record.status != "running":
            return "gone" if record is None else str(record.status)
        log = EventLog(store.run_dir(run_id) / "events.jsonl")
        try:
            end_crashed(store, record, KeyboardInterrupt(), log.write, store.clock(),
                        cancel=request)
        finally:
            log.close()
        if lease.stopped:
            err(f"stopped the commands its process left running (process groups "
                f"{', '.join(map(str, lease.stopped))})")
    ended = store.get_run(run_id)
    return "interrupted" if ended is None else str(ended.status)
