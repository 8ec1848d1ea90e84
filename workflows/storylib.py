"""Helpers the example workflows call with ``uses: python`` (a workflow's folder is importable).

    read:
      uses: python
      with: {callable: "storylib:read_jsonl", path: premises.jsonl}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: str, context: Any = None) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file: one JSON object per line, blank lines skipped.

    A relative ``path`` is read from the workflow's folder. A line that is not a JSON
    object is an error that names the file and the line.
    """
    file = Path(path).expanduser()
    if not file.is_absolute() and context is not None:
        file = Path(context.workflow_dir) / file
    rows: list[dict[str, Any]] = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}:{number}: not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{file}:{number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows
