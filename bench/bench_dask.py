"""Dask executor benchmarks, measured as whole `storyflow` processes. Prints a table.

D1  dispatch overhead: a chain of 200 no-op python steps on a temporary LocalCluster of
    2 workers, against the same chain run locally; the time from the first step's start
    to the last step's end, per step (goal: ≤ 5 ms per step more than local; Dask's own
    round trip is ~1–2 ms)
D2  scale-out: 200 python steps that each hold their thread for 200 ms (a slow tool),
    --max-parallel 64, on 1 vs 4 single-thread workers (goal: 4 workers ≥ 3× faster)

Cluster start-up is reported apart (the run.started event comes once the cluster is
up). Usage: python bench/bench_dask.py [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import chain, fan

STORYFLOW = [sys.executable, "-m", "storyflow"]


def run(wf: Path, env: dict[str, str], *args: str) -> tuple[float, list[dict[str, Any]]]:
    """Wall seconds of one ``storyflow run --json`` and its events."""
    start = time.perf_counter()
    proc = subprocess.run(
        [*STORYFLOW, "run", str(wf), "--json", *args],
        cwd=wf.parent, env=env, capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{wf.name} failed (exit {proc.returncode})")
    return wall, [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def span(events: list[dict[str, Any]]) -> float:
    """Seconds from the first step.started to the last step end."""
    starts = [e["ts"] for e in events if e["type"] == "step.started"]
    ends = [e["ts"] for e in events if e["type"] in ("step.succeeded", "step.failed")]
    return max(ends) - min(starts)


async def _noop(x: int) -> int:
    return x


def dask_round_trip(n: int = 200) -> float:
    """Dask's own floor: ms per submit-and-await of a no-op on a LocalCluster of 2
    worker processes, Dask's settings as they come."""
    import asyncio
    import logging

    from distributed import Client, LocalCluster

    async def go() -> float:
        async with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                asynchronous=True, dashboard_address=None,
                                silence_logs=logging.ERROR) as cluster, \
                Client(cluster, asynchronous=True) as client:
            await client.submit(_noop, -1, pure=False)
            start = time.perf_counter()
            for i in range(n):
                await client.submit(_noop, i, pure=False)
            return (time.perf_counter() - start) / n * 1e3

    return asyncio.run(go())


def with_executor(wf: Path, workers: int, threads: int = 1) -> Path:
    text = wf.read_text().replace(
        "steps:\n", f"executor: {{dask: {{workers: {workers}, threads: {threads}}}}}\nsteps:\n", 1
    )
    out = wf.with_name(f"{wf.stem}-dask{workers}.yaml")
    out.write_text(text)
    return out


def main() -> None:
    quick = "--quick" in sys.argv
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "STORYFLOW_STATE_DIR": str(root / "state")}
        n = 200
        wf = chain(root / "d1", n)
        _, local = run(wf, env)
        wall, dask = run(with_executor(wf, 2), env)
        local_step = span(local) / n * 1e3
        dask_step = span(dask) / n * 1e3
        startup = wall - span(dask)
        rows.append(("D0 Dask round trip", f"{dask_round_trip():.2f} ms",
                     "submit + await of a no-op, Dask's defaults (its floor here)"))
        rows.append(("D1 chain 200, local", f"{local_step:.2f} ms", "per step"))
        rows.append(("D1 chain 200, dask ×2", f"{dask_step:.2f} ms",
                     f"per step; dispatch overhead {dask_step - local_step:.2f} ms/step "
                     f"(goal ≤ 5 ms); cluster start + stop {startup:.2f} s"))

        steps = 40 if quick else 200
        wf = fan(root / "d2", steps, 0.2, callable_="slow")
        spans = {}
        for workers in (1, 4):
            wall, events = run(with_executor(wf, workers), env, "--max-parallel", "64")
            spans[workers] = span(events)
            rows.append((f"D2 {steps} × 200 ms, {workers} worker{'s' if workers > 1 else ''}",
                         f"{spans[workers]:.2f} s",
                         f"steps' span; whole process {wall:.2f} s "
                         f"(ideal {steps * 0.2 / workers:.1f} s)"))
        rows.append(("D2 speed-up 4 vs 1", f"{spans[1] / spans[4]:.2f}×", "goal ≥ 3×"))
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark'.ljust(width)}  {'figure':>10}  note")
    for name, figure, note in rows:
        print(f"{name.ljust(width)}  {figure:>10}  {note}")


if __name__ == "__main__":
    main()
