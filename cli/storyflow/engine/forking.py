"""What a fork keeps, re-runs and runs — and why — before anything runs.

`storyflow fork RUN` makes a new run whose earlier records are RUN's: the scheduler keeps
(copies) every step instance whose fingerprint — its definition and rendered inputs —
is unchanged and that is not forced, exactly as `resume` keeps against a run's own
records (`storyflow.engine.prepare`). Which steps that will be depends on outputs not
known yet, so the plan printed first is a forecast per top-level step, with the cause:

- ``definition changed`` (the file changed the step), ``forced (--from)``, ``seed
  changed`` (the run's seed reaches every seeded agent): forced, they run again;
- ``input changed: tone`` / ``setting changed: config.x``: its templates read a value
  that differs, so its rendered inputs will (decided by its fingerprint at run time);
- ``after X``: downstream of a step that runs again — kept if X's new output turns
  out the same, else run;
- ``did not finish``: the parent has no output for it (failed, pending, skipped...);
- ``new``: the parent's workflow had no such step; ``removed``: the reverse.

A fork interrupted (kill -9, Ctrl-C, a failure) resumes as a fork (`fork_resume`): an
instance it finished or attempted stands on its own record, as on any resume; one it
had not reached yet is still kept from the parent when unchanged — and copied then —
unless the fork runs its step again whatever (``meta["fork_forced"]``, recorded when
the fork was made: the ``--from`` steps and what follows, loops that read a change).
Records read from the parent carry the in-memory mark `FROM`, never stored: the
scheduler copies those it keeps and leaves the run's own in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from storyflow.engine.plan import Plan
from storyflow.engine.runs import ResumePlan, resume_plan
from storyflow.spec.model import Step, Workflow
from storyflow.store import RunRecord, StepRecord, Store

if TYPE_CHECKING:
    from storyflow.engine.instance import Instance

_OK = ("succeeded", "cached")
FROM = "kept_from"
"""``meta`` key marking a record read from the run a fork keeps from (in memory only):
kept, it is copied into the fork."""
FORCED = "fork_forced"
"""``meta`` key of a fork's run record: the top-level steps it runs again whatever their
records in the parent say, so that it never keeps them from there."""


@dataclass(frozen=True, slots=True)
class ForkPlan:
    """The forecast of a fork, per top-level step, and what the scheduler is given."""

    base: ResumePlan
    """Against the parent's records: ``previous`` and ``forced`` go to the scheduler."""
    kept: list[str] = field(default_factory=list)
    rerun: dict[str, str] = field(default_factory=dict)
    """Step → why it runs again."""
    run: list[str] = field(default_factory=list)
    """Steps the parent did not finish."""
    new: list[str] = field(default_factory=list)
    loops: frozenset[str] = frozenset()
    """The loop steps of the plan."""

    def lines(self) -> list[str]:
        """The plan as the lines printed before the fork runs."""
        out = [f"kept: {len(self.kept)} step{'s' if len(self.kept) != 1 else ''}"]
        if self.rerun:
            by_why: dict[str, list[str]] = {}
            for sid, why in self.rerun.items():
                by_why.setdefault(why, []).append(sid)
            out.append("re-run: " + "; ".join(
                f"{', '.join(sids)} ({why})" for why, sids in by_why.items()))
        if self.run:
            out.append(f"run: {', '.join(self.run)} (did not finish in the parent)")
        if self.new:
            out.append(f"new: {', '.join(self.new)}")
        if self.base.removed:
            out.append(f"removed: {', '.join(self.base.removed)} (no longer in the workflow)")
        return out

    @property
    def forced(self) -> frozenset[str]:
        """What the scheduler must run again whatever its fingerprint says: the forced
        steps, and loops that read a changed input or setting (a loop is kept whole by
        its needs' outputs, which do not show what its steps read)."""
        return self.base.forced | {
            sid for sid, why in self.rerun.items()
            if why.startswith(("input changed", "setting changed")) and sid in self.loops}

    def summary(self) -> dict[str, Any]:
        """For the ``run.started`` event and ``--json``."""
        return {"kept": self.kept, "rerun": self.rerun, "run": self.run, "new": self.new,
                "removed": self.base.removed}


def fork_plan(
    store: Store,
    parent: RunRecord,
    wf: Workflow,
    compiled: Plan,
    from_steps: Iterable[str],
    *,
    inputs: Mapping[str, Any],
    before: Workflow | None,
    templates: Any,
) -> ForkPlan:
    """The forecast of forking ``parent`` into a run of ``wf`` with ``inputs``.
    ``before``: the parent's workflow as it loads with the parent's settings (None when
    it cannot be loaded): its config and seed tell which settings changed."""
    from_steps = list(from_steps)
    base = resume_plan(store, parent, compiled, from_steps, warn=lambda _: None)
    for rec in base.previous.values():
        rec.meta[FROM] = parent.run_id  # kept, a record is copied into the fork
    reseeded = _reseeded(base.previous.values(), before, wf)
    if reseeded:  # every step runs again
        base = replace(base, forced=frozenset(compiled.order), kept=[],
                       todo=list(compiled.order))
    changed_inputs = {k for k in set(inputs) | set(parent.inputs)
                      if inputs.get(k) != parent.inputs.get(k)}
    changed_config = set() if before is None else {
        k for k in set(wf.config) | set(before.config)
        if wf.config.get(k) != before.config.get(k)}
    had = set(parent.meta.get("steps") or ())
    plan = ForkPlan(base, loops=frozenset(
        sid for sid in compiled.order if compiled.nodes[sid].step.loop is not None))
    cause: dict[str, str] = {}  # a step that runs again → the root cause upstream
    for sid in compiled.order:
        node = compiled.nodes[sid]
        prev = base.previous.get(sid)
        upstream = next((cause[d] for d in node.deps if d in cause), None)
        why = None
        if sid in from_steps:
            why = "--from"
        elif sid in base.changed:
            why = "definition changed"
        elif reseeded:
            why = "seed changed"
        elif changed_inputs or changed_config:
            read = _reads(node.step, wf, templates)
            hit = sorted(f"inputs.{k}" for k in changed_inputs if ("inputs", k) in read) + sorted(
                f"config.{k}" for k in changed_config if ("config", k) in read)
            if hit:
                why = ("input" if hit[0].startswith("inputs.") else "setting") + \
                    " changed: " + ", ".join(h.split(".", 1)[1] for h in hit)
        if why is None and upstream is not None:
            why = f"after {upstream}"
        if sid not in had and prev is None:
            plan.new.append(sid)
            cause[sid] = sid
        elif prev is None or prev.status not in _OK:
            plan.run.append(sid)
            cause[sid] = sid
        elif why is not None:
            plan.rerun[sid] = why
            cause[sid] = upstream if why.startswith("after ") and upstream else sid
        elif prev.meta.get("redacted"):
            plan.rerun[sid] = "its output held a secret"
            cause[sid] = sid
        else:
            plan.kept.append(sid)
    return plan


def fork_resume(store: Store, record: RunRecord, compiled: Plan,
                own: ResumePlan) -> tuple[ResumePlan, str | None]:
    """How ``record`` resumes when it is a fork: ``own`` (`resume_plan` against its own
    records) plus, for each step it neither finished nor attempted, the parent's record
    — unless the fork runs that step again whatever (`FORCED`, and what follows a step
    whose definition changed since the parent ran it). Returns the plan and the run to
    keep from; None when ``record`` is no fork, its parent is gone, or it was made
    before forks recorded `FORCED` (it then resumes on its own records alone)."""
    barred = record.meta.get(FORCED)
    if (record.fork or {}).get("kind") != "fork" or record.forked_from is None or \
            not isinstance(barred, list):
        return own, None
    parent = store.get_run(record.forked_from)
    if parent is None:
        return own, None
    theirs = store.get_steps(parent.run_id, [
        sid for sid in compiled.order if not _settled(own.previous.get(sid))])
    changed = [sid for sid, rec in theirs.items()
               if rec.meta.get("def") != compiled.nodes[sid].fingerprint]
    barred = sorted(set(barred) | compiled.downstream(changed))
    record.meta[FORCED] = barred  # for the maps and loops it has not reached either
    previous = dict(own.previous)
    for sid, rec in theirs.items():
        if sid not in barred:
            rec.meta[FROM] = parent.run_id
            previous[sid] = rec
    kept = [sid for sid in compiled.order if sid not in own.forced and sid in previous
            and previous[sid].status in _OK and not previous[sid].meta.get("redacted")]
    return replace(own, previous=previous, kept=kept,
                   todo=[sid for sid in compiled.order if sid not in kept]), parent.run_id


def earlier_records(store: Store, run: RunRecord, origin: str | None, inst: Instance,
                    ids: list[str]) -> dict[str, StepRecord]:
    """The records instances ``ids`` (a map's items, a loop iteration's steps, under
    ``inst``) may be kept from: the run's own from an earlier process — those it
    finished or attempted — else those of ``origin``, the run a fork keeps from
    (marked `FROM`), unless the fork runs ``inst``'s top-level step again whatever."""
    own = store.get_steps(run.run_id, ids)
    if origin is None:
        return own
    top = inst
    while top.parent is not None:
        top = top.parent
    if top.id in (run.meta.get(FORCED) or ()):
        return own
    theirs = store.get_steps(origin, [i for i in ids if not _settled(own.get(i))])
    for rec in theirs.values():
        rec.meta[FROM] = origin
    return {**own, **theirs}


def _settled(rec: StepRecord | None) -> bool:
    """Whether a fork's own record of an instance decides it on resume: the fork
    finished it, or chose to run it (an attempt started). One cancelled or left
    pending before it was prepared does not: the parent's record may still keep it."""
    return rec is not None and (rec.status in _OK or rec.attempts > 0)


def _reseeded(records: Iterable[StepRecord], before: Workflow | None, wf: Workflow) -> bool:
    """Whether the fork runs under another seed than the parent did. The seed each
    call of the parent was made with is on its recorded request — the parent's file may
    have changed since (``before`` is loaded from today's file); a parent from before
    requests were recorded is judged by ``before``."""
    seeds = {rec.request.get("seed") for rec in records
             if rec.request is not None and "seed" in rec.request}
    if seeds:
        return seeds != {wf.seed}
    return before is not None and before.seed != wf.seed


def _reads(step: Step, wf: Workflow, templates: Any) -> set[tuple[str, str | None]]:
    """``(root, key)`` of every name the step's templates read (its loop's steps too)."""
    out: set[tuple[str, str | None]] = set()
    for text, expression in _texts(step):
        try:
            refs = templates.references(text, expression=expression)
        except Exception:  # a template the validator let through: read as reading all
            return {("inputs", k) for k in wf.inputs} | {("config", k) for k in wf.config}
        out.update((r.root, r.key) for r in refs)
    return out


def _texts(step: Step) -> Iterator[tuple[str, bool]]:
    yield from ((t, False) for t in _strings(step.with_))
    if step.prompt is not None:
        yield from ((t, False) for t in _strings(step.prompt))
    if isinstance(step.when, str):
        yield step.when, True
    if isinstance(step.for_each, str):
        yield step.for_each, True
    elif step.for_each is not None:
        yield from ((t, False) for t in _strings(step.for_each))
    if step.loop is not None:
        for text in (step.loop.until, step.loop.best_by):
            if isinstance(text, str):
                yield text, True
        for inner in step.loop.steps:
            yield from _texts(inner)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
