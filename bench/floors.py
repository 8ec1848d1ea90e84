"""The floors the benchmarks are measured against: what any orchestrator with storyflow's
promises must pay, measured on this machine in the same run as the figure.

W1 floor   a python process that opens a diskcache store with storyflow's settings
           (SQLite, WAL, synchronous=NORMAL) and, per step, commits one step record in
           its own transaction: the durable checkpoint a step needs, and nothing else —
           no parsing, no templates, no state machine, no events.
W1 stack  the W1 floor on the libraries storyflow is built on and nothing of its own: a
           process that imports typer, transitions, diskcache and asyncio and, per step,
           moves a `transitions` machine through ready → running → succeeded around an
           asyncio task calling the function, commits the step's record and appends one
           JSON event line. What any orchestrator on this stack pays before its features.
W2 floor   the same, for 1,000 asyncio tasks sleeping 50 ms, 100 at a time, each
           committing its record when it ends.
L floor    a plain aiohttp client process making the same chat-completions calls to the
           same fake server, 100 at a time (one session of 100 kept-alive connections,
           as the agent pools them), reading each JSON reply: the wire's pace plus the
           HTTP client.

Each floor is a whole process, timed like the figure it is compared with (wall clock,
from exec to exit), so both pay the interpreter's start.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

_STORE = """
import sys, tempfile
import diskcache
n = int(sys.argv[1])
d = tempfile.mkdtemp()
c = diskcache.Cache(d, sqlite_journal_mode="wal", sqlite_synchronous=1, statistics=0,
                    eviction_policy="none", sqlite_wal_autocheckpoint=10000, cull_limit=0,
                    size_limit=2**40)
rec = {"id": "s0", "status": "succeeded", "attempts": 1, "fingerprint": "0" * 24,
       "output": 1, "error": None, "ready_at": 1.0, "started_at": 1.0, "ended_at": 1.0,
       "agent": None, "degraded": False, "request": None, "forked_from": None,
       "meta": {"def": "0" * 24}}
"""

W1_FLOOR = _STORE + """
for i in range(n):
    rec["id"], rec["output"] = f"s{i}", i
    with c.transact():
        c.set(f"step:r:s{i}", rec)
c.close()
"""

W1_STACK = _STORE + """
import asyncio, json, logging
import typer  # noqa: F401 — the CLI's import, as `storyflow run` pays it
from transitions import Machine
logging.getLogger("transitions").setLevel(logging.WARNING)
machine = Machine(model=None, states=["pending", "ready", "running", "succeeded"],
                  transitions=[{"trigger": "ready", "source": "pending", "dest": "ready"},
                               {"trigger": "start", "source": "ready", "dest": "running"},
                               {"trigger": "succeed", "source": "running", "dest": "succeeded"}],
                  initial="pending", auto_transitions=False)
ready, start, succeed = (machine.events[e] for e in ("ready", "start", "succeed"))
log = open(d + "/events.jsonl", "a")

class Step:
    __slots__ = ("id", "state")

def inc(n):
    return n + 1

async def attempt(step, n):
    start.trigger(step)
    out = inc(n)
    succeed.trigger(step)
    return out

async def main():
    n_out = 0
    for i in range(n):
        step = Step()
        step.id, step.state = f"s{i}", "pending"
        ready.trigger(step)
        n_out = await asyncio.ensure_future(attempt(step, n_out))
        rec["id"], rec["output"], rec["status"] = step.id, n_out, step.state
        with c.transact():
            c.set(f"step:r:{step.id}", rec)
        log.write(json.dumps({"type": "step.succeeded", "step": step.id}) + "\\n")
        log.flush()

asyncio.run(main())
c.close()
"""

HOP = """
import asyncio, os, sys, time
from concurrent.futures import ThreadPoolExecutor
where, n = sys.argv[1], int(sys.argv[2])
# The loop on CPU 0; the pool's thread on CPU 0 too ("same") or on CPU 1 ("across").
worker_cpu = {0} if where == "same" else {1}
os.sched_setaffinity(0, {0})
pool = ThreadPoolExecutor(1, initializer=lambda: os.sched_setaffinity(0, worker_cpu))

def noop(i):
    return i

async def main():
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(pool, noop, 0)
    start = time.perf_counter()
    for i in range(n):
        await loop.run_in_executor(pool, noop, i)
    print((time.perf_counter() - start) / n * 1e6)

asyncio.run(main())
"""

W2_FLOOR = _STORE + """
import asyncio
width, nap = int(sys.argv[2]), float(sys.argv[3])

async def step(i, gate):
    async with gate:
        await asyncio.sleep(nap)
        with c.transact():
            c.set(f"step:r:s{i}", dict(rec, id=f"s{i}"))

async def main():
    gate = asyncio.Semaphore(width)
    await asyncio.gather(*(step(i, gate) for i in range(n)))

asyncio.run(main())
c.close()
"""

L_FLOOR = """
import asyncio, json, sys
import aiohttp
url, n, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main():
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=width, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=30))
    gate = asyncio.Semaphore(width)
    async def call(i):
        async with gate:
            body = {"model": "m", "messages": [{"role": "user", "content": f"call {i}"}]}
            async with session.post(url + "/chat/completions", data=json.dumps(body).encode(),
                                    headers={"Content-Type": "application/json"}) as r:
                return json.loads(await r.read())["choices"][0]["message"]["content"]
    await asyncio.gather(*(call(i) for i in range(n)))
    await session.close()

asyncio.run(main())
"""


def _timed(code: str, *args: str, repeat: int) -> float:
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *args], check=True)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def w1_floor(steps: int, repeat: int = 3) -> float:
    """Seconds of the W1 floor process for ``steps`` steps."""
    return _timed(W1_FLOOR, str(steps), repeat=repeat)


def w1_stack(steps: int, repeat: int = 3) -> float:
    """Seconds of the W1 stack process (the floor on storyflow's libraries) for ``steps``."""
    return _timed(W1_STACK, str(steps), repeat=repeat)


def thread_hop_us(where: str, calls: int = 3000) -> float:
    """µs of one `run_in_executor` round trip of a no-op, the loop on CPU 0 and the
    worker thread on the ``same`` CPU or ``across`` on CPU 1 (needs two CPUs)."""
    out = subprocess.run([sys.executable, "-c", HOP, where, str(calls)], check=True,
                         capture_output=True, text=True).stdout
    return float(out)


def w2_floor(steps: int, width: int, nap_s: float, repeat: int = 3) -> float:
    """Seconds of the W2 floor process."""
    return _timed(W2_FLOOR, str(steps), str(width), str(nap_s), repeat=repeat)


def llm_floor(base_url: str, calls: int, width: int, repeat: int = 3) -> float:
    """Seconds of a plain aiohttp client process making ``calls`` calls ``width`` at once."""
    return _timed(L_FLOOR, base_url, str(calls), str(width), repeat=repeat)


def row(name: str, figure: float, floor: float | None, goal: str, unit: str = "s") -> str:
    """One line of a benchmark table: the figure, its floor, the ratio, the goal."""
    if floor is None:
        return f"{name:<38} {figure:>9.3f} {unit:<2} {'':>9}    {'':>6}  {goal}"
    return (f"{name:<38} {figure:>9.3f} {unit:<2} {floor:>9.3f} {unit:<2} "
            f"{figure / floor:>5.2f}×  {goal}")


def header() -> str:
    return f"{'benchmark':<38} {'figure':>12} {'floor':>12} {'ratio':>6}  goal"


if __name__ == "__main__":
    print(header())
    print(row("W1 floor, 1,000 commits", w1_floor(1000), None, "the W1 floor process"))
    print(row("W1 stack, 1,000 steps", w1_stack(1000), None, "the W1 stack process"))
    print(row("W2 floor, 1,000 × 50 ms ×100", w2_floor(1000, 100, 0.05), None,
              "the W2 floor process"))
