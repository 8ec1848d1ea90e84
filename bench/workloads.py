"""Generated workloads for the engine benchmarks (W1–W4 of the engine issue)."""

from __future__ import annotations

from pathlib import Path

AGENTS = """
import asyncio
import os
import time


def inc(n):
    return n + 1


def boom_at(n, fail_at):
    # Fails while the flag file exists, so the fix does not change any step definition.
    if n == fail_at and os.path.exists("fail.flag"):
        raise ValueError(f"planned failure at {n}")
    return n + 1


async def nap(seconds):
    await asyncio.sleep(seconds)
    return seconds


def slow(seconds):
    # A slow tool: holds its thread (a worker's only one, on a single-thread worker).
    time.sleep(seconds)
    return seconds
"""


def chain(folder: Path, steps: int, *, fail_at: int | None = None,
          inline: bool = False) -> Path:
    """W1/W3: a chain of no-op python steps passing a counter (``inline``: each says
    ``blocking: false``, so it runs on the event loop without a thread hop)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_agents.py").write_text(AGENTS)
    lines = ["apiVersion: storyflow/v1", f"name: chain-{steps}", "steps:"]
    extra = ", blocking: false" if inline else ""
    for i in range(steps):
        n = "0" if i == 0 else f'"{{{{ steps.s{i - 1}.output }}}}"'
        if fail_at is None:
            lines.append(
                f'  s{i}: {{uses: python, with: {{callable: "bench_agents:inc", n: {n}{extra}}}}}'
            )
        else:
            lines.append(
                f'  s{i}: {{uses: python, with: {{callable: "bench_agents:boom_at", '
                f"n: {n}, fail_at: {fail_at}}}}}"
            )
    lines.append("outputs:")
    lines.append(f'  last: "{{{{ steps.s{steps - 1}.output }}}}"')
    if fail_at is not None:
        (folder / "fail.flag").write_text("remove me to fix the failure")
    path = folder / f"chain-{steps}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fan(folder: Path, steps: int, seconds: float, *, callable_: str = "nap") -> Path:
    """W2: independent async steps that sleep (``slow``: sync steps that hold a thread)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_agents.py").write_text(AGENTS)
    lines = ["apiVersion: storyflow/v1", f"name: fan-{steps}", "steps:"]
    for i in range(steps):
        lines.append(
            f'  s{i}: {{uses: python, with: {{callable: "bench_agents:{callable_}", '
            f"seconds: {seconds}}}}}"
        )
    path = folder / f"fan-{steps}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
