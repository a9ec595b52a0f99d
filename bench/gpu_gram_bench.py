"""GPU timings of the Gram engine's Triton kernels per layer, against the torch path.

For B = 64 retain rows (one segment each) + 64 forget rows (one segment): N = 128 rows,
S = 65 segments, per layer of four model shapes:

* an MLP 4096-4096-4096-10 (T = 1),
* ViT-S/16's linears (T = 197: qkv 384->1152, proj 384->384, fc1 384->1536, fc2 1536->384),
* GPT-2-small's linears (T = 512: c_attn 768->2304, attn c_proj 768->768, c_fc 768->3072,
  mlp c_proj 3072->768),
* a ResNet-18-shaped conv stack on 32x32 inputs (3x3 convs, the CIFAR stem; the Triton
  path unfolds patches and runs the Linear kernels: their memory is in its column),

each row times (``triton.testing.do_bench`` medians, ms; two input sets rotated):

* ``plain``: the layer's forward + backward (weight, bias and input gradients);
* ``tri gram``: the Triton segment Gram, explicit (flash-Gram) or ghost by the engine's
  cost model (ghost when F²(d+p) < d·p·(F+S²), F = N·T), both timed where ghost is
  affordable (the faster is reported, the method column says which);
  conv: unfold included;
* ``tri comb``: the Triton combination Σ_s w_s g_s (kernels/gram_combine.py) and
  ``mm comb``: the same as one scaled torch matmul (conv: torch's weight-gradient
  convolution on row-scaled output gradients, as the engine does);
* ``torch gram``: the engine's torch path (orthograd_fast/gram/rules/matrix.py's
  gram_explicit / gram_ghost by its cost model on LinearRows / ConvRows);
* peak memory (MiB above what was allocated before the call) of tri gram + tri comb,
  torch gram + mm comb, and plain;
* ratios: ``tri/plain`` = (tri gram + the faster combination) / plain, the Gram
  engine's cost on top of a plain step, per layer (a whole step is 1 + that, before the
  engine's dominant-weight saving in the combination); ``torch/tri`` = (torch gram +
  mm comb) / (tri gram + the faster combination);
* a correctness gate first: the Triton Gram against the torch path's
  (max |ΔK| / max diag K) and the Triton combination against the matmul; a row whose
  gate fails is printed as MISMATCH and not timed.

The segment plan (kernels/gram_plan.py) is built once per step for all layers: not in the
per-layer times. Also printed: the card's fp32 (non-TF32) cuBLAS GEMM rate, and the
flash-Gram's rate in useful multiply-adds (d·p·(N·T) + d·p·S(S+1)/2) on the 4096 MLP.

Every row runs in try/except (errors are printed, the next row runs), sizes are checked
against free memory first, and a time budget (``--budget-s``) stops starting new rows.
``--device cpu --smoke`` runs tiny shapes on the CPU (Triton through its interpreter, a
plain timer, no memory figures): tests/test_gpu_gram_bench.py.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@dataclass
class Layer:
    model: str
    name: str
    d: int  # Linear: in features; conv: in channels
    p: int  # out features / channels
    T: int = 1  # Linear positions per row
    hw: int = 0  # conv: input height = width (0: a Linear layer)
    k: int = 3
    stride: int = 1

    @property
    def conv(self) -> bool:
        return self.hw > 0

    def geometry(self):
        """(T, d, p) of the canonical form (conv: positions and patch length)."""
        if not self.conv:
            return self.T, self.d, self.p
        out = (self.hw + 2 * (self.k // 2) - self.k) // self.stride + 1
        return out * out, self.d * self.k * self.k, self.p


def layers(smoke: bool) -> list[Layer]:
    if smoke:
        return [Layer("MLP", "fc 64-48", 64, 48), Layer("ViT-like", "fc 24-40", 24, 40, T=5),
                Layer("GPT-like", "fc 40-24", 40, 24, T=7), Layer("ResNet-like", "conv 3-8 8x8", 3, 8, hw=8),
                Layer("ResNet-like", "conv 8-16 s2", 8, 16, hw=8, stride=2)]
    out = [Layer("MLP 4096", "fc1 4096-4096", 4096, 4096), Layer("MLP 4096", "fc2 4096-4096", 4096, 4096),
           Layer("MLP 4096", "fc3 4096-10", 4096, 10)]
    for n, d, p in (("qkv", 384, 1152), ("proj", 384, 384), ("fc1", 384, 1536), ("fc2", 1536, 384)):
        out.append(Layer("ViT-S/16", f"{n} {d}-{p}", d, p, T=197))
    for n, d, p in (("c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("c_fc", 768, 3072), ("mlp.c_proj", 3072, 768)):
        out.append(Layer("GPT-2 small", f"{n} {d}-{p}", d, p, T=512))
    for name, cin, cout, hw, s in (("stem 3-64", 3, 64, 32, 1), ("l1 64-64", 64, 64, 32, 1),
                                   ("l2 64-128 s2", 64, 128, 32, 2), ("l2 128-128", 128, 128, 16, 1),
                                   ("l3 128-256 s2", 128, 256, 16, 2), ("l3 256-256", 256, 256, 8, 1),
                                   ("l4 256-512 s2", 256, 512, 8, 2), ("l4 512-512", 512, 512, 4, 1)):
        out.append(Layer("ResNet-18 32x32", f"conv {name}", cin, cout, hw=hw, stride=s))
    return out


# ----------------------------------------------------------------------------- timers
def cpu_bench(fn, warmup: int, rep: int) -> float:
    """do_bench's median on the CPU: calls for ``warmup`` ms, then at least 3 timed calls
    for ``rep`` ms."""
    t_end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(torch.tensor(times).median())


def peak_mib(fn, dev: torch.device):
    """Peak CUDA memory of one call above what was allocated before it (None off CUDA)."""
    if dev.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - before) / 2**20


# ----------------------------------------------------------------------------- the paths
class Case:
    """Inputs of one layer (two sets) and the calls of every path on set i."""

    def __init__(self, L: Layer, N: int, ids: torch.Tensor, S: int, dev: torch.device, sets: int = 2):
        from orthograd_fast.kernels import gram_plan

        self.L, self.N, self.S, self.dev = L, N, S, dev
        self.plan = gram_plan.segment_plan(ids.to(dev), S)
        self.ids = ids.to(dev)
        self.w = torch.randn(S, device=dev, dtype=torch.float64)
        g = torch.Generator(device="cpu").manual_seed(0)
        self.sets = []
        for _ in range(sets):
            if L.conv:
                x = torch.randn(N, L.d, L.hw, L.hw, generator=g).to(dev)
                W = (torch.randn(L.p, L.d, L.k, L.k, generator=g) / math.sqrt(L.d * L.k * L.k)).to(dev)
                out = F.conv2d(x, W, stride=L.stride, padding=L.k // 2)
                gout = torch.randn(out.shape, generator=g).to(dev)
                self.sets.append((x, W, gout))
            else:
                x = torch.randn(N, L.T, L.d, generator=g).to(dev)
                W = (torch.randn(L.p, L.d, generator=g) / math.sqrt(L.d)).to(dev)
                gout = torch.randn(N, L.T, L.p, generator=g).to(dev)
                self.sets.append((x, W, gout))

    # canonical form
    def rows(self, i: int):
        x, W, gout = self.sets[i]
        L = self.L
        if not L.conv:
            return x, gout
        patches = F.unfold(x, L.k, padding=L.k // 2, stride=L.stride)  # [N, d·k², T]
        return patches.transpose(1, 2), gout.flatten(2).transpose(1, 2)  # [N, T, d·k²], [N, T, p]

    def plain(self, i: int):
        x, W, gout = self.sets[i]
        xr = x.detach().requires_grad_(True)
        Wr = W.detach().requires_grad_(True)
        b = torch.zeros(W.shape[0], device=self.dev, requires_grad=True)
        if self.L.conv:
            y = F.conv2d(xr, Wr, b, stride=self.L.stride, padding=self.L.k // 2)
        else:
            y = F.linear(xr, Wr, b)
        y.backward(gout)

    def tri_gram(self, i: int, method: str):
        from orthograd_fast.kernels import gram_explicit, gram_ghost

        A, D = self.rows(i)
        if method == "ghost":
            return gram_ghost.ghost_gram((A, D), self.plan)
        return gram_explicit.flash_gram((A, D), self.plan)

    def tri_comb(self, i: int):
        from orthograd_fast.kernels import gram_combine

        return gram_combine.combine(self.rows(i), self.plan, self.w)

    def mm_comb(self, i: int):
        x, W, gout = self.sets[i]
        wr = self.w.float()[self.ids.clamp_min(0)] * (self.ids >= 0)  # [N]
        if self.L.conv:
            gw = gout * wr[:, None, None, None]
            return torch.nn.grad.conv2d_weight(x, W.shape, gw, stride=self.L.stride, padding=self.L.k // 2)
        Dw = (gout * wr[:, None, None]).reshape(-1, gout.shape[-1])
        return Dw.T @ x.reshape(-1, x.shape[-1])

    def torch_gram(self, i: int, method: str):
        from orthograd_fast.gram.rules import matrix
        from orthograd_fast.gram.rules.base import GramOptions, Segments

        x, W, gout = self.sets[i]
        seg = Segments(self.ids, self.S)
        if self.L.conv:
            from orthograd_fast.gram.rules.conv import ConvRows

            m = torch.nn.Conv2d(self.L.d, self.L.p, self.L.k, stride=self.L.stride, padding=self.L.k // 2,
                                bias=False).to(self.dev)
            rows = [ConvRows(m, x, gout, {})]
        else:
            from orthograd_fast.gram.rules.linear import LinearRows

            rows = [LinearRows(x, gout, {})]
        opts = GramOptions(method=method)
        if method == "ghost":
            return matrix.gram_ghost(rows, seg, opts)[0]
        return matrix.gram_explicit(rows, seg, opts)[0]


def ghost_wins(F_: int, d: int, p: int, S: int) -> bool:
    """The engine's cost model (matrix.py): ghost ~F²(d+p) against explicit ~d·p·(F+S²)."""
    return float(F_) * F_ * (d + p) < float(d) * p * (F_ + S * S)


def need_bytes(L: Layer, N: int) -> int:
    """Rough peak of a row: two input sets, the patches of a conv, the torch path's tiles
    (its budget, 4M elements, a few of them), fp32."""
    T, d, p = L.geometry()
    inputs = 2 * N * (L.d * max(1, L.hw * L.hw) + T * p + (0 if L.conv else T * L.d))
    patches = N * T * d if L.conv else 0
    return 4 * (inputs + 3 * patches + d * p * 4 + 6 * (1 << 22)) + (64 << 20)


COLUMNS = ["model", "layer", "N·T", "d", "p", "method", "plain", "tri gram", "tri comb", "mm comb", "torch gram",
           "tri/plain", "torch/tri", "MiB tri", "MiB torch", "MiB plain", "check"]


def fmt(x, w=10) -> str:
    if isinstance(x, float):
        return f"{x:>{w}.3f}" if x < 1e4 else f"{x:>{w}.0f}"
    return f"{'-' if x is None else str(x):>{w}}"


def run_layer(L: Layer, N: int, ids, S: int, dev, bench, warm_ms: int, rep_ms: int, out: dict) -> list[str]:
    T, d, p = L.geometry()
    F_ = N * T
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        if need_bytes(L, N) > 0.7 * free:
            return [L.model, L.name, F_, d, p, "", f"skipped: needs ~{need_bytes(L, N) >> 20} MiB"]
    case = Case(L, N, ids, S, dev)
    methods = ["ghost", "explicit"] if ghost_wins(F_, d, p, S) else ["explicit"]
    if methods == ["explicit"] and float(F_) * F_ * (d + p) < 4.0 * d * p * (F_ + S * S):
        methods.append("ghost")  # close call: time both
    torch_method = methods[0]
    # correctness gate (first set): Triton against the torch path (or, when the torch path
    # fails, explicit against ghost), the combination against the matmul
    K_tri = {m: case.tri_gram(0, m) for m in methods}
    try:
        K_ref, ref_name, torch_error = case.torch_gram(0, torch_method), "torch", None
    except Exception as e:  # the torch path's failure is reported in its column; the row goes on
        torch_error = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        K_ref, ref_name = (K_tri["ghost"], "ghost") if len(methods) > 1 else (None, "unchecked")
    errs = {}
    if K_ref is not None:
        scale = float(K_ref.diagonal().abs().max()) or 1.0
        errs = {m: float((K - K_ref).abs().max()) / scale for m, K in K_tri.items()}
    c_ref = case.mm_comb(0).reshape(p, d) if L.conv else case.mm_comb(0)
    c_err = float((case.tri_comb(0) - c_ref).abs().max() / c_ref.abs().max().clamp_min(1e-30))
    gate = 1e-4
    g_err = max(errs.values(), default=0.0)
    if g_err > gate or c_err > gate:
        return [L.model, L.name, F_, d, p, "/".join(methods), f"MISMATCH gram vs {ref_name} {errs} "
                f"comb {c_err:.1e} (not timed)"]
    it = iter(range(1 << 30))

    def rot(fn):
        return lambda: fn(next(it) % 2)

    t = {"plain": bench(rot(case.plain), warm_ms, rep_ms)}
    tri = {m: bench(rot(lambda i, m=m: case.tri_gram(i, m)), warm_ms, rep_ms) for m in methods}
    best = min(tri, key=tri.get)
    t["tri gram"] = tri[best]
    t["tri comb"] = bench(rot(case.tri_comb), warm_ms, rep_ms)
    t["mm comb"] = bench(rot(case.mm_comb), warm_ms, rep_ms)
    t["torch gram"] = torch_error or bench(rot(lambda i: case.torch_gram(i, torch_method)), warm_ms, rep_ms)
    mem = {
        "tri": peak_mib(lambda: (case.tri_gram(0, best), case.tri_comb(0)), dev),
        "torch": None if torch_error else peak_mib(lambda: (case.torch_gram(0, torch_method), case.mm_comb(0)), dev),
        "plain": peak_mib(lambda: case.plain(0), dev),
    }
    tri_total = t["tri gram"] + min(t["tri comb"], t["mm comb"])
    out.update(t=t, tri=tri, errs=errs, c_err=c_err, best=best, F=F_, d=d, p=p)
    method = best + ("" if len(methods) == 1 else f" ({'/'.join(f'{m[0]} {v:.2f}' for m, v in tri.items())})")
    return [L.model, L.name, F_, d, p, method, t["plain"], t["tri gram"], t["tri comb"], t["mm comb"],
            t["torch gram"], f"{tri_total / t['plain']:.2f}x",
            "-" if torch_error else f"{(t['torch gram'] + t['mm comb']) / tri_total:.2f}x",
            mem["tri"], mem["torch"], mem["plain"], f"ok vs {ref_name} {g_err:.0e}/{c_err:.0e}"]


def fp32_rate(dev, bench) -> float | None:
    """fp32 (non-TF32) cuBLAS GEMM rate, multiply-adds per second (8192³ on CUDA)."""
    if dev.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    ms = bench(lambda: a @ b, 10, 200)
    return n**3 / (ms * 1e-3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (Triton via its interpreter; with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU smoke test)")
    ap.add_argument("--retain", type=int, default=64)
    ap.add_argument("--forget", type=int, default=64)
    ap.add_argument("--models", default="", help="comma-separated model name prefixes to run (default: all)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no new row starts after this many seconds")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_gram_bench: no CUDA device here; run it on a lent GPU. Nothing was measured.")
            return 0
        from triton.testing import do_bench

        def bench(fn, warmup, rep):
            return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])[0])
        name = torch.cuda.get_device_name(dev)
    else:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_gram_bench: --device cpu needs TRITON_INTERPRET=1 (set before Triton is imported)")
            return 2
        bench = cpu_bench
        name = "cpu (smoke run, Triton interpreter)"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import triton

    R, Fg = (4, 4) if a.smoke else (a.retain, a.forget)
    N, S = R + Fg, R + 1
    ids = torch.cat([torch.arange(R), torch.full((Fg,), R)])  # retain rows: own segment; forget: one
    t_start = time.perf_counter()
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; "
          f"rows N = {R} retain + {Fg} forget, S = {S}; times: medians, ms")
    rate = fp32_rate(dev, bench)
    if rate:
        print(f"fp32 (non-TF32) cuBLAS GEMM 8192³: {rate / 1e12:.1f} T multiply-adds/s")
    print("| " + " | ".join(COLUMNS) + " |", flush=True)
    print("|" + "---|" * len(COLUMNS), flush=True)
    mlp_rate_printed = False
    for L in layers(a.smoke):
        if a.models and not any(L.model.startswith(m) for m in a.models.split(",")):
            continue
        if time.perf_counter() - t_start > a.budget_s:
            print(f"| {L.model} | {L.name} | not run (time budget) |", flush=True)
            continue
        info: dict = {}
        try:
            cells = run_layer(L, N, ids, S, dev, bench, a.warmup_ms, a.rep_ms, info)
        except torch.OutOfMemoryError as e:
            cells = [L.model, L.name, "OOM", str(e).splitlines()[0][:80]]
        except Exception as e:  # report, never hide; the next row runs
            cells = [L.model, L.name, f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"]
        print("| " + " | ".join(fmt(c).strip() for c in cells) + " |", flush=True)
        if rate and not mlp_rate_printed and L.model.startswith("MLP") and "explicit" in info.get("tri", {}):
            mlp_rate_printed = True
            useful = info["d"] * info["p"] * (info["F"] + S * (S + 1) / 2)
            ms = info["tri"]["explicit"]
            print(f"  flash-Gram on {L.name}: {useful / (ms * 1e-3) / 1e12:.2f} T useful multiply-adds/s "
                  f"= {useful / (ms * 1e-3) / rate:.0%} of the fp32 GEMM rate", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
