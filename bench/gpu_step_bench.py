"""Whole OrthoGrad-shaped steps on a GPU: the Triton backend against the torch backend, a
plain forward + backward, the authors' path and TorchJD (issue 11, "Performance").

Rows: B = 64 retain rows (one segment each) + 64 forget rows (one segment), N = 128,
S = 65, fp32 (TF32 off), loss summed over rows. Models (``--blocks`` sets the depth of the
two token stacks, default 12 as the real models):

* ``MLP 4096``: Linear 4096-4096-4096-10 with ReLU (T = 1);
* ``ResNet-18 convs``: the 17 3x3 convolutions of ResNet-18 on 32x32 inputs (CIFAR stem,
  strides 2 at 64->128, 128->256, 256->512) with ReLU, then average pooling and a 512->10
  head: the conv shapes, without BatchNorm or shortcuts;
* ``ViT-S/16 linears``: 197 tokens of width 384; per block LayerNorm, qkv 384->1152, a
  token-wise mix q·sigmoid(k) + v standing in for attention (no interaction between
  positions or rows), proj 384->384, LayerNorm, fc1 384->1536, GELU, fc2 1536->384, both
  residual; LayerNorm, mean over tokens and a 384->10 head;
* ``GPT-2 small linears``: the same block at 512 tokens of width 768 (c_attn 768->2304,
  c_proj 768->768, c_fc 768->3072, c_proj 3072->768).

Paths, one step each:

* ``plain``: forward + backward of the summed loss over the 128 rows (the floor);
* ``torch`` / ``triton``: SampleGram(record_grads=False, backend=...) in store mode, the
  configuration OrthoGrad.step runs: record + gram() + the fp64 solve + combine(w). In
  store mode the layers that keep their segment gradients (convolutions and sequence
  layers at S = 65) form them with the torch path on both backends
  (orthograd_fast/gram/rules/matrix_triton.py says why), so the backends differ on the
  ghost layers (the MLP);
* ``torch stream`` / ``triton stream``: mode="stream": record + gram() + solve + the
  reweighting forward + backward; every Linear/Conv weight Gram is the kernels' here
  (flash-Gram or ghost by the cost model);
* ``authors``: bench/peers/authors.py, the authors' OrthoGrad step (vmap per-sample retain
  gradients into a B x P buffer, the forget gradient, per-tensor torch.linalg.qr, SGD
  with lr 0); rows that do not fit in memory say so;
* ``torchjd``: TorchJD's autogram.Engine (per-row Gramian of the losses, summed into the
  segments, the same solve, the losses backpropagated with the weights), where TorchJD is
  installed; the GPU machine has none (reported).

Correctness first: every engine path's Gram (and TorchJD's) from its warm-up step is
compared with the torch backend's store-mode Gram (relative Frobenius difference at most
1e-4: fp32 products summed in fp64 on both sides; TorchJD accumulates its Gramian in fp32,
held to 4·u·sqrt(P·S)); a path that fails is printed as MISMATCH and not timed. The
authors' direction is checked by tests/test_bench_peers.py and bench/peers_gpu.py.

Timing: a warm-up call, then one call measured for peak memory (max_memory_allocated
above what was allocated before it; the previous step's tensors are released first) and
time (CUDA events); then ``triton.testing.do_bench`` medians when that call took under
50 ms, else the median of 3 calls timed with CUDA events (do_bench's 5-call estimate
alone would take 10 s on GPT-2's steps). Each (model, path) row is printed as soon as it
is done and runs in try/except (errors and OOM are printed, the next row runs); no new
row starts after ``--budget-s``. ``--device cpu --smoke`` runs tiny models on the CPU
(Triton through its interpreter, a plain timer, no memory figures):
tests/test_gpu_step_bench.py.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

PATHS = ("plain", "torch", "triton", "torch stream", "triton stream", "authors", "torchjd")
ENGINE_PATHS = {"torch": ("torch", "store"), "triton": ("triton", "store"),
                "torch stream": ("torch", "stream"), "triton stream": ("triton", "stream")}
GATE = 1e-4
U32 = 2.0**-24


# ----------------------------------------------------------------------------- models
class TokenBlock(nn.Module):
    """The linears of a transformer block (module docstring), rows independent."""

    def __init__(self, d: int, ff: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def forward(self, h):
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        h = h + self.proj(q * torch.sigmoid(k) + v)
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class TokenStack(nn.Module):
    def __init__(self, d: int, ff: int, blocks: int, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*[TokenBlock(d, ff) for _ in range(blocks)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # [N, T, d]
        return self.head(self.norm(self.blocks(x)).mean(1))


def conv_stack(widths, hw: int) -> nn.Sequential:
    """3x3 convolutions (cin, cout, stride) with ReLU, average pooling, a 10-way head."""
    layers: list[nn.Module] = []
    for cin, cout, s in widths:
        layers += [nn.Conv2d(cin, cout, 3, stride=s, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1][1], 10)]
    return nn.Sequential(*layers)


RESNET18 = ([(3, 64, 1)] + [(64, 64, 1)] * 4 + [(64, 128, 2)] + [(128, 128, 1)] * 3 + [(128, 256, 2)]
            + [(256, 256, 1)] * 3 + [(256, 512, 2)] + [(512, 512, 1)] * 3)


def models(smoke: bool, blocks: int):
    """[(name, build() -> model, input shape per row)]."""
    if smoke:
        return [
            ("MLP", lambda: nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 5)), (24,)),
            ("convs", lambda: conv_stack([(3, 4, 1), (4, 8, 2)], 6), (3, 6, 6)),
            ("tokens", lambda: TokenStack(16, 24, 1), (5, 16)),
        ]
    return [
        ("MLP 4096", lambda: nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                           nn.Linear(4096, 10)), (4096,)),
        ("ResNet-18 convs 32x32", lambda: conv_stack(RESNET18, 32), (3, 32, 32)),
        (f"ViT-S/16 linears T=197 ({blocks} blocks)", lambda: TokenStack(384, 1536, blocks), (197, 384)),
        (f"GPT-2 small linears T=512 ({blocks} blocks)", lambda: TokenStack(768, 3072, blocks), (512, 768)),
    ]


# ----------------------------------------------------------------------------- steps
def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def solve_weights(K: torch.Tensor, R: int) -> torch.Tensor:
    """(S,) combination weights of an OrthoGrad step from the segment Gram (retain 0..R-1,
    forget R): -K_rr⁺ K_rf for the retain segments, 1 for the forget segment."""
    from orthograd_fast.linalg import gram_pinv

    c = gram_pinv(K[:R, :R].contiguous(), 1e-5).coefficients(K[:R, R])
    return torch.cat([-c, torch.ones(1, dtype=torch.float64, device=c.device)])


class Step:
    """One path on one model: ``run()`` does a step and returns its segment Gram (or
    None), ``release()`` drops what the previous step left (gradients, recorded tensors)."""

    def __init__(self, path: str, model: nn.Module, x, y, seg, R: int):
        self.path, self.model, self.x, self.y, self.seg, self.R = path, model, x, y, seg, R
        self.sg = self.peer = self.engine = None
        S = R + 1
        if path in ENGINE_PATHS:
            from orthograd_fast.gram import SampleGram

            backend, mode = ENGINE_PATHS[path]
            self.sg = SampleGram(model, backend=backend, mode=mode, record_grads=mode == "stream")
        elif path == "authors":
            from peers import make_peer
            from workloads import loss_per_sample

            self.peer = make_peer("authors", model, loss_fn=loss_per_sample, granularity="per_tensor", lr=0.0)
        elif path == "torchjd":
            from torchjd.autogram import Engine

            self.model = copy.deepcopy(model)  # TorchJD's hooks stay on the modules it is given
            self.engine = Engine(self.model, batch_dim=0)
            self.onehot = torch.zeros((x.shape[0], S), dtype=torch.float64, device=x.device)
            self.onehot[torch.arange(x.shape[0], device=x.device), seg] = 1.0
        elif path != "plain":
            raise ValueError(f"unknown path {path!r}")

    def release(self) -> None:
        self.model.zero_grad(set_to_none=True)
        if self.sg is not None:
            self.sg.release()

    def run(self):
        self.release()
        model, x, y, seg, R = self.model, self.x, self.y, self.seg, self.R
        if self.path == "plain":
            ce_sum(model(x), y).backward()
            return None
        if self.sg is not None:
            with self.sg.record(seg, num_segments=R + 1):
                ce_sum(model(x), y).backward()
            K = self.sg.gram()
            w = solve_weights(K, R)
            if self.sg.mode == "store":
                self.sg.combine(w)
            else:
                with self.sg.reweight(w):
                    ce_sum(model(x), y).backward()
            return K
        if self.peer is not None:
            self.peer.step((x[R:], y[R:]), (x[:R], y[:R]))
            return None
        losses = F.cross_entropy(model(x), y, reduction="none")  # [N]
        K = self.onehot.T @ self.engine.compute_gramian(losses).double() @ self.onehot  # [S, S]
        losses.backward(solve_weights(K, R)[seg].to(losses.dtype))
        return K

    def close(self) -> None:
        if self.sg is not None:
            self.sg.close()


# ----------------------------------------------------------------------------- timing
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_call(fn, dev) -> float:
    """ms of one call (CUDA events on the GPU)."""
    if dev.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sync(dev)
    a.record()
    fn()
    b.record()
    _sync(dev)
    return a.elapsed_time(b)


def measure(step: Step, dev, reps: int, quick_ms: float = 50.0) -> tuple[float, float | None]:
    """(median ms, peak MiB or None) of step.run after its warm-up (module docstring)."""
    step.release()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    first = timed_call(step.run, dev)
    peak = (torch.cuda.max_memory_allocated(dev) - before) / 2**20 if dev.type == "cuda" else None
    if dev.type == "cuda" and first < quick_ms:
        from triton.testing import do_bench

        return float(do_bench(step.run, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]), peak
    times = [first] + [timed_call(step.run, dev) for _ in range(reps - 1)]
    return statistics.median(times), peak


# ----------------------------------------------------------------------------- rows
def _why_torchjd() -> str | None:
    try:
        import torchjd  # noqa: F401
    except Exception as e:
        return f"not installed on this machine ({type(e).__name__})"
    return None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def fmt(v, nd=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def run_model(name, build, shape, a, dev, t_start, paths) -> None:
    """Every path of one model, a row each as it finishes (module docstring)."""
    R, Fg = (4, 4) if a.smoke else (a.retain, a.forget)
    N, S = R + Fg, R + 1
    torch.manual_seed(0)
    model = build().to(dev)
    P = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, *shape, generator=g).to(dev)
    y = torch.randint(0, 10 if not a.smoke else 5, (N,), generator=g).to(dev)
    seg = torch.cat([torch.arange(R), torch.full((Fg,), R)]).to(dev)  # retain: own segment; forget: one
    print(f"### {name}: P = {P / 1e6:.2f}M parameters, N = {R} retain + {Fg} forget rows; the authors' "
          f"B x P buffer {R * P * 4 / 2**30:.1f} GiB", flush=True)
    print("| model | path | ms (median) | x plain | peak MiB | x plain | check |", flush=True)
    print("|---|---|---:|---:|---:|---:|---|", flush=True)
    ref = None  # the torch backend's store-mode Gram
    res: dict[str, tuple] = {}
    for path in paths:
        cells = None
        if time.perf_counter() - t_start > a.budget_s:
            print(f"| {name} | {path} | not run (time budget) | | | | |", flush=True)
            continue
        if path == "torchjd" and _why_torchjd():
            print(f"| {name} | {path} | {_why_torchjd()} | | | | |", flush=True)
            continue
        step = None
        try:
            step = Step(path, model, x, y, seg, R)
            K = step.run()  # warm-up (compiles, autotunes); its Gram is checked
            check = ""
            if K is not None:
                if path == "torch":
                    ref, check = K, "reference"
                elif ref is None:
                    check = "unchecked (no torch Gram)"
                else:
                    tol = 4 * U32 * math.sqrt(P * S) if path == "torchjd" else GATE
                    err = rel(K, ref)
                    if not err <= tol:
                        cells = [f"MISMATCH: Gram {err:.1e} off the torch backend's (> {tol:.0e}); not timed"]
                    check = f"Gram {err:.0e} off torch's"
            if cells is None:
                ms, mib = measure(step, dev, a.reps)
                res[path] = (ms, mib)
                pl = res.get("plain", (None, None))
                cells = [fmt(ms, 2), fmt(ms / pl[0], 2) + "x" if pl[0] else "-", fmt(mib, 0),
                         fmt(mib / pl[1], 2) + "x" if (mib is not None and pl[1]) else "-", check]
        except torch.OutOfMemoryError as e:
            free = torch.cuda.mem_get_info(dev)[0] / 2**30 if dev.type == "cuda" else float("nan")
            cells = [f"does not fit in memory (OOM; {free:.0f} GiB free after it): {str(e).splitlines()[0][:60]}"]
        except Exception as e:  # reported, never hidden; the next row runs
            cells = [f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"]
        finally:
            if step is not None:
                step.release()
                step.close()
            del step
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        print(f"| {name} | {path} | " + " | ".join(cells) + " |", flush=True)
    if "triton" in res or "triton stream" in res:
        parts = []
        for mode in ("", " stream"):
            tri, tor = res.get("triton" + mode), res.get("torch" + mode)
            if tri and tor:
                parts.append(f"torch{mode}/triton{mode} {tor[0] / tri[0]:.2f}x")
        if "authors" in res and "triton" in res:
            parts.append(f"authors/triton {res['authors'][0] / res['triton'][0]:.1f}x")
        if "torchjd" in res and "triton" in res:
            parts.append(f"torchjd/triton {res['torchjd'][0] / res['triton'][0]:.1f}x")
        print(f"{name}: " + ", ".join(parts), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (with --smoke; Triton via its interpreter)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 4 + 4 rows (the CPU smoke test)")
    ap.add_argument("--retain", type=int, default=64)
    ap.add_argument("--forget", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=12, help="blocks of the ViT/GPT-2 token stacks")
    ap.add_argument("--models", default="", help="comma-separated model name prefixes (default: all)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {PATHS}")
    ap.add_argument("--reps", type=int, default=0, help="timed calls of a step over 50 ms (default 3; 1 with --smoke)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="no new row starts after this many seconds")
    a = ap.parse_args(argv)
    a.reps = a.reps or (1 if a.smoke else 3)
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        ap.error(f"unknown paths {bad}; choose from {PATHS}")
    dev = torch.device(a.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_step_bench: no CUDA device here; run it on a lent GPU. Nothing was measured.")
            return 0
        name = torch.cuda.get_device_name(dev)
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_step_bench: --device cpu needs TRITON_INTERPRET=1 (set before Triton is imported)")
            return 2
        name = "cpu (smoke run, Triton interpreter)"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import triton

    t_start = time.perf_counter()
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; fp32, TF32 off; "
          f"times: ms per step (medians)", flush=True)
    for mname, build, shape in models(a.smoke, a.blocks):
        if a.models and not any(mname.startswith(m) for m in a.models.split(",")):
            continue
        try:
            run_model(mname, build, shape, a, dev, t_start, paths)
        except Exception as e:  # the model itself failed to build or move: the next one runs
            print(f"| {mname} | ERROR {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''} |",
                  flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
