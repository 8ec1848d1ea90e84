"""The ``llm`` agent under load: 1,000 calls to a local server answering after 50 ms.

L1  1,000 calls straight through `LlmAgent.run`, 100 at a time (asyncio.gather behind a
    semaphore; ideal 0.5 s, goal ≤ 0.8 s)
L2  a whole `storyflow run` of a 1,000-item ``for_each`` map with ``uses: llm``, a pool
    ``{concurrency: 100}`` and ``--max-parallel 100`` (goal ≤ 1.2 s), next to its floor (a
    plain aiohttp client process making the same calls, bench/floors.py) and the same map
    of python steps that sleep 50 ms: the engine's share of it
S   the client's CPU (`time.process_time`) for 1,000 calls of a 2,000-character
    (~500-token) reply, 100 at a time: streamed in 10 chunks of ~50 tokens vs one JSON
    body (goal: streaming ≤ 1.10x), the chunks 5 ms apart (each its own TCP read, as a
    model writes them) and all at once (one read); next to it two floors, aiohttp alone
    reading the same stream with ``iter_any`` and parsing nothing, and raw asyncio streams
    (a hand-written request, the bytes read to ``Content-Length`` or the chunked
    terminator): what streaming costs the transport itself, no HTTP client in between

The server (tests/llm_server.py) runs in its own process, so it does not compete with
the client for the GIL. L1 and L2 stream their one-word replies (the agent's default).

Figures on the 2-CPU dev container, shared with other work (Python 3.11, aiohttp 3.14.5;
medians of 3, S of 5; L2 over four sets of runs):
  L1  1 aiohttp session x 100 connections           0.64-0.72 s
  L2  storyflow run, 1,000 x llm, x100              1.13-1.28 s   (floor 0.80-0.84 s)
      the same map of 50 ms python sleeps           0.90-0.94 s
  S                          plain    streamed  ratio
    chunks 5 ms apart  agent    0.172 s  0.351 s   2.04x
                       aiohttp  0.131 s  0.253 s   1.92x
                       raw      0.036 s  0.158 s   4.43x
    chunks together    agent    0.191 s  0.257 s   1.34x
                       aiohttp  0.137 s  0.144 s   1.05x
                       raw      0.035 s  0.092 s   2.62x
A plain call costs the agent ~0.17-0.19 ms of CPU, aiohttp alone ~0.13 ms. L2 is the
engine's ~0.9 s plus that CPU and importing aiohttp (~0.12 s, a third of it the two SSL
contexts aiohttp makes at import): at the goal, not under it with room.

The ≤ 1.10x goal for S is out of reach, and not for the HTTP client: the raw floor's
ratio is the worst (2.6x, 4.4x), for its plain call costs ~35 µs. Streaming adds fixed
costs that no client removes — a TCP read and an event-loop wake-up per chunk when they
come apart (raw: +122 µs a call, ~12 µs a read; aiohttp the same), +57 µs (raw) and
+7 µs (aiohttp, whose plain row includes the JSON parse) with them together — and the
agent adds its own ~58 µs a call (SSE parse, idle watch, deltas). The cheaper a plain
call gets, the more these weigh in the ratio.

Why aiohttp and not httpx: measured the same way, httpx + httpcore + anyio + h11 spend
~0.7 ms of CPU per plain call (S: agent 0.78-0.80 s, httpx alone 0.72 s), and one
httpcore pool of 100 connections is quadratic (L1 9 s; 25 pools of 4: 1.15 s): the agent
on httpx made L1 1.15 s and L2 1.84 s (floor 1.58 s). aiohttp's C HTTP parser and
constant-time pool take a call to ~0.17 ms in one session.

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

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cli"))
from storyflow.agents.base import Call  # noqa: E402
from storyflow.agents.llm_agent import CONNECTIONS, LlmAgent  # noqa: E402

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


async def direct(url: str) -> float:
    """Seconds for CALLS agent calls at CONCURRENCY, after one warm-up call."""
    agent = LlmAgent()
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


MODES = ("agent", "agent streamed", "aiohttp", "aiohttp streamed", "raw", "raw streamed")
"""What `cpu` measures: the agent, plain and streamed; aiohttp alone, posting and reading
the body whole (and its JSON), and reading the stream (``iter_any``) without parsing it;
raw asyncio streams, a hand-written request and the bytes read to the end of the body
(``Content-Length``, or the chunked terminator), parsing nothing."""


class Raw:
    """Keep-alive connections on asyncio streams, one per call in flight."""

    def __init__(self, url: str) -> None:
        rest = url.split("://", 1)[1]
        self.host, _, port = rest.split("/", 1)[0].partition(":")
        self.port = int(port)
        self.path = "/" + rest.split("/", 1)[1] + "/chat/completions"
        self.free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def call(self, body: bytes, stream: bool) -> int:
        if self.free:
            reader, writer = self.free.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened.append(writer)
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (
                         self.path.encode(), self.host.encode(), self.port, len(body), body))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if stream:
            total, tail = 0, b""
            while not tail.endswith(b"0\r\n\r\n"):
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed mid-body")
                total, tail = total + len(data), (tail + data)[-5:]
        else:
            at = head.lower().index(b"content-length:") + 15
            total = len(await reader.readexactly(int(head[at:head.index(b"\r\n", at)])))
        self.free.append((reader, writer))
        return total

    async def aclose(self) -> None:
        for writer in self.opened:
            writer.close()
            await writer.wait_closed()


async def cpu(url: str, mode: str) -> float:
    """Client CPU seconds of CALLS calls at CONCURRENCY in ``mode`` (of `MODES`), after a
    warm-up of CONCURRENCY calls."""
    agent = LlmAgent()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        limit=CONNECTIONS, keepalive_timeout=30), headers={"Content-Type": "application/json"})
    raw = Raw(url)
    gate = asyncio.Semaphore(CONCURRENCY)
    chunks: list[str] = []
    stream = mode.endswith("streamed")
    chat = f"{url}/chat/completions"
    plain_timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=30)
    stream_timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30)

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
            body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
            data = json.dumps(body).encode()
            if mode.startswith("raw"):
                return await raw.call(data, stream) and REPLY_CHARS
            if not stream:
                async with session.post(chat, data=data, timeout=plain_timeout) as resp:
                    reply = json.loads(await resp.read())
                return len(reply["choices"][0]["message"]["content"])
            async with session.post(chat, data=data, timeout=stream_timeout) as resp:
                return sum([len(b) async for b in resp.content.iter_any()]) and REPLY_CHARS

    try:
        await asyncio.gather(*(one(i) for i in range(CONCURRENCY)))
        start = time.process_time()
        lengths = await asyncio.gather(*(one(i) for i in range(CALLS)))
        spent = time.process_time() - start
    finally:
        await agent.aclose()
        await session.close()
        await raw.aclose()
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
        floor = med["aiohttp streamed"] / med["aiohttp"]
        raw = med["raw streamed"] / med["raw"]
        ours = (med["agent streamed"] - med["agent"]) - (med["aiohttp streamed"] - med["aiohttp"])
        print(f"   streamed/plain: agent {agent:.2f}x (goal <= 1.10x), aiohttp alone "
              f"{floor:.2f}x, raw asyncio streams {raw:.2f}x; the agent's own share "
              f"{ours / CALLS * 1e6:.0f} us a call ({ours / med['agent'] * 100:+.0f}% of a "
              "plain call)")


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
    """Wall seconds of one `storyflow run` of ``wf``, in the state folder beside it: warm
    after the first run, as a user's second run of a file is (bench/README.md)."""
    env = {**os.environ, "STORYFLOW_STATE_DIR": str(wf.parent / "state")}
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
        ideal = CALLS / CONCURRENCY * DELAY_S
        walls = [asyncio.run(direct(url)) for _ in range(3)]
        print(f"L1 {CALLS} calls x{CONCURRENCY}, 1 aiohttp session x {CONNECTIONS} connections: "
              f"{runs(walls)}  (goal <= 0.8 s); {statistics.median(walls) / ideal:.2f}× the "
              f"wire's pace ({ideal:g} s)")
        if not quick:
            with tempfile.TemporaryDirectory() as tmp:
                llm = Path(tmp) / "llm"
                llm.mkdir()
                wf = map_workflow(llm, f'    uses: llm\n    with: {{base_url: "{url}", model: m}}\n'
                                  '    prompt: "Write part {{ item }}"\n')
                whole_run(wf)  # the warm-up: the file parsed and validated once
                walls = [whole_run(wf) for _ in range(3)]
                wire = llm_floor(url, CALLS, CONCURRENCY)
                print(f"L2 storyflow run, {CALLS} x llm, x{CONCURRENCY}: {runs(walls)}  "
                      f"(goal <= 1.2 s); floor, a plain aiohttp client process making the "
                      f"same calls: {wire:.3f} s; ratio {statistics.median(walls) / wire:.2f}×")
                floor = Path(tmp) / "floor"
                floor.mkdir()
                (floor / "nap.py").write_text(NAP % DELAY_S, encoding="utf-8")
                wf = map_workflow(floor, '    uses: python\n'
                                  '    with: {callable: "nap:nap", item: "{{ item }}"}\n')
                print(f"   the same map of python steps sleeping {DELAY_S * 1000:g} ms: "
                      f"{runs([whole_run(wf) for _ in range(4)][1:])}  (the engine's share)")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    if not quick:
        streaming()


if __name__ == "__main__":
    main()
