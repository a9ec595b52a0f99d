"""A/B of the row model's cost (issue 8): the SampleGram benchmark's OrthoGrad-shaped step
(bench_sample_gram.py, paths store and store_og) at two commits, in alternating worker
processes, each timed interleaved with a plain forward+backward in its own process.

    python bench/ab_row_model.py OLD_TREE NEW_TREE [--rounds 3] [--cases mlp,cnn,transformer]

OLD_TREE/NEW_TREE: checkouts (e.g. ``git worktree add /tmp/wt-old 0d2356f``). Prints, per
(case, path), the best process-CPU "x plain" ratio of each tree over the rounds (CPU time
is less sensitive to other processes on a shared machine than wall time) and the change.
The row check itself runs once per input signature (the warm-up step), so this measures
the steady-state cost: signature lookup, per-call layout lookup, canonical views.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def run(tree: str, case: str, path: str, reps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, f"{tree}/bench/bench_sample_gram.py", "--worker", case, path,
                          "--reps", str(reps), "--budget", "60"], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", default="mlp,cnn,transformer")
    ap.add_argument("--paths", default="store,store_og")
    a = ap.parse_args()
    best: dict = {}
    for _ in range(a.rounds):
        for case in a.cases.split(","):
            for path in a.paths.split(","):
                for name, tree in (("old", a.old), ("new", a.new)):
                    r = run(tree, case, path, a.reps)
                    ratio = r["cpu_best_s"] / r["plain_cpu_best_s"]
                    key = (case, path, name)
                    best[key] = min(best.get(key, float("inf")), ratio)
    print("| model | path | before (x plain, CPU) | after | change |")
    print("|---|---|---|---|---|")
    for case in a.cases.split(","):
        for path in a.paths.split(","):
            o, n = best[(case, path, "old")], best[(case, path, "new")]
            print(f"| {case} | {path} | {o:.2f} | {n:.2f} | {100 * (n / o - 1):+.1f}% |")


if __name__ == "__main__":
    main()
