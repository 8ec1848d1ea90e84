"""How fast the command line answers: `storyflow --help`, and `validate` of 1,000 steps.

    .venv/bin/python bench/bench_cli.py [--steps N] [--runs N]

Prints a table of wall times (medians of fresh subprocesses), the in-process split of
`load_workflow` (YAML, schema, semantic checks, build, plan), and whether `--help`
imports any heavy library. Exits 1 when a goal is missed, so CI can hold the line.

Goals: `--help` ≤ 0.15 s; `validate` of a 1,000-step workflow ≤ 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HELP_GOAL_S = 0.15
VALIDATE_GOAL_S = 0.3
HEAVY = ("jsonschema", "jinja2", "ruamel", "diskcache", "transitions", "rich")


def chain_workflow(steps: int) -> str:
    """A chain of template steps, each reading the previous one's output."""
    lines = [
        "apiVersion: storyflow/v1",
        f"name: chain-{steps}",
        "inputs:",
        '  premise: {type: string, default: "A lighthouse keeper finds a map"}',
        "steps:",
        '  s0: {uses: template, with: {template: "Start: {{ inputs.premise }}"}}',
    ]
    for i in range(1, steps):
        template = f"{{{{ steps.s{i - 1}.output }}}} +{i}"
        lines.append(f'  s{i}: {{uses: template, with: {{template: "{template}"}}}}')
    lines.append("outputs:")
    lines.append(f'  story: "{{{{ steps.s{steps - 1}.output }}}}"')
    return "\n".join(lines) + "\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    env["NO_COLOR"] = "1"
    return env


def wall(cmd: Sequence[str], runs: int, *, ok: tuple[int, ...] = (0,)) -> list[float]:
    """Wall times of ``runs`` fresh subprocesses of ``cmd``."""
    times = []
    env = _env()
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - start)
        if result.returncode not in ok:
            sys.exit(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr.decode()}")
    return times


def heavy_imports_on_help(python: str) -> list[str]:
    result = subprocess.run(
        [python, "-X", "importtime", "-m", "storyflow", "--help"],
        capture_output=True, text=True, env=_env(), check=False,
    )
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def pipeline_split(path: Path) -> dict[str, float]:
    """`load_workflow` taken apart (a copy of its pipeline), one timing per stage."""
    from storyflow.agents.registry import kinds as known_kinds
    from storyflow.engine.plan import plan
    from storyflow.spec import build, schema, semantic, template_engine, yaml_source

    kinds = known_kinds()
    out: dict[str, float] = {}
    out["yaml"], src = _timed(lambda: yaml_source.load(path))
    assert not src.problems, src.problems
    out["schema"], problems = _timed(lambda: schema.check(src, src.data))
    assert not problems, problems
    out["semantic"], analysis = _timed(
        lambda: semantic.check(src, src.data, template_engine(), kinds)
    )
    assert not analysis.problems, analysis.problems
    out["build"], wf = _timed(
        lambda: build.build(src.data, analysis, path=str(path), environment=None, source_hash="")
    )
    out["plan"], _ = _timed(lambda: plan(wf))
    out["total"] = sum(out.values())
    return out


def in_process(path: Path, runs: int) -> tuple[float, dict[str, float], dict[str, float]]:
    """(import time, first call's split, median split of ``runs`` warm calls)."""
    start = time.perf_counter()
    import jinja2  # noqa: F401
    import jsonschema  # noqa: F401
    import ruamel.yaml  # noqa: F401

    import storyflow.engine.plan
    import storyflow.spec.build
    import storyflow.spec.semantic  # noqa: F401

    imports = time.perf_counter() - start
    cold = pipeline_split(path)
    warm_runs = [pipeline_split(path) for _ in range(runs)]
    warm = {k: statistics.median(r[k] for r in warm_runs) for k in cold}
    return imports, cold, warm


def row(name: str, seconds: float, goal: float | None = None) -> str:
    verdict = ""
    if goal is not None:
        verdict = f"≤ {goal:.2f} s  " + ("ok" if seconds <= goal else "MISSED")
    return f"  {name:<50} {seconds * 1000:8.1f} ms   {verdict}".rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=10, help="subprocess runs for --help")
    args = parser.parse_args(argv)

    python = sys.executable
    script = str(Path(python).with_name("storyflow"))
    validate_runs = max(1, args.runs // 2)
    missed = False

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"chain-{args.steps}.yaml"
        path.write_text(chain_workflow(args.steps), encoding="utf-8")
        size_kb = path.stat().st_size / 1024

        help_module = statistics.median(wall([python, "-m", "storyflow", "--help"], args.runs))
        help_script = (
            statistics.median(wall([script, "--help"], args.runs))
            if Path(script).exists() else None
        )
        bare = statistics.median(wall([python, "-c", "pass"], args.runs))
        tiny = Path(tmp) / "tiny.yaml"
        tiny.write_text(chain_workflow(1), encoding="utf-8")
        validate_tiny = statistics.median(
            wall([python, "-m", "storyflow", "validate", str(tiny)], validate_runs)
        )
        validate = statistics.median(
            wall([python, "-m", "storyflow", "validate", str(path)], validate_runs)
        )
        validate_script = (
            statistics.median(wall([script, "validate", str(path)], validate_runs))
            if Path(script).exists() else None
        )
        graph = statistics.median(
            wall([python, "-m", "storyflow", "graph", str(path), "--format", "text"],
                 validate_runs)
        )
        imports, cold, warm = in_process(path, validate_runs)
    heavy = heavy_imports_on_help(python)

    print(f"storyflow CLI benchmark  (python {sys.version.split()[0]}, {sys.platform})")
    print(f"  {args.steps}-step chain workflow: {size_kb:.0f} KiB; medians of "
          f"{args.runs} (--help) and {validate_runs} (validate) fresh processes")
    print()
    print("  wall time, fresh process")
    print(row("python -c pass (interpreter floor)", bare))
    print(row("python -m storyflow --help", help_module, HELP_GOAL_S))
    missed |= help_module > HELP_GOAL_S
    if help_script is not None:
        print(row("storyflow --help (console script)", help_script, HELP_GOAL_S))
        missed |= help_script > HELP_GOAL_S
    print(row("python -m storyflow validate (1 step: fixed cost)", validate_tiny))
    print(row(f"python -m storyflow validate ({args.steps} steps)", validate, VALIDATE_GOAL_S))
    missed |= validate > VALIDATE_GOAL_S
    if validate_script is not None:
        print(row(f"storyflow validate ({args.steps} steps, script)", validate_script,
                  VALIDATE_GOAL_S))
    print(row(f"python -m storyflow graph --format text ({args.steps})", graph))
    print()
    print("  in process: load_workflow split               first call      warm (median)")
    print(f"  {'imports (ruamel, jsonschema, jinja2, spec)':<48} {imports * 1000:8.1f} ms")
    for stage in ("yaml", "schema", "semantic", "build", "plan", "total"):
        print(f"  {stage:<48} {cold[stage] * 1000:8.1f} ms   {warm[stage] * 1000:8.1f} ms")
    print()
    verdict = "none (ok)" if not heavy else ", ".join(heavy) + "  MISSED"
    print(f"  heavy imports on --help: {verdict}")
    missed |= bool(heavy)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
