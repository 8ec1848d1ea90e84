"""Import discipline: `storyflow --help` stays light, and each library has one owner.

`--help` must not pay for jsonschema, jinja2, ruamel, diskcache, transitions or rich;
they are imported inside the commands that need them. And each third-party library is
imported only where it is fenced in (STYLE.md: transitions in `engine`, diskcache in
`store`, rich in `ui`, typer in `commands`; ruamel only in spec/yaml_source/ and jinja2
only in spec/templates/, as those packages say).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cli" / "storyflow"
HEAVY = ("jsonschema", "jinja2", "ruamel", "diskcache", "transitions", "rich")
OWNERS = {
    "ruamel": "spec/yaml_source/",
    "jinja2": "spec/templates/",
    "transitions": "engine/",
    "diskcache": "store/",
    "rich": "ui/",
    "typer": "commands/",
    "aiohttp": "agents/llm_agent/",
    "yarl": "agents/llm_agent/",
    "distributed": "engine/executors/_dask.py",
    "dask": "engine/executors/_dask.py",
}
"""Library → the module, or the package (ending in '/'), allowed to import it."""


def imported_modules(*args: str, ok: tuple[int, ...] = (0,)) -> list[str]:
    """Every module imported while running ``python -X importtime ARGS``."""
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode in ok, result.stderr[-2000:]
    modules = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                modules.append(name)
    assert modules, "no -X importtime output"
    return modules


def heavy_among(modules: list[str]) -> list[str]:
    return sorted({m for m in modules if m.split(".")[0] in HEAVY})


def test_help_imports_no_heavy_library() -> None:
    modules = imported_modules("-m", "storyflow", "--help")
    assert "storyflow.commands.app" in modules  # the probe did see our imports
    assert heavy_among(modules) == []


def test_version_imports_no_heavy_library() -> None:
    assert heavy_among(imported_modules("-m", "storyflow", "--version")) == []


def test_main_entry_point_help_imports_no_heavy_library() -> None:
    code = (
        "import sys; sys.argv = ['storyflow', '--help']\n"
        "from storyflow.commands import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
    )
    assert heavy_among(imported_modules("-c", code)) == []


def test_validate_does_import_what_it_needs(minimal_workflow: Path) -> None:
    """The probe can see heavy imports at all (so the tests above are not vacuous); Jinja2
    only once a template is more than a plain reference."""
    modules = imported_modules("-m", "storyflow", "validate", str(minimal_workflow))
    assert {"ruamel", "jsonschema"} <= {m.split(".")[0] for m in modules}
    assert "jinja2" not in {m.split(".")[0] for m in modules}
    text = minimal_workflow.read_text(encoding="utf-8")
    assert '"hello"' in text
    minimal_workflow.write_text(text.replace('"hello"', '"{{ run.id | upper }}"'), encoding="utf-8")
    modules = imported_modules("-m", "storyflow", "validate", str(minimal_workflow))
    assert "jinja2" in {m.split(".")[0] for m in modules}


def test_a_local_run_does_not_import_dask(minimal_workflow: Path, tmp_path: Path) -> None:
    """The dask extra costs nothing to a run that does not use it."""
    env_dir = tmp_path / "state"
    modules = imported_modules(
        "-m", "storyflow", "--state-dir", str(env_dir), "run", str(minimal_workflow),
        "--no-progress",
    )
    assert "storyflow.engine.runner" in modules
    assert not {m for m in modules if m.split(".")[0] in ("dask", "distributed")}


def test_builtin_kinds_do_not_look_for_plugins(minimal_workflow: Path) -> None:
    """Plugin discovery (importlib.metadata, ~10-25 ms) waits for a kind that is not built in."""
    modules = imported_modules("-m", "storyflow", "validate", str(minimal_workflow))
    assert "importlib.metadata" not in modules


def _third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_library_is_imported_only_by_its_owner(library: str) -> None:
    owner = OWNERS[library]
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        allowed = relative.startswith(owner) if owner.endswith("/") else relative == owner
        if library in _third_party_imports(path) and not allowed:
            offenders.append(relative)
    assert not offenders, f"{library} belongs to storyflow/{owner}, imported by {offenders}"
