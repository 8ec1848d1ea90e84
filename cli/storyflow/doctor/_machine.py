"""Checks of the machine: Python, the state directory and the store (it opens, its
database passes SQLite's integrity check, every record reads back, no run lost its
record)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from storyflow.doctor._check import Check

MIN_PYTHON = (3, 11)
MIN_FREE_BYTES = 100 * 1024 * 1024
"""Below this much free space in the state directory's file system: a warning."""


def python_check(version: tuple[int, ...] | None = None) -> Check:
    if version is None:
        version = (sys.version_info.major, sys.version_info.minor, sys.version_info.micro)
    text = ".".join(str(v) for v in version[:3])
    if tuple(version[:2]) >= MIN_PYTHON:
        return Check("python", "ok", f"Python {text}")
    need = ".".join(map(str, MIN_PYTHON))
    return Check("python", "fail", f"Python {text}; storyflow needs {need} or newer",
                 f"install Python {need}+ and reinstall storyflow with it")


def state_checks(root: Path) -> list[Check]:
    """The state directory is writable and has room; the store in it opens."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    checks = []
    if root.exists() and not root.is_dir():
        checks.append(Check("state dir", "fail", f"{root} is not a directory",
                            "remove it, or point --state-dir / $STORYFLOW_STATE_DIR elsewhere"))
        return checks
    if root.is_dir():
        try:
            with tempfile.TemporaryFile(dir=root):
                pass
            checks.append(Check("state dir", "ok", f"{root} is writable"))
        except OSError as exc:
            checks.append(Check("state dir", "fail", f"cannot write in {root}: {exc.strerror}",
                                f"fix its permissions (chmod u+rwx {root}) or use --state-dir"))
    elif os.access(existing, os.W_OK | os.X_OK):
        checks.append(Check("state dir", "ok", f"{root} will be created on the first run"))
    else:
        checks.append(Check("state dir", "fail", f"{root} cannot be created: {existing} is not "
                            "writable", "use --state-dir or $STORYFLOW_STATE_DIR"))
    try:
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        checks.append(Check("disk space", "warn", f"cannot tell: {exc.strerror}"))
    else:
        mb = free / 1024 / 1024
        if free < MIN_FREE_BYTES:
            checks.append(Check("disk space", "warn", f"{mb:.0f} MB free where runs are stored",
                                "free some space, or move the state dir (--state-dir)"))
        else:
            checks.append(Check("disk space", "ok", f"{mb:,.0f} MB free"))
    checks += store_checks(root)
    return checks


def store_checks(root: Path, *, budget_s: float = 20.0) -> list[Check]:
    """The store opens; then what `Store.check_integrity` finds (reading at most
    ``budget_s`` seconds of records)."""
    from storyflow.errors import StoryflowError
    from storyflow.store import STORE_FORMAT, Store

    if not (root / "db").is_dir():
        return [Check("store", "ok", "no store yet; it is created on the first run")]
    try:
        with Store(root) as store:
            findings = store.check_integrity(budget_s=budget_s)
    except StoryflowError as exc:
        return [Check("store", "fail", exc.message, exc.hint or "use another --state-dir")]
    return [Check("store", "ok", f"opens; format {STORE_FORMAT}"),
            *(Check(f.check, f.status, f.detail, f.fix) for f in findings)]
