"""What a damaged store still says: records it cannot read, and runs it lost.

A record that does not decode, or decodes to something that is not a record, is a
`Damage`: named by its run (and step), never misread and never fatal to the records
around it. A run whose folder (``runs/<id>/``) is there but whose record is not — the
database was emptied, deleted or replaced — is a `LostRun`, described from what
survives: its folder and the first and last events of its log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeGuard

import diskcache

from storyflow.errors import StoreError
from storyflow.store._fence import Undecodable
from storyflow.store._records import RecordError, RunRecord, StepRecord

_SHOWN_IDS = 5
"""Run ids named in one error line; the rest are counted."""
_LOST_SHOWN = 10
"""Lost runs named one per line in a listing's note; the rest are counted."""
_TAIL_BYTES = 8192
"""How much of the end of an event log is read for its last event."""

LOST_HINT = (
    "the store's database ({root}/db) was emptied, deleted or replaced: the run cannot be "
    "shown or resumed, but its event log (JSON lines) can be read; `storyflow doctor` "
    "checks the store"
)
LOST_MANY_HINT = (
    "the store's database ({root}/db) was emptied, deleted or replaced: these runs cannot "
    "be shown or resumed, but their event logs (JSON lines) can be read; restore db/ from "
    "a backup if there is one; `storyflow doctor` checks the store"
)


@dataclass(frozen=True, slots=True)
class Damage:
    """A record the store holds (or its run index lists) but cannot read back."""

    run_id: str
    """The run the record belongs to."""
    step: str | None
    """The step instance, for a step record; None for the run's own record."""
    reason: str
    """Why it cannot be read: ``it does not decode: ...``, ``missing field 'status'``."""

    def describe(self) -> str:
        """One line naming the record: ``step record X of run Y is damaged (why)``."""
        if self.step is None:
            return f"run {self.run_id}: damaged record ({self.reason})"
        return f"step record {self.step} of run {self.run_id} is damaged ({self.reason})"


@dataclass(frozen=True, slots=True)
class LostRun:
    """A run folder with no record in the store: what is left of the run."""

    run_id: str
    """The folder's name: the run's id."""
    folder: Path
    """``<state dir>/runs/<id>``: its event log and artifacts."""
    log: Path | None
    """Its event log (``events.jsonl``), if the folder has one."""
    workflow: str | None
    """The workflow's name, from the log's first event."""
    started_at: float | None
    """Epoch seconds of the log's first event."""
    last_event: str | None
    """The type of the log's last event, with the status it carries if any, like
    ``run.summary (succeeded)`` or ``step.started``."""

    def describe(self) -> str:
        """``ID  WORKFLOW  started WHEN  last event TYPE  LOG``, from what is known."""
        if self.log is None:
            return f"{self.run_id}  (no event log)"
        when = ("-" if self.started_at is None
                else datetime.fromtimestamp(self.started_at).strftime("%Y-%m-%d %H:%M:%S"))
        return (f"{self.run_id}  {self.workflow or '?'}  started {when}  "
                f"last event {self.last_event or '?'}  {self.log}")


@dataclass(frozen=True, slots=True)
class RunListing:
    """Every run the store can tell of, newest first, the readable and the damaged."""

    root: Path
    """The state directory."""
    records: list[RunRecord]
    """The run records that read back, newest first."""
    damaged: list[Damage]
    """Run records that do not (and runs the index lists with no record left)."""
    lost: list[LostRun]
    """Run folders with no record at all, newest first."""

    def notes(self) -> list[tuple[str, str]]:
        """What a listing of these runs must also say: ``(warning, hint)`` pairs, one
        per damaged record and one for the lost runs; empty for a sound store."""
        out = [(f"{d.describe()}; left out of this list", _damaged_hint(self.root, d))
               for d in self.damaged[:_LOST_SHOWN]]
        if len(self.damaged) > _LOST_SHOWN:
            more = self.damaged[_LOST_SHOWN:]
            out.append((f"{len(more)} more run records are damaged: "
                        + ", ".join(d.run_id for d in more[:_SHOWN_IDS])
                        + (" ..." if len(more) > _SHOWN_IDS else ""),
                        "`storyflow doctor` checks the whole store"))
        if self.lost:
            n = len(self.lost)
            lines = [f"the store lost the records of {n} run{'s' if n != 1 else ''}; "
                     f"{'their folders survive' if n != 1 else 'its folder survives'} under "
                     f"{self.root / 'runs'}, with what {'each' if n != 1 else 'it'} holds:"]
            lines += [f"  {r.describe()}" for r in self.lost[:_LOST_SHOWN]]
            if n > _LOST_SHOWN:
                lines.append(f"  (+{n - _LOST_SHOWN} more)")
            out.append(("\n".join(lines), LOST_MANY_HINT.format(root=self.root)))
        return out


def _damaged_hint(root: Path, damage: Damage) -> str:
    log = root / "runs" / damage.run_id / "events.jsonl"
    kept = f"its event log survives: {log}; " if log.is_file() else ""
    return f"{kept}`storyflow doctor` checks the whole store"


def decode_run(run_id: str, value: Any) -> RunRecord | Damage:
    """The record stored under ``run:<run_id>``, or why it is not one."""
    if isinstance(value, Undecodable):
        return Damage(run_id, None, value.reason)
    try:
        rec = RunRecord.from_dict(value)
    except RecordError as exc:
        return Damage(run_id, None, str(exc))
    if rec.run_id != run_id:
        return Damage(run_id, None, f"it holds the record of run {rec.run_id!r}")
    return rec


def decode_step(run_id: str, instance_id: str, value: Any) -> StepRecord | Damage:
    """The record stored under ``step:<run_id>:<instance_id>``, or why it is not one."""
    if isinstance(value, Undecodable):
        return Damage(run_id, instance_id, value.reason)
    try:
        rec = StepRecord.from_dict(value)
    except RecordError as exc:
        return Damage(run_id, instance_id, str(exc))
    if rec.id != instance_id:
        return Damage(run_id, instance_id, f"it holds the record of step {rec.id!r}")
    return rec


def index_ok(index: Any) -> TypeGuard[list[list[Any]]]:
    """Whether a stored run index has its shape: ``[[created_at, run_id], ...]``."""
    return isinstance(index, list) and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], int | float)
        and isinstance(e[1], str) for e in index
    )


def listing(
    root: Path,
    index: list[list[Any]],
    read_run: Callable[[str], RunRecord | Damage | None],
) -> RunListing:
    """Every run the index lists or a folder stands for, newest first: read back,
    damaged, or lost (a folder and no record)."""
    entries: list[tuple[float, str, RunRecord | Damage]] = []
    for created, run_id in index:
        found = read_run(run_id)
        entries.append((created, run_id, found if found is not None else Damage(
            run_id, None, "the run index lists it, but its record is gone")))
    lost: list[LostRun] = []
    known = {run_id for _, run_id, _ in entries}
    for name in run_folders(root):
        if name in known:
            continue
        found = read_run(name)  # a record the run index does not list
        if found is None:
            lost.append(lost_run(root, name))
        else:
            created = found.created_at if isinstance(found, RunRecord) else 0.0
            entries.append((created, name, found))
    entries.sort(key=lambda e: (e[0], e[1]), reverse=True)
    lost.sort(key=lambda r: (r.started_at or 0.0, r.run_id), reverse=True)
    return RunListing(
        root=root,
        records=[e[2] for e in entries if isinstance(e[2], RunRecord)],
        damaged=[e[2] for e in entries if isinstance(e[2], Damage)],
        lost=lost,
    )


def rebuilt_index(
    cache: diskcache.Cache, read_run: Callable[[str], RunRecord | Damage | None]
) -> list[list[Any]]:
    """The run index as the run records say, for a damaged index (not saved here; the
    next new run saves it). A damaged record sorts first."""
    index: list[list[Any]] = []
    for key in cache.iterkeys():  # in key order: the run:* keys come together
        if not isinstance(key, str) or key < "run:":
            continue
        if not key.startswith("run:"):
            break
        found = read_run(key[len("run:"):])
        index.append([found.created_at if isinstance(found, RunRecord) else 0.0,
                      key[len("run:"):]])
    index.sort()
    return index


def damaged_error(root: Path, damage: Damage, hint: str = "") -> StoreError:
    """The error for a command that needs a record that does not read back."""
    return StoreError(damage.describe(), hint=hint or _damaged_hint(root, damage))


def lost_error(
    root: Path, ref: str, known: set[str], read_run: Callable[[str], RunRecord | Damage | None]
) -> StoreError | None:
    """The error for ``ref`` naming a run folder whose record the store lost, or None."""
    names = [n for n in run_folders(root) if n.startswith(ref) and n not in known]
    lost = [n for n in names if read_run(n) is None]
    if not lost:
        return None
    if len(lost) > 1 and ref not in lost:
        shown = ", ".join(lost[:_SHOWN_IDS]) + (
            f" (+{len(lost) - _SHOWN_IDS} more)" if len(lost) > _SHOWN_IDS else "")
        return StoreError(f"'{ref}' matches {len(lost)} runs whose records the store lost: "
                          f"{shown}", hint=LOST_MANY_HINT.format(root=root))
    run = lost_run(root, ref if ref in lost else lost[0])
    where = (f"its event log survives: {run.log}" if run.log
             else f"its folder survives: {run.folder}")
    return StoreError(f"the store has no record of run {run.run_id}: it lost it; {where}",
                      hint=LOST_HINT.format(root=root))


def run_folders(root: Path) -> list[str]:
    """The names of the run folders under ``root/runs``, sorted (oldest first for
    generated ids); empty when there is no such directory."""
    try:
        with os.scandir(root / "runs") as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def lost_run(root: Path, run_id: str) -> LostRun:
    """What the folder of a run without a record still tells of it."""
    folder = root / "runs" / run_id
    log = folder / "events.jsonl"
    if not log.is_file():
        return LostRun(run_id, folder, None, None, None, None)
    first, last = _first_and_last_events(log)
    workflow = first.get("workflow") if first else None
    ts = first.get("ts") if first else None
    kind = last.get("type") if last else None
    status = last.get("status") if last else None
    if isinstance(kind, str) and isinstance(status, str):
        kind = f"{kind} ({status})"
    return LostRun(
        run_id,
        folder,
        log,
        workflow if isinstance(workflow, str) else None,
        float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None,
        kind if isinstance(kind, str) else None,
    )


def _first_and_last_events(log: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The first and last whole events of a log, reading only its ends."""
    try:
        with log.open("rb") as f:
            first = _event(f.readline())
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            lines = f.read().splitlines()
    except OSError:
        return None, None
    last = next((e for e in map(_event, reversed(lines)) if e is not None), None)
    return first, last


def _event(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
