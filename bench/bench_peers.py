"""CPU benchmark: one full OrthoGrad step, this package vs the peers a user would pick.

``make bench`` runs ``python bench/bench_peers.py``. For every workload (bench/workloads.py)
and retain batch B, with a forget batch of F = B rows:

1. memory: every (workload, B, peer) in its own child process (forked from this lean
   process before anything heavy runs; ``--memory-mode spawn`` starts a fresh interpreter
   instead): model and a 2-row warm-up step, RSS read from /proc/self/statm, one step with
   the real batches, peak RSS (VmHWM after a reset, bench/memory.py) - RSS before =
   peak extra MiB of the step;
2. correctness: each peer takes one step from the same initial weights on the same
   batches; its applied direction is checked against an fp64 reference
   (``peers/check.py``: orthogonality ‖G r‖/(‖G‖₂‖r‖) and agreement with the fp64
   projection). A peer that fails gets no timing and no ratio ("failed: <why>");
3. time: the passing peers' steps are timed round-robin (the order rotated every round,
   three input sets rotated), so all ratios of a row come from interleaved measurements
   in one process; each peer gets an equal share of the row's time budget, so a fast
   step is repeated more often than a slow one. Reported: the median over its rounds.

A peer that cannot run a workload is reported as "unsupported: <reason>". Results go to
``bench/results/<machine>-<commit>.json``; then ``plot_peers.py`` draws the PNGs and
``render_results.py`` regenerates the "OrthoGrad step vs peers" section of
bench/RESULTS.md from that file.

Threads: ``--threads 1`` by default. The CPU is shared, and a 2-thread OpenMP step with
a co-tenant on the other core waits at every barrier (measured 60-120x slower on this
machine for the small workloads); one thread per process gives ratios that survive a busy
neighbour. The memory children run ``--jobs 2`` at a time.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from memory import PeakMemory  # noqa: E402
from peers import PEERS, Unsupported, make_peer  # noqa: E402
from peers.check import EXACT_RTOL, MAX_ERROR, MAX_ORTHOGONALITY, gate, reference_check  # noqa: E402
from workloads import WORKLOADS, loss_per_sample, num_params  # noqa: E402

BATCH_SIZES = (8, 16, 32, 64, 128)
INPUT_SETS = 3
LR = 1e-3
MEMORY_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """lscpu's model name (platform.processor() when lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def commit() -> tuple[str, bool]:
    """(short HEAD, whether tracked files differ from it)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE).stdout.strip()
        except Exception:
            return ""
    return git("rev-parse", "--short", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def environment(threads: int) -> dict:
    sha, dirty = commit()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": _version("opacus"),
        "backpack": _version("backpack-for-pytorch"),
        "commit": sha,
        "dirty": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_start": os.getloadavg(),
    }


def machine_slug(cpu: str, cores: int) -> str:
    """'AMD EPYC', 2 -> 'amd-epyc-2c' (file names of the results)."""
    return re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") + f"-{cores}c"


# ------------------------------------------------------------------------------------------
# one peer on one workload
# ------------------------------------------------------------------------------------------
def build(peer: str, model, granularity: str):
    return make_peer(peer, model, loss_fn=loss_per_sample, granularity=granularity, lr=LR, backend="torch")


def memory_case(workload: str, B: int, peer: str, granularity: str) -> dict:
    """Peak extra resident memory (MiB) of one step, to be run in a fresh child process.

    Returns {"mib": float} or {"unsupported": reason, "short": ...} or {"error": ...}.
    """
    warnings.simplefilter("ignore")
    w = WORKLOADS[workload]
    try:
        p = build(peer, w.model(), granularity)
        p.step(*w.batches(2, seed=99))  # libraries, hooks, vmap set-up, allocator warm-up
        forget, retain = w.batches(B, seed=0)
        gc.collect()
        with PeakMemory() as mem:
            p.step(forget, retain)
        return {"mib": mem.extra_mib}
    except Unsupported as e:
        return {"unsupported": e.reason, "short": e.short}
    except MemoryError:
        return {"unsupported": "out of memory", "short": "out of memory"}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _fork_case(args) -> tuple[int, int]:
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run, report one JSON line, leave without cleanup handlers
        os.close(rd)
        try:
            out = memory_case(*args)
        except BaseException as e:  # noqa: BLE001 - the parent must hear about anything
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(wr, (json.dumps(out) + "\n").encode())
        os._exit(0)
    os.close(wr)
    return pid, rd


def run_memory(cases: list[tuple], jobs: int, mode: str, log) -> dict:
    """{case: result} for cases (workload, B, peer, granularity), ``jobs`` children at a time."""
    results: dict = {}
    pending = list(cases)
    running: dict = {}  # fd or Popen -> (case, start time, pid)
    while pending or running:
        while pending and len(running) < jobs:
            case = pending.pop(0)
            if mode == "fork":
                pid, fd = _fork_case(case)
                running[fd] = (case, time.time(), pid)
            else:
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--memory-case", case[0], str(case[1]), case[2], case[3]],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                )
                running[proc.stdout.fileno()] = (case, time.time(), proc)
        ready, _, _ = select.select(list(running), [], [], 1.0)
        now = time.time()
        for fd in list(running):
            case, start, handle = running[fd]
            if fd in ready:
                if mode == "fork":
                    data = b""
                    while chunk := os.read(fd, 65536):
                        data += chunk
                    os.close(fd)
                    os.waitpid(handle, 0)
                    text = data.decode()
                else:
                    text = handle.stdout.read()
                    handle.wait()
                try:
                    results[case] = json.loads(text.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    results[case] = {"error": "the child process died without a result (killed, or out of memory?)"}
                del running[fd]
            elif now - start > MEMORY_TIMEOUT_S:
                if mode == "fork":
                    os.kill(handle, 9)
                    os.waitpid(handle, 0)
                    os.close(fd)
                else:
                    handle.kill()
                    handle.wait()
                results[case] = {"error": f"timed out after {MEMORY_TIMEOUT_S} s"}
                del running[fd]
            else:
                continue
            log(f"  memory {case[0]} B={case[1]} {case[2]}: {_memory_text(results[case])}")
    return results


def _memory_text(r: dict) -> str:
    if "mib" in r:
        return f"{r['mib']:.1f} MiB"
    if "unsupported" in r:
        return f"unsupported: {r['short']}"
    return f"failed: {r['error']}"


# ------------------------------------------------------------------------------------------
# one (workload, B) row: correctness, then interleaved timing
# ------------------------------------------------------------------------------------------
def run_case(workload: str, B: int, peer_names, granularity: str, budget_s: float,
             min_rounds: int, max_rounds: int, slow_s: float, log) -> dict:
    """Check and time every peer on one workload and batch size (module doc, steps 2-3)."""
    warnings.simplefilter("ignore")
    w = WORKLOADS[workload]
    base = w.model(seed=0)
    sets = [w.batches(B, seed=s) for s in range(INPUT_SETS)]
    rows: dict[str, dict] = {}
    peers = {}
    for name in peer_names:
        try:
            peers[name] = build(name, copy.deepcopy(base), granularity)
        except Unsupported as e:
            rows[name] = {"status": "unsupported", "reason": e.reason, "short": e.short}
        except Exception as e:
            rows[name] = {"status": "failed", "reason": f"construction raised {type(e).__name__}: {e}"}
    first, directions, rtols = {}, {}, {}
    for name, p in list(peers.items()):
        try:
            t0 = time.perf_counter()
            p.step(*sets[0])
            first[name] = time.perf_counter() - t0
        except Unsupported as e:
            rows[name] = {"status": "unsupported", "reason": e.reason, "short": e.short}
        except Exception as e:
            rows[name] = {"status": "failed", "reason": f"step raised {type(e).__name__}: {e}",
                          "trace": traceback.format_exc(limit=4)}
        if name in rows:
            p.close()
            del peers[name]
            continue
        if p.projects:
            directions[name] = p.direction()
            rtols[name] = getattr(getattr(p, "orthograd", None), "rtol", EXACT_RTOL)
    t0 = time.perf_counter()
    ref_stats, checks = reference_check(base, loss_per_sample, *sets[0], directions, rtols, granularity=granularity)
    check_s = time.perf_counter() - t0
    for name, res in checks.items():
        why = gate(res)
        if why is not None:
            rows[name] = {"status": "failed", "reason": why, "check": res}
            peers.pop(name).close()
    # interleaved timing. Each peer gets an equal share of the row's budget: rounds_p =
    # share / (its first step), within [min_rounds, max_rounds]. A step longer than slow_s
    # is timed once, by its check step: its one-time costs (vmap set-up, hooks) are far
    # below 1% of such a step, and more multi-second steps would not fit make bench's budget.
    times: dict[str, list[float]] = {n: [first[n]] for n in peers if first[n] > slow_s}
    order = [n for n in peers if n not in times]
    share = budget_s / max(1, len(order))
    target = {}
    for n in order:
        target[n] = min(max_rounds, max(min_rounds, int(share // max(first[n], 1e-9))))
        times[n] = []
    rounds = max(target.values(), default=0)
    for r in range(rounds):
        active = [n for n in order if target[n] > r]
        k = r % len(active)
        for name in active[k:] + active[:k]:
            batch = sets[(r + 1) % INPUT_SETS]
            t0 = time.perf_counter()
            peers[name].step(*batch)
            times[name].append(time.perf_counter() - t0)
    for name, p in peers.items():
        ts = sorted(times[name])
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
        rows[name] = {
            "status": "ok",
            "time_s": {"median": statistics.median(ts), "q1": q[0], "q3": q[2], "min": ts[0],
                       "rounds": len(ts), "first_step": first[name], "check_step_only": name not in order},
        }
        if name in checks:
            rows[name]["check"] = checks[name]
        if name == "ours" and getattr(p, "stats", None):
            rows[name]["orthograd_stats"] = {k: v for k, v in p.stats.items() if isinstance(v, (int, float))}
        p.close()
    log(f"{workload:12s} B={B:<4d} check {check_s:5.1f}s  " + "  ".join(
        f"{n}={rows[n]['time_s']['median'] * 1e3:.1f}ms/{rows[n]['time_s']['rounds']}"
        if rows[n]["status"] == "ok" else f"{n}={rows[n]['status']}" for n in peer_names))
    return {"workload": workload, "B": B, "F": B, "rounds": rounds, "check_s": check_s,
            "reference": ref_stats, "peers": {n: rows[n] for n in peer_names}}


# ------------------------------------------------------------------------------------------
def _parse_list(text: str, allowed, kind):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {kind}: {', '.join(bad)} (choose from {', '.join(map(str, allowed))})")
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--granularity", default="per_tensor", choices=("per_tensor", "global"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1, module doc)")
    ap.add_argument("--budget-s", type=float, default=4.0,
                    help="timed seconds per (workload, B) row, shared equally by the peers")
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--slow-s", type=float, default=2.0,
                    help="a peer whose check step takes longer is timed by that step alone")
    ap.add_argument("--max-rounds", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=2, help="memory child processes at a time")
    ap.add_argument("--memory-mode", choices=("fork", "spawn"), default="fork")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory phase")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and PNGs")
    ap.add_argument("--no-render", action="store_true", help="write the JSON only (no plots, no RESULTS.md)")
    ap.add_argument("--page", default=None,
                    help="Markdown page whose peer section is regenerated (default: bench/RESULTS.md when --out "
                         "is bench/results, else <out>/RESULTS.md)")
    ap.add_argument("--memory-case", nargs=4, metavar=("WORKLOAD", "B", "PEER", "GRANULARITY"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_case:
        wl, B, peer, gran = a.memory_case
        print(json.dumps(memory_case(wl, int(B), peer, gran)))
        return 0
    if a.threads > 1 and a.memory_mode == "fork":
        a.memory_mode = "spawn"  # never fork a process whose OpenMP pool may be running
    workloads = _parse_list(a.workloads, WORKLOADS, "workload")
    sizes = [int(b) for b in _parse_list(a.batch_sizes, [str(b) for b in range(1, 4097)], "batch size")]
    peer_names = _parse_list(a.peers, PEERS, "peer")
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    env = environment(a.threads)
    log(f"{env['machine']}; torch {env['torch']} ({a.threads} thread(s)); opacus {env['opacus']}; "
        f"backpack {env['backpack']}; commit {env['commit']}{' (dirty)' if env['dirty'] else ''}; "
        f"load {env['load_start'][0]:.2f}")
    for wl in workloads:  # read the data once, before any child is forked
        WORKLOADS[wl].batches(1, 0)
    for mod in ("opacus", "backpack", "orthograd_fast.gram", "orthograd_fast.orthograd"):
        try:
            __import__(mod)  # import once here, not in every child
        except Exception:
            pass
    memory: dict = {}
    if not a.no_memory:
        cases = [(wl, B, p, a.granularity) for wl in workloads for B in sizes for p in peer_names]
        log(f"memory: {len(cases)} child processes ({a.memory_mode}, {a.jobs} at a time)")
        memory = run_memory(cases, a.jobs, a.memory_mode, log)
    t_mem = time.time() - t_start
    rows = []
    for wl in workloads:
        for B in sizes:
            row = run_case(wl, B, peer_names, a.granularity, a.budget_s, a.min_rounds, a.max_rounds, a.slow_s, log)
            for p in peer_names:
                if (wl, B, p, a.granularity) in memory:
                    row["peers"][p]["memory"] = memory[(wl, B, p, a.granularity)]
            rows.append(row)
            gc.collect()
    env["load_end"] = os.getloadavg()
    env["wall_s"] = time.time() - t_start
    env["memory_phase_s"] = t_mem
    result = {
        "meta": {
            **env,
            "granularity": a.granularity,
            "forget_rows": "F = B (forget batch as large as the retain batch)",
            "alpha": 0.0,
            "optimizer": f"SGD(lr={LR})",
            "budget_s": a.budget_s, "min_rounds": a.min_rounds, "max_rounds": a.max_rounds, "slow_s": a.slow_s,
            "input_sets": INPUT_SETS,
            "memory_mode": a.memory_mode if not a.no_memory else "skipped",
            "gates": {"max_orthogonality": MAX_ORTHOGONALITY, "max_error": MAX_ERROR, "exact_rtol": EXACT_RTOL},
            "peers": peer_names,
        },
        "workloads": {
            wl: {"title": WORKLOADS[wl].title, "params": num_params(WORKLOADS[wl].model()), "inputs": WORKLOADS[wl].inputs}
            for wl in workloads
        },
        "cases": rows,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{machine_slug(env['cpu'], env['cores'])}-{env['commit']}.json"
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    log(f"wrote {path} ({env['wall_s']:.0f} s, memory phase {t_mem:.0f} s, load now {env['load_end'][0]:.2f})")
    if not a.no_render:
        import plot_peers
        import render_results

        for png in plot_peers.plot(path):
            log(f"wrote {png}")
        page = Path(a.page) if a.page else (
            render_results.RESULTS_MD if out.resolve() == (HERE / "results").resolve() else out / "RESULTS.md")
        log(f"updated {render_results.render(path, page)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
