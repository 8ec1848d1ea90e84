"""Health checks for `storyflow doctor`, each ``ok``, ``warn`` or ``fail`` with a fix.

Of the machine (`machine_checks`): the Python version, the state directory (writable,
free space) and the store (opens, format version; its database passes SQLite's
integrity check, every run and step record reads back, every run folder has its
record). Of a workflow file
(`workflow_checks`): it validates, and each agent it uses can work — a python
callable imports, a command is on PATH, an LLM endpoint answers and serves the
configured model, declared secrets are set (names only, never values), a
sub-workflow validates, a grammar file exists — and, for a workflow that runs on a
Dask cluster (its ``executor:``, or ``--executor``; `executor_checks`), that the
cluster answers, has workers running this storyflow, and that each worker imports
every python callable.

Checks read the world (files, PATH, the network) but change nothing: no state
directory or store is created (a temporary local Dask cluster is started for the
checks and stopped after them).
"""

from __future__ import annotations

from pathlib import Path

from storyflow.doctor._check import Check
from storyflow.doctor._executor import executor_checks
from storyflow.doctor._machine import (
    MIN_FREE_BYTES,
    MIN_PYTHON,
    python_check,
    state_checks,
    store_checks,
)
from storyflow.doctor._workflow import workflow_checks

__all__ = [
    "MIN_FREE_BYTES",
    "MIN_PYTHON",
    "Check",
    "executor_checks",
    "machine_checks",
    "python_check",
    "state_checks",
    "store_checks",
    "workflow_checks",
]


def machine_checks(state_dir: Path) -> list[Check]:
    """Python, then the state directory and its store."""
    return [python_check(), *state_checks(state_dir)]
