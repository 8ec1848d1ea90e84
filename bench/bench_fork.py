"""Fork vs resume, and replay, on the W1 chain of 1,000 python steps. Prints a table.

F1  `fork RUN --from s990` of a finished 1,000-step run (990 steps copied, 10 run)
    against `resume RUN --from s990` of a copy of the same state (990 kept, 10 run):
    goal fork ≤ 1.5× resume.
F2  `replay RUN` of the same run, every call answered from the record.

Each figure is the median of alternating whole-process runs.

Usage: python bench/bench_fork.py [--repeat N]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import chain

STORYFLOW = [sys.executable, "-m", "storyflow"]
STEPS = 1000
FROM = "s990"


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall


def main() -> None:
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 5
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wf = chain(root / "w", STEPS)
        base = root / "base"
        env = {**os.environ, "STORYFLOW_STATE_DIR": str(base), "NO_COLOR": "1"}
        timed([*STORYFLOW, "run", str(wf), "--run-id", "base", "--no-progress"], wf.parent, env)
        forks, resumes, replays = [], [], []
        for i in range(repeat):
            # Resume works on a copy of the state (it changes its run); fork and replay
            # leave their parent alone and make a new run in the same store.
            state = root / f"r{i}"
            shutil.copytree(base, state)
            renv = {**env, "STORYFLOW_STATE_DIR": str(state)}
            resumes.append(timed([*STORYFLOW, "resume", "base", "--from", FROM,
                                  "--no-progress"], wf.parent, renv))
            shutil.rmtree(state)
            forks.append(timed([*STORYFLOW, "fork", "base", "--from", FROM, "--no-progress"],
                               wf.parent, env))
            replays.append(timed([*STORYFLOW, "replay", "base", "--no-progress"],
                                 wf.parent, env))
        runs = json.loads(subprocess.run([*STORYFLOW, "runs", "--json", "--limit", "2"],
                                         env=env, capture_output=True, text=True,
                                         check=True).stdout)
        assert runs, "no runs"
    f, r, p = (statistics.median(x) for x in (forks, resumes, replays))
    print(f"{'figure':<44} {'measured':>10} {'floor':>10} {'ratio':>7}  goal")
    print(f"{'F1 fork --from s990 of 1,000 steps':<44} {f:>9.3f}s {r:>9.3f}s {f / r:>6.2f}×"
          "  ≤ 1.5× resume")
    print(f"{'F2 replay of 1,000 steps (all answered)':<44} {p:>9.3f}s {'':>10} {'':>7}")


if __name__ == "__main__":
    main()
