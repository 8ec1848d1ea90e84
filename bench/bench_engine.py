"""Engine benchmarks W1–W4, measured as whole `storyflow` processes, each next to its
floor (`floors.py`: the same durable commit per step and nothing else, measured in the
same run) and the ratio. Prints a table; the method is in bench/README.md.

W1  a chain of N no-op python steps passing a counter (goal: ≤ 2× the floor process,
    ≤ 200 µs per step beyond load+validate; the 10,000-step run ≤ 10× the 1,000-step
    one); W1i the same chain with ``blocking: false`` (no thread hop). Each is also
    shown against the W1 stack (`floors.py`: the floor on storyflow's libraries, with
    none of its code), and the default chain once more with every thread on one CPU
    (``taskset -c 0``), which shows what the thread hop's cross-CPU wake-ups cost.
W2  1,000 async steps sleeping 50 ms at --max-parallel 100 (goal ≤ 1.4× its floor)
W3  the W1 chain failing at step 900, then `resume`: none of the 899 re-run
W4  peak RSS of W1: ≤ 35 MB at 1,000 steps, ≤ 70 MB at 10,000

Usage: python bench/bench_engine.py [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floors import header, row, thread_hop_us, w1_floor, w1_stack, w2_floor
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
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "STORYFLOW_STATE_DIR": str(root / "state")}
        base_wall = statistics.median(
            timed([*STORYFLOW, "--version"], root, env)[0] for _ in range(5)
        )
        lines.append(row("startup (storyflow --version)", base_wall, None, "python + imports"))

        sizes = [1000] if quick else [1000, 10000]
        whole: dict[int, float] = {}
        for n in sizes:
            runs = 3 if n <= 1000 else 1
            floor = w1_floor(n, repeat=runs)
            stack = w1_stack(n, repeat=runs)
            lines.append(row(f"W1 stack {n:,} (no storyflow code)", stack, floor,
                             "typer + transitions + diskcache + asyncio alone"))
            for inline in (False, True):
                wf = chain(root / f"w1-{n}-{inline}", n, inline=inline)
                # Warm, as a second run of a file is: validated and parsed once already.
                timed([*STORYFLOW, "run", str(wf), "--no-progress"], wf.parent, env)
                wall = statistics.median(
                    timed([*STORYFLOW, "run", str(wf), "--no-progress"], wf.parent, env)[0]
                    for _ in range(runs)
                )
                validate = statistics.median(
                    timed([*STORYFLOW, "validate", str(wf)], wf.parent, env)[0]
                    for _ in range(runs)
                )
                per_step = (wall - validate) / n * 1e6
                name = f"W1{'i' if inline else ''} chain {n:,}" + (
                    " (blocking: false)" if inline else "")
                lines.append(row(name, wall, floor,
                                 f"≤ 2×; {per_step:.0f} µs/step beyond load+validate "
                                 f"({validate:.3f} s; goal ≤ 200)"))
                lines.append(row("  the same against the W1 stack", wall, stack, ""))
                if not inline and n <= 1000 and shutil.which("taskset"):
                    # Every thread on one CPU: the thread hop's wake-ups stay on that CPU.
                    pinned = statistics.median(
                        timed(["taskset", "-c", "0", *STORYFLOW, "run", str(wf),
                               "--no-progress"], wf.parent, env)[0]
                        for _ in range(runs)
                    )
                    lines.append(row(f"W1 chain {n:,} on one CPU (taskset -c 0)", pinned,
                                     floor, f"{(pinned - validate) / n * 1e6:.0f} µs/step "
                                     "beyond load+validate"))
                if not inline:
                    whole[n] = wall
                    rss = rss_of([*STORYFLOW, "run", str(wf), "--no-progress"], wf.parent, env)
                    lines.append(row(f"W4 peak RSS {n:,}", rss, None,
                                     f"≤ {35 if n <= 1000 else 70} MB", unit="MB"))

        if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
            same, across = (statistics.median(thread_hop_us(w) for _ in range(3))
                            for w in ("same", "across"))
            lines.append(row("thread hop, worker on the loop's CPU", same, None,
                             "run_in_executor round trip of a no-op", unit="µs"))
            lines.append(row("thread hop, worker on another CPU", across, same,
                             "the wake-ups a sync step pays", unit="µs"))

        wf = fan(root / "w2", 1000, 0.05)
        wall = statistics.median(
            timed([*STORYFLOW, "run", str(wf), "--no-progress", "--max-parallel", "100"],
                  wf.parent, env)[0]
            for _ in range(3)
        )
        lines.append(row("W2 1,000 × 50 ms, ×100", wall, w2_floor(1000, 100, 0.05), "≤ 1.4×"))

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
        lines.append(row("W3 resume after fail@900", wall, None,
                         f"exit {code}; re-ran {len(rerun)} steps, {len(early)} of the "
                         "first 899"))
    print(header())
    print("\n".join(lines))
    if len(whole) == 2:
        ratio = whole[10000] / whole[1000]
        print(f"W1 10,000 vs 1,000 steps, whole process: {ratio:.1f}× (goal ≤ 10×)")


if __name__ == "__main__":
    main()
