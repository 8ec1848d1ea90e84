"""Project templates for `storyflow init`: the example workflows, shipped in the wheel.

A template is a set of files copied from the examples (``workflows/`` in the source
tree, ``storyflow/workflows/`` inside the wheel), a README for the new project, and the
workflow JSON Schema that the files' ``yaml-language-server`` line points editors at.
`files_of` says what a template writes; `write` writes it, refusing to overwrite any
existing file unless told to. The ``blank`` template is one workflow with one step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from storyflow.errors import UsageError
from storyflow.spec.units import did_you_mean

DEFAULT_TEMPLATE = "short-story"
SCHEMA_FILE = "workflow.schema.json"
"""Written next to the workflows; their modeline points here."""
_MODELINE = re.compile(rb"^(# yaml-language-server: \$schema=)\S+", re.MULTILINE)
_SOURCE_EXAMPLES = Path(__file__).resolve().parents[2] / "workflows"
_SHORT_STORY_FILES = (
    "short-story.yaml",
    "grammars/planner.yaml",
    "grammars/characters.yaml",
    "grammars/settings.yaml",
    "grammars/writer.yaml",
    "grammars/editor.yaml",
)


@dataclass(frozen=True, slots=True)
class Template:
    """One project template."""

    name: str
    """What ``--template`` calls it."""
    main: str
    """The workflow to run first."""
    files: tuple[str, ...]
    """Paths under the examples folder, copied to the same paths in the project."""
    readme: str
    """The project's README.md; ``{main}`` and ``{name}`` are filled in."""


@dataclass(frozen=True, slots=True)
class NewFile:
    """A file `init` writes."""

    path: str
    """Relative to the project folder, with ``/`` separators."""
    data: bytes
    """The exact bytes."""


_RUN_NOTES = """\
Everything runs offline: each agent is the built-in grammar writer
(`grammars/*.yaml`), seeded, so the same `seed` always writes the same text. The
`llm` environment maps the agents to a chat model (`config.model`, the key in
`OPENAI_API_KEY`, or `STORYFLOW_LLM_BASE_URL` for Ollama, vLLM, LM Studio...); each
step's `prompt:` is what the model reads.

Runs are stored in `.storyflow/` in the folder you run from (or `--state-dir`,
or `$STORYFLOW_STATE_DIR`); keep it out of version control. `storyflow runs`,
`storyflow show RUN`, `storyflow logs RUN` and `storyflow report RUN` look at them;
`storyflow resume --last` continues a failed or interrupted run without redoing
finished steps.
"""

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="short-story",
            main="short-story.yaml",
            files=_SHORT_STORY_FILES,
            readme="""\
# {name}

A short story from a premise: conflict, character and setting planners in parallel,
a plot, five section writers, an editor's critique/revise loop (up to three readings,
keeping the best-scored draft), a title, and `story.md`.

```sh
storyflow run {main}
storyflow run {main} -i premise="A clockmaker hears the sea" -i tone=eerie
storyflow run {main} --set seed=8          # another story
storyflow graph {main} --format text       # the steps and how they connect
```

""" + _RUN_NOTES,
        ),
        Template(
            name="novella",
            main="novella.yaml",
            files=(
                "novella.yaml",
                "chapter.yaml",
                "grammars/planner.yaml",
                "grammars/characters.yaml",
                "grammars/settings.yaml",
                "grammars/novella/outline.yaml",
                "grammars/novella/chapter.yaml",
                "grammars/novella/editor.yaml",
            ),
            readme="""\
# {name}

A novella: a story bible (protagonist, setting, conflict, themes), an outline the
editor reviews in a loop, an optional human approval, then the chapters in order —
each a run of `chapter.yaml` that starts from the previous chapter's continuity
record and has its own critique/revise loop — and `novella.md`.

```sh
storyflow run {main}
storyflow run {main} -i chapters=3
storyflow run {main} -i approve_outline=true    # waits for you (exit 3) ...
storyflow resume --last --answer approve=true   # ... and continues
storyflow show RUN.chapters-0                   # one chapter's own run
```

""" + _RUN_NOTES,
        ),
        Template(
            name="batch",
            main="batch.yaml",
            files=("batch.yaml", "premises.jsonl", "storylib.py", *_SHORT_STORY_FILES),
            readme="""\
# {name}

One short story per line of `premises.jsonl` (`{{"id": ..., "premise": ...,
"tone": ...}}`), each a run of `short-story.yaml`, two at a time. A premise that fails
does not stop the others; `summary.md` has one row per premise (status, words,
tokens, cost) and `stories.md` every story written. `storylib.py` reads the file.

```sh
storyflow run {main}
storyflow run {main} -i premises=other.jsonl
storyflow show RUN.stories-0                    # one story's own run
```

""" + _RUN_NOTES,
        ),
        Template(
            name="blank",
            main="workflow.yaml",
            files=(),
            readme="""\
# {name}

A new storyflow workflow with one step.

```sh
storyflow run {main} -i premise="A storm at sea"
storyflow validate {main}
storyflow schema                # every key a workflow may use
```

Runs are stored in `.storyflow/` in the folder you run from; keep it out of version
control. `storyflow init DIR --template short-story` writes a complete example.
""",
        ),
    )
}
"""Every template, by name."""

_BLANK = """\
# yaml-language-server: $schema={schema}
#
# One step that renders a template. Add agents (llm, python, command, template,
# builtin/grammar, workflow, human), maps (for_each) and loops: `storyflow schema`
# lists every key, and `storyflow init DIR --template short-story` shows them at work.
apiVersion: storyflow/v1
name: {name}
version: 1
description: A new workflow.

inputs:
  premise:
    type: string
    description: What the story is about.
    default: "A lighthouse keeper finds a map"

steps:
  opening:
    description: The story's first lines.
    uses: template
    with:
      template: "{{{{ inputs.premise }}}}. Nobody in town believed it, at first."

outputs:
  text: "{{{{ steps.opening.output }}}}"
artifacts:
  story.md: "{{{{ steps.opening.output }}}}\\n"
"""


def get(name: str) -> Template:
    """The template called ``name``; a usage error with the nearest name otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UsageError(
            f"unknown template {name!r}",
            hint=did_you_mean(name, TEMPLATES, what="templates"),
        ) from None


def examples_dir() -> Path:
    """The example workflows: inside the wheel, else the source tree."""
    shipped = resources.files("storyflow").joinpath("workflows")
    if shipped.is_dir():
        return Path(str(shipped))
    return _SOURCE_EXAMPLES


def project_name(directory: Path) -> str:
    """A workflow ``name`` from the project folder's name (``My Book`` → ``my-book``)."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", directory.resolve().name.lower()).strip("-_")
    return slug if slug and slug[0].isalnum() else "my-story"


def files_of(template: Template, directory: Path) -> list[NewFile]:
    """Every file ``template`` writes into ``directory``, README and schema included."""
    from storyflow.spec.schema import schema_path

    name = project_name(directory)
    out = [NewFile("README.md", template.readme.format(main=template.main, name=name).encode())]
    if template.files:
        source = examples_dir()
        for rel in template.files:
            try:
                data = (source / rel).read_bytes()
            except OSError as exc:
                raise UsageError(
                    f"template {template.name!r} is incomplete: cannot read {rel} "
                    f"({exc.strerror or exc})",
                    hint="reinstall storyflow",
                ) from exc
            if rel.endswith(".yaml") and "/" not in rel:
                data = _MODELINE.sub(rb"\g<1>" + SCHEMA_FILE.encode(), data, count=1)
            out.append(NewFile(rel, data))
    else:
        out.append(NewFile(template.main, _BLANK.format(schema=SCHEMA_FILE, name=name).encode()))
    out.append(NewFile(SCHEMA_FILE, schema_path(SCHEMA_FILE).read_bytes()))
    return out


def write(directory: Path, files: list[NewFile], *, force: bool = False) -> list[Path]:
    """Write ``files`` under ``directory`` (created as needed); the paths written.

    Nothing is written when a file exists already, unless ``force``: the error lists them.
    """
    try:
        return _write(directory, files, force=force)
    except OSError as exc:  # a name too long, no permission, a full disk
        raise UsageError(
            f"cannot write the project into {directory}: {exc.strerror or exc}",
            hint="give a folder you can write to, with a shorter path",
        ) from exc


def _write(directory: Path, files: list[NewFile], *, force: bool) -> list[Path]:
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a directory",
                         hint="give a new or existing folder to write the project into")
    targets = [directory / f.path for f in files]
    if not force:
        existing = [str(t) for t in targets if t.exists()]
        if existing:
            shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more"
                                               if len(existing) > 5 else "")
            raise UsageError(
                f"not overwriting existing file{'s' if len(existing) > 1 else ''}: {shown}",
                hint="pass --force to overwrite, or choose another directory",
            )
    for target, f in zip(targets, files, strict=True):
        if target.is_dir():
            raise UsageError(f"{target} is a directory; cannot write a file there")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.data)
    return targets


__all__ = ["DEFAULT_TEMPLATE", "TEMPLATES", "NewFile", "Template", "files_of", "get", "write"]
