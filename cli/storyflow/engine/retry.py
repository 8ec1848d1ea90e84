"""Backoff schedules. Pure functions of the policy, the attempt and a random source."""

from __future__ import annotations

import random
from collections.abc import Callable

from storyflow.spec.model import RetryPolicy


def base_delay_s(policy: RetryPolicy, failed_attempt: int) -> float:
    """Delay after attempt ``failed_attempt`` (1-based) before jitter, capped by max_delay."""
    n = max(1, failed_attempt)
    if policy.backoff == "fixed":
        delay = policy.delay_s
    elif policy.backoff == "linear":
        delay = policy.delay_s * n
    else:
        # 2**(n-1) grows past any cap quickly; stop multiplying once it is reached.
        delay = policy.delay_s * (2.0 ** min(n - 1, 62))
    return min(delay, policy.max_delay_s)


def delay_s(
    policy: RetryPolicy,
    failed_attempt: int,
    *,
    retry_after_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """The wait before the next attempt: "equal jitter" in [base/2, base], or a server's
    Retry-After.

    Half the base delay is always waited, so a retry never fires at once (full jitter,
    in [0, base], could draw 0: a flaky API hammered again at once); the other half is
    random, so clients that failed together do not retry together. The value returned
    is the one waited and the one the ``step.retrying`` event reports.

    A ``Retry-After`` is honoured as a floor (the server said when to come back), still
    capped by ``max_delay`` so a hostile header cannot stall a run for hours.
    """
    base = base_delay_s(policy, failed_attempt)
    delay = base / 2 + base / 2 * rand() if policy.jitter else base
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, policy.max_delay_s))
    return delay


def should_retry(policy: RetryPolicy, error_class: str, attempt: int) -> bool:
    """Whether a failure of ``error_class`` after ``attempt`` attempts retries. A lost
    worker is a transient failure: ``retry.on`` selects it by either name."""
    if attempt >= policy.attempts:
        return False
    if error_class == "worker_lost":
        return "worker_lost" in policy.on or "transient" in policy.on
    return error_class in policy.on
