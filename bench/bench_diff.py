"""How fast `storyflow diff` answers for two 1,000-step runs.

    .venv/bin/python bench/bench_diff.py [--steps N] [--runs N] [--changed F]

Builds two runs directly with the Store API (no workflow runs): each with top-level
task steps, a map of 50 items and a loop of 24-step iterations (B has one iteration
more), outputs of about 80 words (text, or JSON holding text), token usage, and a
5,000-word story.md artifact
(50 paragraphs); B changes a fraction of the outputs (``--changed``) and
some words of the story. Then times `storyflow diff` through the console script (text,
json, html; medians of fresh processes) and in process (reading, comparing, rendering),
and once more with every output changed. Exits 1 when a goal is missed.

Goal: `storyflow diff` of two 1,000-step runs ≤ 1 s end to end.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

GOAL_S = 1.0
MAP_ITEMS = 50
LOOP_BODY = 24
WORDS = ("the lamp keeper map tide harbour gull letter watch town sea light door "
         "night stone ledger council quay brother voice winter boat bell salt").split()


def _text(rng: random.Random, n: int = 80) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def _edit(rng: random.Random, text: str, share: float = 0.05) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * share))):
        words[i] = rng.choice(WORDS).upper()
    return " ".join(words)


def _ids(steps: int, iterations: int) -> tuple[list[str], list[str]]:
    """(top-level ids, every instance id) of a run shaped like the workload."""
    tasks = steps - MAP_ITEMS - 2 * LOOP_BODY - 2
    top = [f"s{i}" for i in range(tasks)] + ["draft", "polish"]
    body = [f"b{j}" for j in range(LOOP_BODY)]
    every = [f"s{i}" for i in range(tasks)] + ["draft"]
    every += [f"draft[{i}]" for i in range(MAP_ITEMS)] + ["polish"]
    every += [f"polish#{k}.{b}" for k in range(1, iterations + 1) for b in body]
    return top, every


def build_runs(root: Path, steps: int, changed: float, seed: int = 7) -> tuple[str, str, int]:
    """Two runs in a store at ``root``: (run A, run B, instances of A)."""
    from storyflow.store import RunRecord, StepRecord, Store

    rng = random.Random(seed)
    t0 = time.time() - 3600
    ids: dict[str, int] = {"A": 2, "B": 3}  # loop iterations
    names = {"A": "20250101-120000-aaaaaa", "B": "20250101-120500-bbbbbb"}
    outputs: dict[str, Any] = {}
    with Store(root) as store:
        for side in ("A", "B"):
            top, every = _ids(steps, ids[side])
            run_id = names[side]
            store.put_run(RunRecord(
                run_id=run_id, workflow="bench", workflow_path=str(root / "bench.yaml"),
                workflow_version="1", source_hash="h", status="succeeded",
                inputs={"premise": "A lighthouse keeper finds a map",
                        "tone": "wistful" if side == "A" else "eerie"},
                environment=None, sets=[] if side == "A" else ["seed=8"],
                created_at=t0, updated_at=t0 + 60, ended_at=t0 + 60,
                meta={"steps": top}))
            records = []
            for n, iid in enumerate(every):
                meta: dict[str, Any] = {"usage": {"tokens": 500 + n % 300, "cost": 0.001}}
                if iid == "draft":
                    meta = {"items": MAP_ITEMS}
                elif iid == "polish":
                    meta = {"iterations": ids[side], "body": [f"b{j}" for j in range(LOOP_BODY)]}
                if iid not in outputs:
                    text = _text(rng)
                    outputs[iid] = text if n % 2 else {"text": text, "score": n % 10,
                                                       "tags": ["a", "b"]}
                out = outputs[iid]
                if side == "B" and rng.random() < changed:
                    out = _edit(rng, out) if isinstance(out, str) else {
                        **out, "text": _edit(rng, out["text"]), "score": out["score"] + 1}
                records.append(StepRecord(
                    id=iid, status="succeeded", attempts=1, fingerprint=f"f{iid}",
                    output=out, ready_at=t0 + n * 0.01, started_at=t0 + n * 0.01,
                    ended_at=t0 + n * 0.01 + 0.5, agent="writer", meta=meta))
            store.put_steps(run_id, records)
            story = "\n\n".join(_text(random.Random(p), 100) for p in range(50))
            folder = store.run_dir(run_id)
            (folder / "story.md").write_text(story if side == "A" else
                                             _edit(random.Random(2), story), encoding="utf-8")
            (folder / "events.jsonl").write_text("", encoding="utf-8")
    return names["A"], names["B"], len(_ids(steps, 2)[1])


def _wall(cmd: Sequence[str], runs: int, env: dict[str, str]) -> tuple[float, int]:
    """(median wall time of ``runs`` fresh processes, bytes printed)."""
    times, size = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            sys.exit(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr.decode()}")
        size = len(result.stdout)
    return statistics.median(times), size


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def in_process(root: Path, run_a: str, run_b: str) -> dict[str, float]:
    """The command's work, stage by stage (imports already paid)."""
    import json

    from storyflow import compare
    from storyflow.store import Store, instance_records

    out: dict[str, float] = {}
    start = time.perf_counter()
    with Store(root) as store:
        sides = []
        for ref in (run_a, run_b):
            record = store.find_run(ref)
            ids, steps = instance_records(store, record)
            sides.append(compare.RunRecords(record, ids, steps))
        out["read (store, both runs' records)"] = time.perf_counter() - start
        out["artifacts (compare the run folders)"], artifacts = _timed(
            lambda: compare.compare_folders(store.run_dir(run_a), store.run_dir(run_b)))
    out["build the diff"], diff = _timed(
        lambda: compare.build_diff(sides[0], sides[1], artifacts=artifacts))
    out["render text"], _ = _timed(lambda: compare.render_text(diff))
    out["render json"], _ = _timed(
        lambda: json.dumps(compare.to_document(diff), indent=2, ensure_ascii=False))
    out["render html"], _ = _timed(lambda: compare.render_html(diff))
    return out


def row(name: str, seconds: float, goal: float | None = None, note: str = "") -> str:
    verdict = ""
    if goal is not None:
        verdict = f"≤ {goal:.2f} s  " + ("ok" if seconds <= goal else "MISSED")
    return f"  {name:<56} {seconds * 1000:8.1f} ms   {verdict}{note}".rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="instances of run A")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per figure")
    parser.add_argument("--changed", type=float, default=0.1,
                        help="share of B's outputs that differ from A's")
    args = parser.parse_args(argv)

    python = sys.executable
    script = Path(python).with_name("storyflow")
    base = [str(script)] if script.exists() else [python, "-m", "storyflow"]
    missed = False
    results: list[tuple[str, float, bool, int]] = []
    splits: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, share in (("", args.changed), (" (every output changed)", 1.0)):
            root = Path(tmp) / f"state{share}"
            run_a, run_b, n = build_runs(root, args.steps, share)
            env = {**os.environ, "STORYFLOW_STATE_DIR": str(root), "NO_COLOR": "1"}
            for fmt in ("text", "json", "html"):
                seconds, size = _wall([*base, "diff", run_a[:15], run_b[:15], "--format", fmt],
                                      args.runs, env)
                results.append((f"storyflow diff --format {fmt}{label}", seconds, True, size))
            in_process(root, run_a, run_b)  # warm the imports
            splits[label or f" ({share:.0%} of outputs changed)"] = in_process(root, run_a, run_b)
        bare, _ = _wall([*base, "--help"], args.runs, dict(os.environ))

    print(f"storyflow diff benchmark  (python {sys.version.split()[0]}, {sys.platform})")
    print(f"  two runs of {n:,} step instances (B: {n + LOOP_BODY:,}, one more loop iteration),"
          f" ~80-word outputs, a 5,000-word story.md;")
    print(f"  medians of {args.runs} fresh processes of {' '.join(base)}")
    print()
    print("  wall time, fresh process")
    print(row("storyflow --help (start-up floor)", bare))
    for name, seconds, goal, size in results:
        print(row(name, seconds, GOAL_S if goal else None, f"   {size / 1024:,.0f} KiB out"))
        missed |= goal and seconds > GOAL_S
    for label, split in splits.items():
        print()
        print(f"  in process{label}")
        for stage, seconds in split.items():
            print(row(stage, seconds))
        print(row("total", sum(split.values())))
    print()
    print("MISSED a goal" if missed else "all goals met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
