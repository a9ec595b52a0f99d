"""SampleGram on CPU: one OrthoGrad-shaped step against the paths a user would otherwise take.

Batch: B = 64 retain rows (one segment each) + a forget batch of 64 rows (one segment),
S = 65, on (a) an MLP 784-1024-1024-10, (b) a CNN on 28x28 inputs, (c) a small
transformer (T = 64 tokens + class token, d = 128, 2 encoder layers). Paths:

    plain          one forward + backward of the summed loss over the 128 rows (the floor)
    store          SampleGram(mode="store"): record + gram + fp64 solve + combine
    store_og       the same with record_grads=False, as OrthoGrad.step runs it: Linear/Conv
                   weights are read detached, so the record pass skips their summed
                   gradient, which combine writes anyway
    stream         SampleGram(mode="stream"): record + gram + solve + reweight pass
    authors        reference.authors_orthograd_direction: vmap per-sample retain gradients
                   (a B x P buffer) + forget gradient + per-tensor torch.linalg.qr
    vmap_gram      vmap per-sample retain gradients + forget gradient + one global fp64 Gram
    torchjd        TorchJD's ``autogram.Engine`` (the nearest peer computing an exact
                   per-sample Gram with hooks): the (N x N) Gramian of the per-row losses,
                   summed into the S segments, the same fp64 solve, then the per-row losses
                   backpropagated with their segment's weight (its documented usage). Its
                   Gram is checked against this package's on the same rows before it is
                   timed (``check_gram``); a peer that is not installed is reported as such

Two ways to run it:

* ``python bench/bench_sample_gram.py [--write]``: every (model, path) in its own
  subprocess. Each path is timed interleaved with ``plain`` in its process: best wall and
  process-CPU time of a few repeats after a warm-up (best-of: the 2 cores are shared);
  "x plain" ratios are within a process, "authors / this" divides the two paths' x-plain
  ratios. Peak memory comes from another process running only that path, from the idle
  state (model and data built, no .grad): the largest net tensor allocation during one
  step (torch profiler allocation records), and max RSS minus an idle process (glibc set
  to return freed blocks to the OS, so RSS follows live tensors more closely).
  ``--write`` replaces the "## SampleGram (CPU)" section of bench/RESULTS.md with the
  table, the machine, torch version and git commit.
* ``pytest bench/bench_sample_gram.py --benchmark-only``: the same steps as
  pytest-benchmark cases (time only).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
B = 64
CASES = ("mlp", "cnn", "transformer")
PATHS = ("plain", "store", "store_og", "stream", "authors", "vmap_gram", "torchjd")
U32 = 2.0**-24


# ------------------------------------------------------------------------------ models
def build(case: str):
    """(model, x_forget, y_forget, x_retain, y_retain), fixed seed."""
    from orthograd_fast.unlearning.models import ClassTokenTransformer

    torch.manual_seed(0)
    if case == "mlp":
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        x = torch.randn(2 * B, 784)
    elif case == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
        )
        x = torch.randn(2 * B, 1, 28, 28)
    elif case == "transformer":
        model = ClassTokenTransformer(16, 10, d=128, heads=4, ff=256, seq_len=64, layers=2)
        x = torch.randn(2 * B, 64, 16)
    else:
        raise ValueError(case)
    y = torch.randint(0, 10, (2 * B,))
    return model, x[:B], y[:B], x[B:], y[B:]


def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def ce_mean(out, y):
    return F.cross_entropy(out, y)


# ------------------------------------------------------------------------------ steps
def make_step(case: str, path: str):
    """A zero-argument callable running one step of ``path`` on ``case``."""
    from orthograd_fast import reference as ref
    from orthograd_fast.gram import SampleGram
    from orthograd_fast.linalg import gram_pinv

    model, xf, yf, xr, yr = build(case)
    x = torch.cat([xf, xr])
    y = torch.cat([yf, yr])
    # forget rows: segment B (whole forget batch), retain row i: segment i
    seg = torch.cat([torch.full((B,), B), torch.arange(B)])

    def weights(K):
        c = gram_pinv(K[:B, :B].contiguous(), 1e-5).coefficients(K[:B, B])
        return torch.cat([-c, torch.ones(1, dtype=torch.float64)])

    if path == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            ce_sum(model(x), y).backward()
    elif path in ("store", "store_og", "stream"):
        sg = SampleGram(model, mode="stream" if path == "stream" else "store", record_grads=path != "store_og")

        def step():
            model.zero_grad(set_to_none=True)
            with sg.record(seg, num_segments=B + 1):
                ce_sum(model(x), y).backward()
            w = weights(sg.gram())
            if path != "stream":
                sg.combine(w)
            else:
                with sg.reweight(w):
                    ce_sum(model(x), y).backward()
    elif path == "authors":
        def step():
            model.zero_grad(set_to_none=True)
            ref.authors_orthograd_direction(model, ce_mean, xf, yf, xr, yr)
    elif path == "vmap_gram":
        names = [n for n, p in model.named_parameters() if p.requires_grad]

        def step():
            model.zero_grad(set_to_none=True)
            per = ref.per_sample_grads_vmap(model, ce_sum, xr, yr)
            gu = torch.autograd.grad(ce_sum(model(xf), yf), [p for _, p in model.named_parameters()])
            G = torch.cat([per[n].reshape(B, -1) for n in names], dim=1)
            G = torch.cat([G, torch.cat([g.reshape(1, -1) for g in gu], dim=1)])
            K = G.double() @ G.double().T
            return weights(K)
    elif path == "torchjd":
        from torchjd.autogram import Engine

        engine = Engine(model, batch_dim=0)  # hooks every module that owns trainable parameters
        onehot = torch.zeros((2 * B, B + 1), dtype=torch.float64)
        onehot[torch.arange(2 * B), seg] = 1.0

        def segment_gram():
            losses = F.cross_entropy(model(x), y, reduction="none")  # [N]
            K = engine.compute_gramian(losses)  # [N, N]: per-row Gram
            return losses, onehot.T @ K.double() @ onehot  # [S, S]

        def step():
            model.zero_grad(set_to_none=True)
            losses, K = segment_gram()
            losses.backward(weights(K)[seg].to(losses.dtype))  # .grad = Σ_s w_s g_s

        step.gram = lambda: segment_gram()[1]
    elif path == "idle":
        def step():
            return None
    else:
        raise ValueError(path)

    def release():
        """Back to the idle state: no .grad, no recorded step."""
        model.zero_grad(set_to_none=True)
        if path in ("store", "store_og", "stream"):
            sg.release()

    step.release = release
    step.model = model
    return step


# ------------------------------------------------------------------------------ worker
def check_gram(case: str, step) -> float:
    """Relative Frobenius difference between a peer's segment Gram (``step.gram()``) and
    this package's on the same rows (a fresh build of the case: same seed, same weights
    and data); RuntimeError (the peer is then not timed) above 4·u·sqrt(P·S): TorchJD sums
    its Gramian in fp32, each entry a reduction over the P parameters, off by
    ~sqrt(P)·u·|g_s||g_t|, i.e. ~sqrt(P·S)·u·|K| in Frobenius norm (ours, fp32 products
    summed in fp64, is 1e-7 off the fp64 loop). Measured: 1e-7 to 2e-7 at B = 64 on the MLP
    and the transformer, 8e-5 for the transformer at B = 4 (1.2·sqrt(P·S)·u); a wrong Gram
    is off by O(1)."""
    from orthograd_fast.gram import SampleGram

    model, xf, yf, xr, yr = build(case)
    seg = torch.cat([torch.full((B,), B), torch.arange(B)])
    with SampleGram(model) as sg:
        with sg.record(seg, num_segments=B + 1):
            ce_sum(model(torch.cat([xf, xr])), torch.cat([yf, yr])).backward()
        ours = sg.gram()
    err = float((step.gram() - ours).norm() / ours.norm())
    tol = 4 * U32 * (sum(p.numel() for p in model.parameters()) * (B + 1)) ** 0.5
    if not err <= tol:
        raise RuntimeError(f"{case}: the peer's Gram differs from ours by {err:.1e} (relative Frobenius): not timed")
    return err


def worker(case: str, path: str, reps: int, budget_s: float, threads: int) -> dict:
    """Time ``path`` interleaved with ``plain`` in this process (ratios immune to load
    that changes between processes)."""
    torch.set_num_threads(threads)
    step = make_step(case, path)
    gram_err = check_gram(case, step) if hasattr(step, "gram") else None
    plain = make_step(case, "plain") if path not in ("plain", "idle") else None
    step()  # warm-up
    if plain is not None:
        plain()
    times, cpu, ptimes, pcpu = [], [], [], []
    t_all = time.perf_counter()
    for _ in range(reps):
        for fn, tt, cc in ((step, times, cpu), (plain, ptimes, pcpu)):
            if fn is None:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            tt.append(time.perf_counter() - t0)
            cc.append(time.process_time() - c0)
        if time.perf_counter() - t_all > budget_s and len(times) >= 2:
            break
    out = {
        "case": case,
        "path": path,
        "times": times,
        "median_s": statistics.median(times),
        "best_s": min(times),
        "cpu_best_s": min(cpu),
    }
    if gram_err is not None:
        out["gram_rel_err"] = gram_err
    if plain is not None:
        out["plain_best_s"] = min(ptimes)
        out["plain_cpu_best_s"] = min(pcpu)
    return out


def memory_worker(case: str, path: str, threads: int) -> dict:
    """Peak memory of one step of ``path`` alone, from the idle state (no .grad, nothing
    recorded): the largest net tensor allocation seen by the profiler's allocation records
    during the step, and the process's max RSS over a warm-up and that step."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    step = make_step(case, path)
    step()
    step.release()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return {
        "case": case,
        "path": path,
        "peak_alloc_mb": peak / 2**20,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# glibc returns every block >= 64 KiB to the OS on free, so that max RSS follows the live
# tensors instead of the allocator's fragmentation (timing runs use the default allocator)
_MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _spawn(args: list[str], env=None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT,
                         check=False, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(case: str, path: str, reps: int, budget_s: float, threads: int) -> dict:
    r = {"case": case, "path": path}
    if path != "idle":
        r.update(_spawn(["--worker", case, path, "--reps", str(reps), "--budget", str(budget_s),
                         "--threads", str(threads)]))
    mem = _spawn(["--memory", case, path, "--threads", str(threads)], env={**os.environ, **_MEM_ENV})
    r["maxrss_mb"] = mem.get("maxrss_mb", float("nan"))
    r["peak_alloc_mb"] = mem.get("peak_alloc_mb", float("nan"))
    if "error" in mem and "error" not in r:
        r["error"] = mem["error"]
    return r


def machine(threads: int) -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    mine = ["orthograd_fast/gram", "bench/bench_sample_gram.py"]
    dirty = subprocess.run([*git, "status", "--porcelain", "--", *mine], capture_output=True, text=True).stdout
    return (
        f"{model}, {os.cpu_count()} cores (torch threads {threads}), torch {torch.__version__}, "
        f"Python {platform.python_version()}, commit {commit}"
        + (" + uncommitted SampleGram files" if dirty.strip() else "")
    )


def table(results: list[dict]) -> str:
    by = {(r["case"], r["path"]): r for r in results}
    lines = [
        "| model | path | best wall (ms) | wall / plain | CPU / plain | authors / this "
        "| peak tensor memory (MB) | memory / plain | peak RSS above idle (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for case in CASES:
        idle = by.get((case, "idle"), {}).get("maxrss_mb", 0.0)
        plain = by.get((case, "plain"), {})
        auth = by.get((case, "authors"), {})
        for path in PATHS:
            r = by.get((case, path))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {case} | {path} | error: {r['error'][:60]} | | | | | | |")
                continue
            t = r["best_s"] * 1e3
            tp = r["best_s"] / r.get("plain_best_s", r["best_s"])
            cp = r["cpu_best_s"] / r.get("plain_cpu_best_s", r["cpu_best_s"])
            ta = (auth["best_s"] / auth["plain_best_s"]) / tp if "best_s" in auth else nan
            mem = r.get("peak_alloc_mb", nan)
            pm = plain.get("peak_alloc_mb", nan)
            rss = r["maxrss_mb"] - idle
            lines.append(
                f"| {case} | {path} | {t:.1f} | {tp:.2f} | {cp:.2f} | {ta:.1f} "
                f"| {mem:.0f} | {mem / pm:.2f} | {rss:.0f} |"
            )
    return "\n".join(lines)


NOTES = """\
Setup: B = 64 retain rows (one segment each) + 64 forget rows (one segment), S = 65, fp32,
loss summed over rows; `store`/`stream` = record + gram + fp64 solve (linalg.gram_pinv) +
combine (store) or a second forward/backward under `reweight` (stream); `store_og` = store
with `record_grads=False`, the configuration `OrthoGrad.step` runs (module docstring);
`authors` = reference.authors_orthograd_direction (vmap per-sample retain gradients, B x P
buffer, per-tensor torch.linalg.qr); `vmap_gram` = vmap per-sample gradients + one fp64 Gram;
`torchjd` = TorchJD's `autogram.Engine` (per-row Gramian of the losses summed into the
segments, the same solve, the losses backpropagated with the weights), its Gram checked
against ours first (the JSON's `gram_rel_err`).
Models: (a) MLP 784-1024-1024-10, (b) CNN conv(1→32)/conv(32→64,s2)/conv(64→64,s2) +
linear(3136→128→10) on 28x28, (c) transformer: linear embedding of 64 tokens + class token
+ positional embedding (bare parameters), 2 nn.TransformerEncoderLayer (d=128, 4 heads,
ff 256), LayerNorm, linear head. Reproduce: `python bench/bench_sample_gram.py --write`
(about 6 minutes), or `pytest bench/bench_sample_gram.py --benchmark-only` (time only).

Reading it. Time ratios are to a plain forward+backward of the same 128 rows, timed
interleaved in the same process (the two cores are shared with other jobs, hence 1 torch
thread and best-of-N); between whole runs the ratios still move by about ±0.15 (more for
the 20 ms MLP step). Earlier runs of the same table, before the convolution change (6):
6520e50 store / store_og MLP 1.65 / 1.40, CNN 1.74 / 1.61, transformer 1.52 / 1.56;
9c65b4c 1.72 / 1.44, 1.62 / 1.75, 1.69 / 1.58; after it, 80618ee 1.67 / 1.30,
1.24 / 1.29, 1.59 / 1.52. What SampleGram adds to a plain step: the Gram (ghost for the MLP and
the heads; explicit "flash-Gram" tiles for convolutions and sequences, whose S²·d·p term
is as large as the per-row tiles at S = 65), the combination and the probes.

What changed in this revision (engine docstring, rules/matrix.py). (1) Kept tiles: the
explicit path keeps each layer's per-segment gradients X (S, numel) when X is no larger
than the layer's recorded input + output gradient, so combine is Σ_s w_s X_s instead of a
GEMM over the retain rows, the probe reads X, and the layer's tensors are dropped right
after its Gram (CNN peak memory 2.0x → 1.2x plain; combine 17 → 2 ms on the CNN, 35 → 5 ms
on the transformer). (2) Detached weights: a Linear/Conv weight whose Gram comes from
tiles is read detached in its forward, so autograd skips its weight-gradient GEMM; `.grad`
is filled from the tiles (Σ_s X_s); with `record_grads=False` every Linear/Conv weight is
detached and combine writes `.grad` (MLP: one GEMM over all rows replaces autograd's plus
the one over the retain rows). Tied/functional use stays exact: a detached weight that
still receives an autograd gradient is rerouted to the exact fallback (tests). (3) Rows
of a segment that are contiguous in the batch are read as views (no gathers); attention's
(L, N)-ordered rows are copied once into (N, L) order (its tile GEMM ran 2x slower on the
strided view). (4) Convolutions: zero padding passed to the weight-gradient kernel (no
padded copy), per-row tiles from one grouped-convolution weight gradient (no patch copy).
(5) The ghost path forms the bias Gram from the D·Dᵀ products the weight needs; segment
maps are built once per step; X Xᵀ multiplies 3/4 of the blocks. Same-process A/B against
the previous engine (best-of-15, 1 thread): MLP 1.86 → 1.73 (store) / 1.49 (store_og);
CNN 2.22 → 1.66 / 1.64; transformer 1.90 → 1.51 / 1.54. (6) Convolutions run with
weight *and* bias detached (80618ee): the CPU convolution backward forms the weight
gradient whenever the bias needs one (the CNN's 32→64 layer, forward + backward: 64.5 ms
with or without the weight gradient, 51.4 ms with neither), and a first layer, whose
input needs no gradient, gets a zero leaf added to its output in place, anchoring it in
the graph, so that autograd skips its backward entirely (1→32 layer: 44 ms with only the
bias's gradient, 16 ms for the forward alone); the biases' Grams, `.grad` and
combination come from the recorded output gradients. CNN store 1.62-1.74 → 1.24-1.31,
store_og 1.61-1.75 → 1.24-1.29.

Where the rest goes. Explicit Grams cost about 1.5 weight-gradient GEMMs per layer at
S = 65 (the per-segment tiles over all rows, plus X Xᵀ with S² ≈ half the N·T rows);
detaching pays back the weight-gradient work autograd would have done. CNN: with weights
and biases detached, the tiles and X Xᵀ replace the convolutions' weight gradients and
the first layer's backward: about 1.25-1.3x. Transformer: nn.MultiheadAttention's
projections are read from the autograd graph and cannot be detached (the graph is also
what verifies them), so half of the weight-gradient work stays: floor ≈ 1.35-1.4x,
measured 1.47-1.69. MLP: `store_og` is near its floor (combine ≈ the skipped weight
gradients; ghost Gram ≈ 2 ms); `store` keeps autograd's weight gradients for `.grad`
plus a GEMM over the 64 retain rows for combine (≈ 0.5 weight-gradient pass).

Store vs stream. `store` keeps every layer's input (which autograd keeps anyway until the
backward) and output gradient until record() exits: one backward; layers with kept tiles
then hold only X. `stream` forms each layer's Gram inside its backward hook and drops its
tensors, so the peak is a plain step's plus the Gram tiles, but the combination needs a
second forward + backward (about 1 plain step more). Stream pays when activations dominate
memory and the extra pass is cheaper than running out of memory (large images, long
sequences, big batches); otherwise store is faster. Modules served by the torch.func
fallback (and traced parameters) keep their captured tensors until the context exits even
in stream mode.
"""


def write_results(text: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    doc = path.read_text()
    head = "## SampleGram (CPU)"
    start = doc.index(head)
    nxt = doc.find("\n## ", start + len(head))
    end = len(doc) if nxt < 0 else nxt + 1
    path.write_text(doc[:start] + head + "\n\n" + text.strip() + "\n\n" + doc[end:].lstrip("\n"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "PATH"))
    ap.add_argument("--memory", nargs=2, metavar=("CASE", "PATH"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of repeats per path")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared box)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.reps, args.budget, args.threads)))
        return
    if args.memory:
        print(json.dumps(memory_worker(*args.memory, args.threads)))
        return
    results = []
    for case in args.cases.split(","):
        for path in ["idle"] + args.paths.split(","):
            r = run_one(case, path, args.reps, args.budget, args.threads)
            results.append(r)
            print(json.dumps(r), flush=True)
    text = table(results)
    print(text)
    if args.write:
        write_results(f"Measured on {machine(args.threads)}.\n\n" + text + "\n\n" + NOTES)


# ------------------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # plain-script use needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def one_thread():
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(old)

    @pytest.mark.parametrize("path", [p for p in PATHS if p not in ("authors", "vmap_gram")])
    @pytest.mark.parametrize("case", CASES)
    def test_sample_gram_step(benchmark, one_thread, case, path):
        step = make_step(case, path)
        step()
        benchmark.pedantic(step, rounds=3, iterations=1)

    @pytest.mark.parametrize("path", ["authors", "vmap_gram", "torchjd"])
    @pytest.mark.parametrize("case", CASES)
    def test_baseline_step(benchmark, one_thread, case, path):
        if path == "torchjd":
            pytest.importorskip("torchjd")
        step = make_step(case, path)
        benchmark.pedantic(step, rounds=1, iterations=1, warmup_rounds=0)


if __name__ == "__main__":
    main()
