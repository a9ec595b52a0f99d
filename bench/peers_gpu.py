"""GPU variant of the peer benchmark: one OrthoGrad step per peer, timed with do_bench.

Run by bench/gpu_check.sh on a lent GPU (plain python3 with torch and triton; no opacus or
backpack there, which the table reports as unavailable rather than leaving out). For each
workload (bench/workloads.py, random inputs where the machine has no data) and B, with
F = B, per_tensor granularity, alpha = 0, SGD:

* correctness first: each peer's first step is checked against the fp64 reference on the
  GPU (bench/peers/check.py, same gates as on CPU); a failing peer is not timed;
* time: ``triton.testing.do_bench`` (median and 20/80 quantiles, ms), three input sets
  rotated so repeats do not replay one batch;
* memory: ``torch.cuda.max_memory_allocated`` during one step minus the memory allocated
  just before it (model, optimizer, inputs and a 2-row warm-up step's leftovers already
  there; the weights are reset to the initial ones after the warm-up), MiB.

Peers here: ``ours`` (OrthoGrad, backend "auto"), ``authors`` (vmap + per-tensor QR,
cuSOLVER), ``loop``, ``plain``; ``opacus`` and ``backpack`` when importable. Prints one
table (ratios = peer / this package) and, with ``--json PATH``, writes the numbers there.
A time budget (``--budget-s``) stops starting new rows; rows not reached are printed as
"not run (time budget)"; each row is printed (and the JSON rewritten) as soon as it is
done. Without CUDA it says so and exits 0 without doing anything; ``--device cpu`` runs
the same code on the CPU with a plain timer and no memory figures (a smoke test of this
script, tests/test_bench_peers.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

GPU_PEERS = ("ours", "authors", "opacus", "backpack", "loop", "plain")
BATCH_SIZES = (8, 32, 128)
INPUT_SETS = 3


def _available(peer: str) -> str | None:
    """None if the peer's library imports here, else why not."""
    mod = {"opacus": "opacus", "backpack": "backpack"}.get(peer)
    if mod is None:
        return None
    try:
        __import__(mod)
    except Exception as e:
        return f"not installed on this machine ({type(e).__name__}: {e})"
    return None


def cpu_bench(fn, warmup: int, rep: int, quantiles):
    """do_bench's contract on the CPU (the ``--device cpu`` smoke run): calls for ``warmup``
    ms, then timed calls for ``rep`` ms (at least 3); the requested quantiles, ms."""
    t_end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return [float(v) for v in torch.tensor(times).quantile(torch.tensor(quantiles, dtype=torch.float64).float())]


def _step_memory_mib(step, dev: torch.device) -> float | None:
    """Peak extra CUDA memory of one call of step, MiB (None off CUDA: not measured)."""
    if dev.type != "cuda":
        step()
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    step()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - before) / 2**20


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_row(workload: str, B: int, peer_names, *, warmup_ms: int, rep_ms: int, device: str = "cuda") -> dict:
    """Check, time and measure every peer on one workload and B (module doc)."""
    from peers import Unsupported, make_peer
    from peers.check import EXACT_RTOL, gate, reference_check
    from workloads import WORKLOADS, loss_per_sample

    dev = torch.device(device)
    if dev.type == "cuda":
        from triton.testing import do_bench
    else:
        do_bench = cpu_bench
    w = WORKLOADS[workload]
    base = w.model(seed=0).to(dev)
    sets = [w.batches(B, seed=s, device=dev) for s in range(INPUT_SETS)]
    warm = w.batches(2, seed=99, device=dev)
    base_params = [q.detach() for q in base.parameters() if q.requires_grad]
    out: dict[str, dict] = {}
    peers, directions, rtols = {}, {}, {}
    for name in peer_names:
        why = _available(name)
        if why:
            out[name] = {"status": "unavailable", "reason": why, "short": "not installed on this machine"}
            continue
        try:
            p = make_peer(name, copy.deepcopy(base), loss_fn=loss_per_sample, granularity="per_tensor",
                          lr=1e-3, backend="auto")
            p.step(*warm)  # libraries, handles, workspaces: not part of a step's memory
            with torch.no_grad():  # back to the initial weights (plain SGD keeps no state)
                for q, q0 in zip(p.params, base_params):
                    q.copy_(q0)
            mib = _step_memory_mib(lambda p=p: p.step(*sets[0]), dev)
        except Unsupported as e:
            out[name] = {"status": "unsupported", "reason": e.reason, "short": e.short}
            continue
        except torch.cuda.OutOfMemoryError as e:
            out[name] = {"status": "unsupported", "reason": f"out of GPU memory: {e}", "short": "out of memory"}
            _free(dev)
            continue
        except Exception as e:
            out[name] = {"status": "failed", "reason": f"step raised {type(e).__name__}: {e}"}
            continue
        peers[name] = p
        out[name] = {"status": "ok", "memory_mib": mib}
        if p.projects:
            directions[name] = p.direction()
            rtols[name] = getattr(getattr(p, "orthograd", None), "rtol", EXACT_RTOL)
    _, checks = reference_check(base, loss_per_sample, *sets[0], directions, rtols)
    for name, res in checks.items():
        out[name]["check"] = res
        why = gate(res)
        if why:
            out[name] = {"status": "failed", "reason": why, "check": res}
            peers.pop(name)
    for name, p in peers.items():
        counter = [0]

        def step(p=p, counter=counter):
            counter[0] += 1
            p.step(*sets[counter[0] % INPUT_SETS])

        med, q20, q80 = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        out[name]["ms"] = {"median": med, "q20": q20, "q80": q80}
        p.close()
    peers = base = sets = None  # free before the next row
    _free(dev)
    return out


def _cell(row: dict, ours_ms: float | None) -> str:
    if row["status"] == "ok" and "ms" in row:
        ms = row["ms"]["median"]
        ratio = f" ({ms / ours_ms:.2g}x)" if ours_ms else ""
        orth = f" o={row['check']['orthogonality']:.0e}" if "check" in row else ""
        mem = "" if row.get("memory_mib") is None else f" {row['memory_mib']:.0f} MiB"
        return f"{ms:.3g} ms{ratio}{mem}{orth}"
    if row["status"] in ("unsupported", "unavailable"):
        return f"{row['status']}: {row['short']}"
    return f"{row['status']}: {row.get('reason', '')[:60]}"


def _table_line(title: str, B: int, row: dict | None, peer_names) -> str:
    if row is None:
        return f"| {title} | {B} | " + " | ".join(["not run (time budget)"] * len(peer_names)) + " |"
    ours = row.get("ours", {})
    ours_ms = ours.get("ms", {}).get("median") if ours.get("status") == "ok" else None
    return f"| {title} | {B} | " + " | ".join(_cell(row[p], ours_ms) for p in peer_names) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="digits-mlp,mlp-1024,cnn-28,transformer")
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    ap.add_argument("--peers", default=",".join(GPU_PEERS))
    ap.add_argument("--budget-s", type=float, default=110.0,
                    help="start no new row after this many seconds (keep it under the caller's timeout)")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script (tests)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("peers_gpu: no CUDA device here (torch.cuda.is_available() is False); this benchmark runs on a "
              "lent GPU through bench/gpu_check.sh. Nothing was measured.")
        return 0
    warnings.simplefilter("ignore")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import triton

    from workloads import WORKLOADS

    workloads = [x for x in a.workloads.split(",") if x]
    sizes = [int(b) for b in a.batch_sizes.split(",") if b]
    peer_names = [x for x in a.peers.split(",") if x]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=HERE).stdout.strip() or "unknown"
    except Exception:
        sha = "unknown"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke run: CPU timer, no memory)"
    head = (f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; "
            f"commit {sha}; per_tensor, alpha 0, F = B, SGD; do_bench medians (warmup {a.warmup_ms} ms, "
            f"rep {a.rep_ms} ms); memory = max_memory_allocated during one step - allocated before")
    print(head)
    # the table is printed row by row, so a run cut short by its caller's timeout keeps its rows
    print("\n== OrthoGrad step vs peers (GPU): median ms (peer / this package), peak extra MiB, "
          "orthogonality ==")
    print("| workload | B | " + " | ".join(peer_names) + " |")
    print("|---|---|" + "---|" * len(peer_names), flush=True)
    t0 = time.time()
    results = []
    for wl in workloads:
        for B in sizes:
            row = None
            if time.time() - t0 <= a.budget_s:
                t_row = time.time()
                row = run_row(wl, B, peer_names, warmup_ms=a.warmup_ms, rep_ms=a.rep_ms, device=a.device)
                row["_seconds"] = round(time.time() - t_row, 1)
            results.append({"workload": wl, "B": B, "peers": row})
            print(_table_line(WORKLOADS[wl].title, B, row and {k: v for k, v in row.items() if k != "_seconds"},
                              peer_names), flush=True)
            if a.json:  # rewritten after every row, for the same reason
                Path(a.json).write_text(json.dumps({"header": head, "rows": results}, indent=1, default=float) + "\n")
    failed = any(r["peers"] and any(isinstance(v, dict) and v["status"] == "failed" for v in r["peers"].values())
                 for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
