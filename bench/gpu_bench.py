"""GPU timings of project_orthogonal, printed as a table (run by bench/gpu_check.sh).

For each (P, B, dtype): the Triton backend, the torch backend on the same GPU, the
authors' QR path (torch.linalg.qr, cuSOLVER), and the two-pass bandwidth floor
2·B·P·bytes / (measured device copy bandwidth): an explicit projection must read G at
least twice (once for K and b, once for the combination). Medians of
triton.testing.do_bench (ms), several input sets rotated so repeats don't hit L2.
Each timed result is first checked for orthogonality; a failing one is not timed.
"""
from __future__ import annotations

import sys

import torch
import triton
from triton.testing import do_bench

from orthograd_fast import project_orthogonal
from orthograd_fast import reference as ref


def orth(r, G, chunk: int = 1 << 20) -> float:
    """‖G r‖/(‖G‖₂‖r‖) in fp64, chunked over P (no fp64 copy of G)."""
    B = G.shape[0]
    K = torch.zeros(B, B, dtype=torch.float64, device=G.device)
    Gr = torch.zeros(B, dtype=torch.float64, device=G.device)
    for s in range(0, G.shape[1], chunk):
        Gc = G[:, s : s + chunk].double()
        K += Gc @ Gc.T
        Gr += Gc @ r[s : s + chunk].double()
    return float(Gr.norm() / (torch.linalg.eigvalsh(K)[-1].sqrt() * r.double().norm()))


def copy_bandwidth(nbytes: int) -> float:
    x = torch.empty(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=10, rep=100)
    return 2 * nbytes / (ms * 1e-3)  # bytes read + written per second


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth(1 << 30)
    print(f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s")
    cases = [(P, B, dt) for P in (1_000_000, 4_000_000, 16_000_000) for B in (16, 64, 128) for dt in (torch.float32, torch.bfloat16)]
    rows = []
    for P, B, dt in cases:
        sets = [(torch.randn(P, device="cuda", dtype=dt), torch.randn(B, P, device="cuda", dtype=dt)) for _ in range(2)]
        floor_ms = 2 * B * P * sets[0][1].element_size() / bw * 1e3
        methods = {
            "triton": lambda g, G: project_orthogonal(g, G, backend="triton"),
            "triton_high": lambda g, G: project_orthogonal(g, G, backend="triton", precision="high"),
            "torch": lambda g, G: project_orthogonal(g, G, backend="torch"),
            "qr": lambda g, G: ref.project_qr(g.float(), G.float()),
        }
        res = {}
        for name, fn in methods.items():
            try:
                o = orth(fn(*sets[0]), sets[0][1])
                if not o <= 1e-4:
                    res[name] = f"FAILED orth {o:.1e}"
                    continue
                it = iter(range(1 << 30))
                res[name] = do_bench(lambda: fn(*sets[next(it) % len(sets)]), warmup=5, rep=200)
            except torch.OutOfMemoryError:
                res[name] = "OOM"
            except Exception as e:  # report, never hide
                res[name] = f"ERROR {type(e).__name__}"
        rows.append((P, B, str(dt).replace("torch.", ""), floor_ms, res))
        sets = None  # free this size before the next
        torch.cuda.empty_cache()
    print()
    cols = ["P", "B", "dtype", "floor", "triton", "tri/floor", "tri high", "torch", "QR", "QR/triton", "torch/triton"]
    print(" ".join(f"{c:>12}" for c in cols))

    def cell(x):
        return f"{x:12.3f}" if isinstance(x, float) else f"{str(x)[:12]:>12}"

    def times(a, t):
        return f"{a / t:11.1f}x" if isinstance(a, float) and isinstance(t, float) else f"{'-':>12}"

    for P, B, dt, floor, res in rows:
        t = res.get("triton")
        print(" ".join([f"{P:>12.0e}", f"{B:>12}", f"{dt:>12}", cell(floor), cell(t), times(t, floor),
                        cell(res.get("triton_high")), cell(res.get("torch")), cell(res.get("qr")),
                        times(res.get("qr"), t), times(res.get("torch"), t)]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
