"""What a run cost in time, retries, tokens and money, and what held it up.

`build_report` turns a run's records and event log into a `Report` (a pure function:
the command reads the store and the workflow file); the renderers turn a report into
JSON (`to_document`, schemas/report.schema.json), titled tables (`sections`), one
self-contained HTML page (`render_html`) or JUnit XML (`render_junit`). A run on a
cluster also gets a per-worker table (`WorkerReport`).
The critical path is `critical_path`, over instance timings alone.
"""

from __future__ import annotations

from storyflow.report._build import INLINE, build_report, parent_id, percentile, step_path
from storyflow.report._critical import critical_path
from storyflow.report._html import render_html
from storyflow.report._json import to_document
from storyflow.report._junit import render_junit
from storyflow.report._model import (
    AgentReport,
    Attempt,
    CriticalPath,
    InstanceReport,
    PathEntry,
    Report,
    Usage,
    WorkerReport,
)
from storyflow.report._text import sections

__all__ = [
    "INLINE",
    "AgentReport",
    "Attempt",
    "CriticalPath",
    "InstanceReport",
    "PathEntry",
    "Report",
    "Usage",
    "WorkerReport",
    "build_report",
    "critical_path",
    "parent_id",
    "percentile",
    "render_html",
    "render_junit",
    "sections",
    "step_path",
    "to_document",
]
