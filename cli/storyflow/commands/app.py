"""storyflow's command line. The only place that sets exit codes.

Heavy libraries (jsonschema, jinja2, ruamel, diskcache, transitions, rich) are
imported inside the commands that need them, so `storyflow --help` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from storyflow.errors import EXIT_USAGE, StoryflowError

app = typer.Typer(
    name="storyflow",
    help="Run multi-agent story workflows from YAML: validated, resumable, observable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])


class Globals:
    """Options of the root command, shared by every subcommand."""

    debug: bool = False
    state_dir: str | None = None
    """``--state-dir`` as typed: a `Path` would read an empty one as ``.``."""


G = Globals()


def state_dir() -> Path:
    """The state directory: ``--state-dir``, else ``$STORYFLOW_STATE_DIR``, else
    ``./.storyflow``. A path that cannot be one (empty, too long, a symlink loop, not a
    directory, no permission) is a usage error."""
    if G.state_dir is not None:
        if not G.state_dir:  # `--state-dir "$UNSET"`: not the working directory
            from storyflow.errors import UsageError

            raise UsageError(
                "--state-dir is empty",
                hint="give it a directory, or leave it out to use $STORYFLOW_STATE_DIR "
                "or ./.storyflow",
            )
        return _usable(Path(G.state_dir), "--state-dir")
    env = os.environ.get("STORYFLOW_STATE_DIR")
    return _usable(Path(env), "$STORYFLOW_STATE_DIR") if env else Path.cwd() / ".storyflow"


def _usable(path: Path, origin: str) -> Path:
    import stat

    from storyflow.errors import UsageError

    hint = f"give {origin} a directory you can write to (it is created if missing)"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path  # created when first used
    except OSError as exc:  # too long, a symlink loop, a file in the way, no permission
        raise UsageError(f"{origin} {_shown(path)}: {exc.strerror or exc}", hint=hint) from exc
    if not stat.S_ISDIR(mode):
        raise UsageError(f"{origin} {_shown(path)} is not a directory", hint=hint)
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise UsageError(f"{origin} {_shown(path)}: permission denied", hint=hint)
    return path


def _shown(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} characters)"


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def report_error(exc: StoryflowError) -> None:
    from storyflow.errors import WorkflowError

    if isinstance(exc, WorkflowError):
        for p in exc.problems:
            err(p.format())
        n = sum(1 for p in exc.problems if p.severity == "error")
        err(f"{n} error{'s' if n != 1 else ''}: the workflow is invalid")
        return
    err(f"error: {exc.message}")
    if exc.hint:
        err(f"  hint: {exc.hint}")


def pick_run(store: Any, run_ref: str | None, last: bool) -> Any:
    """The run a command names: by id or unique prefix, or the newest with ``--last``."""
    from storyflow.errors import UsageError

    if (run_ref is None) == (not last):
        raise UsageError(
            "give a run id or --last" if run_ref is None else "give a run id or --last, not both",
            hint="storyflow runs lists runs",
        )
    if run_ref is not None:
        return store.find_run(run_ref)
    found = store.last_run()
    if found is None:
        raise UsageError("there are no runs yet", hint="start one with: storyflow run FILE")
    return found


def silence_stdout() -> None:
    """Point stdout at /dev/null so later writes (and the exit flush) cannot fail."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def guarded(fn: F) -> F:
    """Turn storyflow errors into a message and their exit code; no traceback unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StoryflowError as exc:
            if G.debug:
                raise
            report_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except BrokenPipeError:
            # `storyflow show RUN | head`: the reader has what it wanted.
            silence_stdout()
            raise typer.Exit(0) from None
        except Exception as exc:
            if G.debug:
                raise
            err(f"internal error: {type(exc).__name__}: {exc}")
            err("  hint: run again with --debug for a traceback, and report it")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        from storyflow import __version__

        typer.echo(f"storyflow {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    state_dir_opt: str | None = typer.Option(
        None,
        "--state-dir",
        metavar="<path>",
        help="Where runs are stored (default $STORYFLOW_STATE_DIR or ./.storyflow).",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run multi-agent story workflows from YAML: validated, resumable, observable."""
    G.debug = debug or os.environ.get("STORYFLOW_DEBUG") == "1"
    G.state_dir = state_dir_opt


def main() -> None:
    from storyflow.commands import (  # noqa: F401  (registers)
        cancel_cmds,
        diff_cmds,
        doctor_cmds,
        fork_cmds,
        gc_cmds,
        init_cmds,
        inspect_cmds,
        report_cmds,
        run_cmds,
        runs_cmds,
        spec_cmds,
    )

    _reopen_closed_streams()
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C outside a run
        sys.exit(130)
    except OSError as exc:  # `--help`/`--version` (no command yet) into a full disk
        err(f"error: cannot write the output: {exc.strerror or exc}")
        sys.exit(1)


def _reopen_closed_streams() -> None:
    """Point a standard stream the caller closed (`storyflow run FILE >&-`) at /dev/null.

    Python leaves it ``None``, so the first write would fail the command (a run
    included), and the next file opened, the store's database among them, would take
    its descriptor number, where a stray write to that stream would land."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        setattr(sys, name, open(fd, mode, encoding="utf-8", closefd=False))


__all__ = ["EXIT_USAGE", "G", "app", "err", "guarded", "main", "state_dir"]
