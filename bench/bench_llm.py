"""The ``llm`` agent under load: 1,000 calls to a local server answering after 50 ms.

L1  1,000 calls straight through `LlmAgent.run`, 100 at a time (asyncio.gather behind a
    semaphore), once per connection-pool setting (ideal 0.5 s)
L2  a whole `storyflow run` of a 1,000-item ``for_each`` map with ``uses: llm``, a pool
    ``{concurrency: 100}`` and ``--max-parallel 100`` (goal ≤ 1.2 s), next to the same
    map of python steps that sleep 50 ms: the engine's share of it
S   the client's CPU (`time.process_time`) for 1,000 calls of a 2,000-character
    (~500-token) reply, 100 at a time: streamed in 10 chunks of ~50 tokens vs one JSON
    body (goal: streaming ≤ 1.10x), the chunks 5 ms apart (each its own TCP read, as a
    model writes them) and all at once (one read); next to it the floor, httpx alone
    reading the same stream with ``aiter_raw`` and parsing nothing

The server (tests/llm_server.py) runs in its own process, so it does not compete with
the client for the GIL.

Figures on the 2-CPU dev container, shared with other test runs (Python 3.11, httpx
0.28.1, httpcore 1.0.9; median of 3):
  L1  1 client, httpx default Limits (100 connections, 20 kept alive)   9.2 s
  L1  1 client, max_keepalive_connections=100                          9.2 s
  L1  25 clients x 4 connections (llm_agent's CLIENTS, LIMITS)         1.1-1.4 s
  L2  storyflow run, 1,000 x llm, x100                                 2.7 s
      the same map of 50 ms python sleeps                              1.2 s
One client of 100 connections is CPU-bound in httpcore's pool, which scans every
connection for each request it queues or releases (encode/httpcore#1035): keeping all
100 alive or only 20 makes no difference next to that. Split into small pools the
client needs ~1 ms of CPU per call (httpx + httpcore + anyio + h11, flat), so L2 is
the engine's 1.2 s plus ~1 s of HTTP client work on one core; the 1.2 s goal is out of
reach with httpx here. Without `sniffio` installed, httpcore's failing
``import sniffio`` on every request adds another ~0.5 ms per call (L1 1.6 s).

Since the agent streams by default, L1 and L2 stream their one-word replies: L1 0.95 s,
L2 1.9 s (python sleeps 0.95 s) with httpx 0.29.0 as installed now. S, median of 5:
                                   plain    streamed  ratio
  chunks 5 ms apart    agent       0.741 s  1.308 s   1.77x
                       httpx alone 0.665 s  1.195 s   1.80x
  chunks all at once   agent       0.695 s  0.892 s   1.28x
                       httpx alone 0.639 s  0.761 s   1.19x
The goal of ≤ 1.10x is out of reach with httpx: reading the stream and parsing nothing
already costs 1.2-1.8x a plain call, for each HTTP chunk goes through h11, httpcore and
httpx's iterators (~10 µs), and each TCP read through anyio and the event loop (~35 µs,
when the chunks come apart, as a model writes them). The agent's own share — the SSE
reader, the idle watch, deltas — is 40-75 µs a call, +5-11% of a plain call. Holding
reads back to let chunks gather (sleep 20 ms between reads) cost more than it saved.

Measured again (median of 5; the container busier the second time):
                                   plain    streamed  ratio   agent's own share
  chunks 5 ms apart                0.726 s  1.250 s   1.72x   37 µs (+5%)
                                   0.821 s  1.283 s   1.56x   11 µs (+1%)
  chunks all at once               0.711 s  0.868 s   1.22x   44 µs (+6%)
                                   0.797 s  1.005 s   1.26x   67 µs (+8%)
The agent's share is the SSE parse, ~3 µs a chunk of 385 bytes, nearly all of it the
chunk's JSON. Tried, not kept:
- iterating ``Response.stream`` instead of ``aiter_raw`` (one generator layer and a
  chunker fewer a chunk): no difference beyond the noise (1.75x vs 1.78x, 1.31x vs 1.28x);
- an httpcore network backend on asyncio streams in place of anyio's, whose every read
  opens a cancel scope and pauses and resumes the socket's reading: 17-23% less CPU, but
  for plain and streamed calls alike (plain 0.765 → 0.635 s, streamed 1.345 → 1.053 s
  apart; 0.797 → 0.611 s, 0.959 → 0.807 s together), so the ratio stays (1.66x, 1.32x);
  it would also replace anyio's TLS, happy eyeballs and close handling under every call,
  and it needs httpx's private ``AsyncHTTPTransport._pool`` to be plugged in.

Usage: python bench/bench_llm.py [--quick | --stream]   (--quick: L1 only; --stream: S only)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cli"))
from storyflow.agents.base import Call  # noqa: E402
from storyflow.agents.llm_agent import CLIENTS, LIMITS, LlmAgent  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from floors import llm_floor  # noqa: E402

CALLS = 1000
CONCURRENCY = 100
DELAY_S = 0.05


REPLY_CHARS = 2000
"""~500 tokens at 4 characters a token."""
CHUNK_CHARS = 200
"""~50 tokens a streamed chunk."""
CHUNK_DELAY_S = 0.005


def start_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "llm_server.py"), "--delay", str(DELAY_S), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


async def direct(url: str, limits: httpx.Limits, clients: int) -> float:
    """Seconds for CALLS agent calls at CONCURRENCY, after one warm-up call."""
    agent = LlmAgent(limits=limits, clients=clients)
    gate = asyncio.Semaphore(CONCURRENCY)
    usage: list[dict[str, Any]] = []

    async def one(i: int) -> Any:
        call = Call(run_id="bench", step_id=f"s[{i}]", attempt=1,
                    inputs={"base_url": url, "model": "m", "prompt": f"item {i}"},
                    workflow_dir=ROOT, run_dir=ROOT, secrets={}, timeout_s=30,
                    meter=usage.append)
        async with gate:
            return await agent.run(call)

    try:
        await one(-1)
        start = time.perf_counter()
        outputs = await asyncio.gather(*(one(i) for i in range(CALLS)))
        wall = time.perf_counter() - start
    finally:
        await agent.aclose()
    assert outputs == ["hello"] * CALLS and len(usage) == CALLS + 1
    return wall


MODES = ("agent", "agent streamed", "httpx", "httpx streamed")
"""What `cpu` measures: the agent, plain and streamed; httpx alone, posting and reading
the body whole, and reading the stream (``aiter_raw``) without parsing it."""


async def cpu(url: str, mode: str) -> float:
    """Client CPU seconds of CALLS calls at CONCURRENCY in ``mode`` (of `MODES`), after a
    warm-up of CONCURRENCY calls."""
    agent = LlmAgent()
    clients = [httpx.AsyncClient(limits=LIMITS) for _ in range(CLIENTS)]
    gate = asyncio.Semaphore(CONCURRENCY)
    chunks: list[str] = []
    stream = mode.endswith("streamed")

    async def one(i: int) -> int:
        prompt = f"item {i}"
        async with gate:
            if mode.startswith("agent"):
                call = Call(run_id="bench", step_id=f"s[{i}]", attempt=1,
                            inputs={"base_url": url, "model": "m", "prompt": prompt,
                                    "stream": stream},
                            workflow_dir=ROOT, run_dir=ROOT, secrets={}, timeout_s=30,
                            delta=chunks.append)
                return len(await agent.run(call))
            client, chat = clients[i % CLIENTS], f"{url}/chat/completions"
            body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            if not stream:
                resp = await client.post(chat, json=body, timeout=30)
                return len(resp.json()["choices"][0]["message"]["content"])
            body.update(stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", chat, json=body,
                                     timeout=httpx.Timeout(30, read=None)) as resp:
                return sum([len(b) async for b in resp.aiter_raw()]) and REPLY_CHARS

    try:
        await asyncio.gather(*(one(i) for i in range(CONCURRENCY)))
        start = time.process_time()
        lengths = await asyncio.gather(*(one(i) for i in range(CALLS)))
        spent = time.process_time() - start
    finally:
        await agent.aclose()
        for client in clients:
            await client.aclose()
    assert lengths == [REPLY_CHARS] * CALLS, lengths[:3]
    if mode == "agent streamed":
        assert len(chunks) == (CALLS + CONCURRENCY) * REPLY_CHARS // CHUNK_CHARS
    return spent


def streaming() -> None:
    for label, delay in (("5 ms apart", CHUNK_DELAY_S), ("all at once", 0.0)):
        proc, url = start_server("--content-chars", str(REPLY_CHARS),
                                 "--chunk-chars", str(CHUNK_CHARS), "--chunk-delay", str(delay))
        try:
            spent: dict[str, list[float]] = {mode: [] for mode in MODES}
            for _ in range(5):
                for mode, cpus in spent.items():
                    cpus.append(asyncio.run(cpu(url, mode)))
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)
        med = {mode: statistics.median(cpus) for mode, cpus in spent.items()}
        print(f"S  {CALLS} x {REPLY_CHARS}-char replies x{CONCURRENCY}, client CPU, "
              f"{REPLY_CHARS // CHUNK_CHARS} chunks {label}:")
        for mode in MODES:
            print(f"   {mode:15} {runs(spent[mode])}")
        agent = med["agent streamed"] / med["agent"]
        floor = med["httpx streamed"] / med["httpx"]
        ours = (med["agent streamed"] - med["agent"]) - (med["httpx streamed"] - med["httpx"])
        print(f"   streamed/plain: agent {agent:.2f}x (goal <= 1.10x), httpx alone {floor:.2f}x; "
              f"the agent's own share {ours / CALLS * 1e6:.0f} us a call "
              f"({ours / med['agent'] * 100:+.0f}% of a plain call)")


NAP = """
import asyncio


async def nap(item):
    await asyncio.sleep(%r)
    return "hello"
"""


def map_workflow(folder: Path, step: str) -> Path:
    items = json.dumps(list(range(CALLS)))
    wf = folder / "map.yaml"
    wf.write_text(
        "apiVersion: storyflow/v1\nname: llm-map\n"
        f"pools:\n  llm: {{concurrency: {CONCURRENCY}}}\n"
        f"steps:\n  draft:\n    pool: llm\n    for_each: {items}\n{step}"
        "outputs:\n  n: \"{{ steps.draft.output | length }}\"\n",
        encoding="utf-8",
    )
    return wf


def whole_run(wf: Path) -> float:
    """Wall seconds of one `storyflow run` of ``wf`` (a fresh state folder each time)."""
    env = {**os.environ, "STORYFLOW_STATE_DIR": tempfile.mkdtemp(dir=wf.parent)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "storyflow", "run", str(wf), "--no-progress", "--json",
         "--max-parallel", str(CONCURRENCY)],
        cwd=wf.parent, env=env, capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - start
    summary = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    if proc.returncode != 0 or summary.get("outputs", {}).get("n") != CALLS:
        sys.exit(f"storyflow run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def runs(walls: list[float]) -> str:
    return f"{statistics.median(walls):.3f} s  (runs: {', '.join(f'{w:.3f}' for w in walls)})"


def main() -> None:
    quick = "--quick" in sys.argv
    if "--stream" in sys.argv:
        streaming()
        return
    proc, url = start_server()
    try:
        settings = {
            "1 client, httpx default Limits (100, 20 kept alive)": (httpx.Limits(), 1),
            "1 client, max_keepalive_connections=100": (
                httpx.Limits(max_connections=100, max_keepalive_connections=100), 1),
            f"{CLIENTS} clients x {LIMITS.max_connections} (the agent's default)": (
                LIMITS, CLIENTS),
        }
        ideal = CALLS / CONCURRENCY * DELAY_S
        for name, (limits, clients) in settings.items():
            walls = [asyncio.run(direct(url, limits, clients)) for _ in range(3)]
            print(f"L1 {CALLS} calls x{CONCURRENCY}, {name}: {runs(walls)}; "
                  f"{statistics.median(walls) / ideal:.2f}× the wire's pace ({ideal:g} s)")
        if not quick:
            with tempfile.TemporaryDirectory() as tmp:
                llm = Path(tmp) / "llm"
                llm.mkdir()
                wf = map_workflow(llm, f'    uses: llm\n    with: {{base_url: "{url}", model: m}}\n'
                                  '    prompt: "Write part {{ item }}"\n')
                walls = [whole_run(wf) for _ in range(3)]
                wire = llm_floor(url, CALLS, CONCURRENCY)
                print(f"L2 storyflow run, {CALLS} x llm, x{CONCURRENCY}: {runs(walls)}  "
                      f"(goal <= 1.2 s); floor, a plain httpx client process making the "
                      f"same calls: {wire:.3f} s; ratio {statistics.median(walls) / wire:.2f}×")
                floor = Path(tmp) / "floor"
                floor.mkdir()
                (floor / "nap.py").write_text(NAP % DELAY_S, encoding="utf-8")
                wf = map_workflow(floor, '    uses: python\n'
                                  '    with: {callable: "nap:nap", item: "{{ item }}"}\n')
                print(f"   the same map of python steps sleeping {DELAY_S * 1000:g} ms: "
                      f"{runs([whole_run(wf) for _ in range(3)])}  (the engine's share)")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    if not quick:
        streaming()


if __name__ == "__main__":
    main()
