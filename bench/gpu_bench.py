"""GPU timings of project_orthogonal, printed as a table (run by bench/gpu_check.sh).

For each (P, B, dtype): the Triton backend, the torch backend on the same GPU, the
authors' QR path (torch.linalg.qr, cuSOLVER), and the two-pass bandwidth floor
2·B·P·bytes / (measured device copy bandwidth): an explicit projection must read G at
least twice (once for K and b, once for the combination). Medians of
triton.testing.do_bench (ms), several input sets rotated so repeats don't hit L2.
Each timed result is first checked for orthogonality; a failing one is not timed. Lines
are printed as they are measured. ``--device cpu`` with tiny sizes runs the same code on
the CPU (Triton through its interpreter, a plain timer): a smoke test of this script.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from orthograd_fast import project_orthogonal  # noqa: E402
from orthograd_fast import reference as ref  # noqa: E402


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


def copy_bandwidth(nbytes: int, device: torch.device, bench) -> float:
    """Bytes read + written per second by a device copy of ``nbytes``."""
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), warmup=10, rep=100)
    return 2 * nbytes / (ms * 1e-3)


COLUMNS = ["P", "B", "dtype", "floor", "triton", "tri/floor", "tri high", "torch", "QR", "QR/triton", "torch/triton"]


def _cell(x) -> str:
    return f"{x:12.3f}" if isinstance(x, float) else f"{str(x)[:12]:>12}"


def _times(a, t) -> str:
    return f"{a / t:11.1f}x" if isinstance(a, float) and isinstance(t, float) else f"{'-':>12}"


def time_case(P: int, B: int, dt: torch.dtype, device: torch.device, bench, bw: float) -> str:
    """One table line: every method checked for orthogonality (a failing one is not timed),
    then timed on two input sets rotated."""
    sets = [(torch.randn(P, device=device, dtype=dt), torch.randn(B, P, device=device, dtype=dt)) for _ in range(2)]
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
            res[name] = bench(lambda: fn(*sets[next(it) % len(sets)]), warmup=5, rep=200)
        except torch.OutOfMemoryError:
            res[name] = "OOM"
        except Exception as e:  # report, never hide
            res[name] = f"ERROR {type(e).__name__}"
    t = res.get("triton")
    return " ".join([f"{P:>12.0e}", f"{B:>12}", f"{str(dt).replace('torch.', ''):>12}", _cell(floor_ms), _cell(t),
                     _times(t, floor_ms), _cell(res.get("triton_high")), _cell(res.get("torch")),
                     _cell(res.get("qr")), _times(res.get("qr"), t), _times(res.get("torch"), t)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,4000000,16000000", help="P values")
    ap.add_argument("--batch-sizes", default="16,64,128", help="B values")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cuda",
                    help="cuda, or cpu for a smoke run of this script (Triton via its interpreter, CPU timer)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA device here; run it on a lent GPU through bench/gpu_check.sh. Nothing was measured.")
            return 0
        bench = do_bench
        name = torch.cuda.get_device_name(device)
    else:
        from peers_gpu import cpu_bench

        def bench(fn, warmup, rep):
            return cpu_bench(fn, warmup, rep, [0.5])[0]
        name = "cpu (smoke run)"
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth(1 << 30 if device.type == "cuda" else 1 << 24, device, bench)
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s")
    print()
    # printed line by line, so a run cut short by its caller's timeout keeps what it measured
    print(" ".join(f"{c:>12}" for c in COLUMNS), flush=True)
    for P in (int(x) for x in a.sizes.split(",")):
        for B in (int(x) for x in a.batch_sizes.split(",")):
            for dt in (getattr(torch, x) for x in a.dtypes.split(",")):
                print(time_case(P, B, dt, device, bench, bw), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # free this size before the next
    return 0


if __name__ == "__main__":
    sys.exit(main())
