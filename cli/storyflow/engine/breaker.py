"""A circuit breaker per named agent, shared by every step that uses the agent in a run.

The breaker is a lifecycle machine (``fire("breaker", ...)``, see `lifecycle`):

- **closed**: calls go through. Every failed call (any error class but ``cancelled``)
  adds one to a count of consecutive failures; a success resets it. ``failures`` in a
  row trip the breaker.
- **open**: calls fail fast as ``circuit_open`` without reaching the agent, until
  ``cooldown`` has passed since it opened.
- **half_open**: the first call after the cooldown is the *trial* and the only call
  let through; while it is in flight every other call fails fast, as when open (they
  do not queue behind it: a fallback, if any, serves them at once). The trial's
  success closes the breaker; its failure opens it again for another cooldown.

Outcomes of calls admitted before the breaker opened, arriving while it is open or
half-open, change nothing: only the trial decides. A trial that is cancelled (a signal,
the run's timeout) decides nothing either: the breaker is open again and the next call
is a new trial.

Time comes from the caller (``now``, a monotonic clock), so tests need no sleeping.
Breakers live in memory: a resumed run starts with every breaker closed.
"""

from __future__ import annotations

from enum import Enum

from storyflow.engine.lifecycle import fire
from storyflow.events import BreakerState
from storyflow.spec.model import Breaker as BreakerSpec

_CLOSED = BreakerState.CLOSED.value
_OPEN = BreakerState.OPEN.value
_HALF_OPEN = BreakerState.HALF_OPEN.value


class Admission(Enum):
    """What `Breaker.admit` decided for one call."""

    REFUSED = "refused"
    """Fail fast as ``circuit_open``."""
    CALL = "call"
    """An ordinary call, the breaker being closed."""
    TRIAL = "trial"
    """The one trial call of a half-open breaker."""


class Breaker:
    """The breaker of one agent in one run."""

    __slots__ = ("cooldown_s", "failures", "id", "opened_at", "state", "threshold")

    def __init__(self, agent: str, spec: BreakerSpec) -> None:
        self.id = agent
        self.state = _CLOSED
        self.threshold = max(1, spec.failures)
        self.cooldown_s = spec.cooldown_s
        self.failures = 0
        """Consecutive failed calls while closed."""
        self.opened_at = 0.0

    def retry_in_s(self, now: float) -> float:
        """Seconds until an open breaker lets a trial call through (0 when it would now)."""
        if self.state != _OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - now)

    def allows(self, now: float) -> bool:
        """Whether `admit` would let a call through now; changes nothing."""
        if self.state == _CLOSED:
            return True
        return self.state == _OPEN and now >= self.opened_at + self.cooldown_s

    def admit(self, now: float) -> Admission:
        """Decide one call: through, the trial, or fail fast."""
        if self.state == _CLOSED:
            return Admission.CALL
        if self.state == _OPEN and now >= self.opened_at + self.cooldown_s:
            fire("breaker", self, "probe")
            return Admission.TRIAL
        return Admission.REFUSED

    def succeeded(self, admission: Admission) -> bool:
        """Record a successful call; True when it closed the breaker (a trial's success)."""
        if self.state == _CLOSED:
            self.failures = 0
            return False
        if admission is Admission.TRIAL and self.state == _HALF_OPEN:
            fire("breaker", self, "close")
            self.failures = 0
            return True
        return False

    def failed(self, admission: Admission, now: float) -> bool:
        """Record a failed call; True when it opened the breaker (or re-opened it)."""
        if self.state == _CLOSED:
            self.failures += 1
            if self.failures < self.threshold:
                return False
        elif not (admission is Admission.TRIAL and self.state == _HALF_OPEN):
            return False
        fire("breaker", self, "trip")
        self.opened_at = now
        return True

    def abandoned(self, admission: Admission, now: float) -> None:
        """A call was cancelled: a trial's slot is given back (the next call is a trial)."""
        if admission is Admission.TRIAL and self.state == _HALF_OPEN:
            fire("breaker", self, "trip")
            self.opened_at = now - self.cooldown_s
