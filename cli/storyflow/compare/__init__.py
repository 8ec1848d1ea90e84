"""What differs between two runs (`storyflow diff`).

`build_diff` turns two runs' records (and their run folders' files, compared by
`compare_folders`) into a `RunDiff`, a pure function: the command reads the store.
The pieces: `text_diff` (word-level, difflib over word tokens), `json_changes` /
`value_diff` (structural, JSON-pointer paths). The renderers turn a diff into plain
text (`render_text`), a JSON document (`to_document`, schemas/diff.schema.json) or one
self-contained HTML page (`render_html`).
"""

from __future__ import annotations

from storyflow.compare._artifacts import artifact_files, compare_folders
from storyflow.compare._build import RunRecords, build_diff, lineage, merged_order, selects
from storyflow.compare._json import to_document
from storyflow.compare._model import (
    ArtifactDiff,
    Change,
    FieldDiff,
    Lineage,
    Pair,
    RunDiff,
    RunSide,
    StepDiff,
    Summary,
    TextDiff,
    Totals,
    ValueDiff,
)
from storyflow.compare._structure import json_changes, pointer, same, value_diff
from storyflow.compare._text import inline, render_text
from storyflow.compare._words import text_diff


def render_html(diff: RunDiff) -> str:
    """The diff as one self-contained HTML page. The HTML renderer (and the report's
    markup it shares) is imported on first use: text and JSON do not pay for it."""
    from storyflow.compare._html import render_html as render

    return render(diff)


__all__ = [
    "ArtifactDiff",
    "Change",
    "FieldDiff",
    "Lineage",
    "Pair",
    "RunDiff",
    "RunRecords",
    "RunSide",
    "StepDiff",
    "Summary",
    "TextDiff",
    "Totals",
    "ValueDiff",
    "artifact_files",
    "build_diff",
    "compare_folders",
    "inline",
    "json_changes",
    "lineage",
    "merged_order",
    "pointer",
    "render_html",
    "render_text",
    "same",
    "selects",
    "text_diff",
    "to_document",
    "value_diff",
]
