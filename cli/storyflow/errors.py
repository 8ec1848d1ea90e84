"""The whole storyflow exception tree. Every error knows its exit code.

    StoryflowError                 exit 1   base of everything storyflow raises on purpose
    ├── UsageError                 exit 2   bad command-line input (unknown run, bad flag value)
    │   └── InputError             exit 2   a `-i`/`--inputs`/`--set`/`--env` value is wrong
    ├── WorkflowError              exit 2   the workflow file is invalid; carries every Problem
    ├── RunHeldError               exit 4   another live process holds the run's lease
    ├── StoreError                 exit 1   the state store cannot be opened or is too new
    └── StepFailure                exit 1   one attempt of a step failed; carries an ErrorClass
        ├── TransientError                  retryable: flaky network, rate limits, exit 75
        │   └── WorkerLost                  the executor's worker died during the attempt
        ├── StepTimeout                     the attempt ran past its timeout
        ├── InvalidOutput                   output failed to parse or to match output_schema
        ├── CircuitOpen                     the agent's breaker is open: failed fast, not called
        ├── BudgetExceeded                  a call would go over the run's or the step's budget
        ├── AnswerNeeded                    a `human` step has no answer yet: the run pauses
        └── PermanentError                  anything else; never retried by default

`TransientError` is public API: a python agent raises it to ask for a retry.
Foreign exceptions are translated at the module that owns the foreign library
and chained with ``from``, so no traceback reaches a user unless ``--debug``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storyflow.events import ErrorClass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_WAITING = 3
EXIT_HELD = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class StoryflowError(Exception):
    """Base of every error storyflow raises on purpose."""

    exit_code: int = EXIT_FAILED
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint


class UsageError(StoryflowError):
    """The command line asked for something impossible."""

    exit_code = EXIT_USAGE


class InputError(UsageError):
    """A workflow parameter (-i, --inputs, --set, --env) is wrong."""


class StoreError(StoryflowError):
    """The state store cannot be used."""


class RunHeldError(StoryflowError):
    """Another live process holds the run."""

    exit_code = EXIT_HELD


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a workflow file, located as precisely as we can."""

    message: str
    """What is wrong, in one sentence."""
    file: str = "<workflow>"
    """The file the problem is in."""
    line: int = 1
    """1-based line."""
    col: int = 1
    """1-based column."""
    path: str = "$"
    """JSON path of the offending node, like ``$.steps.plot.agent``."""
    hint: str | None = None
    """A likely fix, when we can guess one."""
    severity: str = "error"
    """``error`` makes the file invalid; ``warning`` does not."""

    def format(self) -> str:
        head = f"{self.file}:{self.line}:{self.col}: {self.severity}: {self.message}"
        tail = f"\n    at {self.path}"
        if self.hint:
            tail += f"\n    hint: {self.hint}"
        return head + tail


class WorkflowError(StoryflowError):
    """The workflow file is invalid. Carries every problem found, not only the first."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        super().__init__(errors[0].format() if errors else "invalid workflow")

    def __str__(self) -> str:
        return "\n".join(p.format() for p in self.problems)


class StepFailure(StoryflowError):
    """One attempt of a step failed. ``error_class`` decides whether it retries.

    ``traceback`` is the formatted traceback of the user's code that failed (a python
    step's exception, its frames only), recorded with the attempt's error."""

    error_class: ErrorClass = ErrorClass.PERMANENT
    traceback: str | None = None

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        retry_after_s: float | None = None,
        error_class: ErrorClass | None = None,
        traceback: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s
        if error_class is not None:
            self.error_class = error_class
        if traceback is not None:
            self.traceback = traceback


class AnswerNeeded(StepFailure):
    """A step needs a person's answer and none can be asked for here: the run pauses.

    ``questions`` are ``{"run_id", "step", "question", "schema"}`` dicts (a sub-workflow
    passes on its own steps' questions)."""

    def __init__(self, questions: list[dict[str, Any]]) -> None:
        steps = ", ".join(q["step"] for q in questions)
        super().__init__(f"waiting for an answer: {steps}")
        self.questions = questions


class BudgetExceeded(StepFailure):
    """A call would go over a token or cost budget: the step stops; raise the budget
    (``resume RUN --set budget.tokens=N``) and resume."""

    error_class = ErrorClass.BUDGET_EXCEEDED


class TransientError(StepFailure):
    """Raise from an agent to mark a failure as worth retrying."""

    error_class = ErrorClass.TRANSIENT


class WorkerLost(TransientError):
    """The worker running the attempt died (a Dask worker process killed, its machine
    gone): transient, so the step's retry policy runs it again on another worker."""

    error_class = ErrorClass.WORKER_LOST


class ReplayMiss(StepFailure):
    """``storyflow replay --strict``: no call of the recorded run had this request."""

    error_class = ErrorClass.REPLAY_MISS


class StepTimeout(StepFailure):
    """The attempt ran past its timeout."""

    error_class = ErrorClass.TIMEOUT


class InvalidOutput(StepFailure):
    """The output failed to parse or did not match the step's output_schema."""

    error_class = ErrorClass.INVALID_OUTPUT


class CircuitOpen(StepFailure):
    """The agent's circuit breaker is open: the call failed fast without reaching it."""

    error_class = ErrorClass.CIRCUIT_OPEN


class PermanentError(StepFailure):
    """A failure that retrying will not fix."""

    error_class = ErrorClass.PERMANENT
