"""Engine benchmarks W1–W4, measured as whole `storyflow` processes. Prints a table.

W1  a chain of N no-op python steps passing a counter (goal ≤ 0.6 s whole at 1,000,
    ≤ 300 µs overhead per step, per-step cost at 10,000 no higher than at 1,000)
W2  1,000 async steps sleeping 50 ms at --max-parallel 100 (goal ≤ 0.8 s; ideal 0.5 s)
W3  the W1 chain failing at step 900, then `resume`: none of the 899 re-run, the resume
    process ≤ 0.4 s whole
W4  peak RSS of W1: ≤ 50 MB at 1,000 steps, ≤ 120 MB at 10,000

Usage: python bench/bench_engine.py [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import chain, fan

STORYFLOW = [sys.executable, "-m", "storyflow"]


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int, float]:
    """Wall seconds, exit code and peak RSS (MB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
    return wall, proc.returncode, max(peak, before) / 1024


def rss_of(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    try:
        return int(out.stderr.strip().splitlines()[-1]) / 1024
    except (ValueError, IndexError):
        return float("nan")


def main() -> None:
    quick = "--quick" in sys.argv
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "STORYFLOW_STATE_DIR": str(root / "state")}
        base_wall = statistics.median(
            timed([*STORYFLOW, "--version"], root, env)[0] for _ in range(5)
        )
        rows.append(("startup", f"{base_wall:.3f} s", "python + storyflow --version"))

        sizes = [1000] if quick else [1000, 10000]
        per_step = {}
        for n in sizes:
            wf = chain(root / f"w1-{n}", n)
            runs = 3 if n <= 1000 else 1
            walls = [
                timed([*STORYFLOW, "run", str(wf), "--no-progress"], wf.parent, env)[0]
                for _ in range(runs)
            ]
            wall = statistics.median(walls)
            validate = statistics.median(
                timed([*STORYFLOW, "validate", str(wf)], wf.parent, env)[0] for _ in range(3)
            )
            per_step[n] = (wall - validate) / n * 1e6
            rows.append(
                (
                    f"W1 chain {n}",
                    f"{wall:.3f} s",
                    f"{per_step[n]:.0f} µs/step beyond load+validate ({validate:.3f} s)",
                )
            )
            rss = rss_of([*STORYFLOW, "run", str(wf), "--no-progress"], wf.parent, env)
            rows.append((f"W4 peak RSS {n}", f"{rss:.1f} MB", "goal ≤ 50 MB (1k), ≤ 120 MB (10k)"))

        wf = fan(root / "w2", 1000, 0.05)
        walls = [
            timed(
                [*STORYFLOW, "run", str(wf), "--no-progress", "--max-parallel", "100"],
                wf.parent,
                env,
            )[0]
            for _ in range(3)
        ]
        rows.append(
            (
                "W2 1000 × 50 ms, ×100",
                f"{statistics.median(walls):.3f} s",
                "goal ≤ 0.8 s, ideal 0.5 s",
            )
        )

        wf = chain(root / "w3", 1000, fail_at=900)
        _, code, _ = timed(
            [*STORYFLOW, "run", str(wf), "--no-progress", "--run-id", "w3"], wf.parent, env
        )
        assert code == 1, f"W3 first run should fail, exit {code}"
        (wf.parent / "fail.flag").unlink()
        wall, code, _ = timed([*STORYFLOW, "resume", "w3", "--json"], wf.parent, env)
        events = subprocess.run(
            [*STORYFLOW, "logs", "w3", "--json"],
            cwd=wf.parent,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        started = [json.loads(line) for line in events.splitlines()]
        resumed_at = max(i for i, e in enumerate(started) if e["type"] == "run.resumed")
        rerun = {e["step"] for e in started[resumed_at:] if e["type"] == "step.started"}
        early = sorted(s for s in rerun if int(s[1:]) < 899)
        rows.append(
            (
                "W3 resume after fail@900",
                f"{wall:.3f} s",
                f"exit {code}; re-ran {len(rerun)} steps, {len(early)} of the first 899",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark'.ljust(width)}  {'figure':>10}  note")
    for name, figure, note in rows:
        print(f"{name.ljust(width)}  {figure:>10}  {note}")
    if len(per_step) == 2:
        a, b = per_step[1000], per_step[10000]
        print(f"per-step cost 10k vs 1k: {b:.0f} vs {a:.0f} µs ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
