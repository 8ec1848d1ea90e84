"""What the critical path says to do about the time lost on it, naming the real cause.

Time between an instance becoming ready and its first attempt is *waiting for a slot*
only when it was queued behind a full limit (the engine records which: the run's
``--max-parallel`` or a pool); otherwise it is *scheduling latency*: no limit was
full, the coordinator was busy (its event loop, checkpoints) or dispatching the work
to a cluster. Raising a limit helps the first, never the second.
"""

from __future__ import annotations

from storyflow.report._format import limit_name, seconds
from storyflow.report._model import Report

MIN_SHARE_PCT = 5.0
"""A cause below this share of the wall time gets no advice."""


def advice(report: Report) -> list[str]:
    """One line per cause of lost time on the critical path worth acting on, largest
    first; empty when the steps' own work is what took the time."""
    path = report.critical_path
    share = report.share_pct
    found: list[tuple[float, str]] = []
    for limit, spent in path.waits_by_limit().items():
        if limit == "max_parallel":
            what = "raise --max-parallel: it was full"
        elif limit.startswith("pool:"):
            what = f"raise pool {limit[5:]}'s concurrency (or its rate): it was full"
        else:
            what = f"{limit_name(limit)} was full"
        found.append((spent, f"{what} — steps on the critical path waited"
                             f" {seconds(spent)} ({share(spent):.1f}%) for a slot"))
    if path.latency_s > 0:
        found.append((path.latency_s,
                      f"scheduling latency {seconds(path.latency_s)}"
                      f" ({share(path.latency_s):.1f}%): steps on the critical path waited"
                      " between ready and started with no limit full — the coordinator was"
                      " busy (event loop, checkpoints) or dispatching to a cluster; a higher"
                      " --max-parallel will not help"))
    if path.retry_s > 0:
        found.append((path.retry_s,
                      f"retries {seconds(path.retry_s)} ({share(path.retry_s):.1f}%): failed"
                      " attempts and backoff on the critical path (see each step's retries"
                      " by error class)"))
    found.sort(key=lambda f: -f[0])
    return [text for spent, text in found if share(spent) >= MIN_SHARE_PCT]
