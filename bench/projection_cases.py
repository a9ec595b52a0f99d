"""The projection methods compared by the benchmarks, and a peak-memory probe.

Run as a script, it measures one method's peak extra resident memory in a fresh process:
``python bench/projection_cases.py METHOD P B`` prints ``<extra MiB>`` = (peak RSS during
the call) - (RSS with the inputs already allocated), see bench/memory.py.
"""
from __future__ import annotations

import sys

import torch
from memory import PeakMemory

from orthograd_fast import project_orthogonal
from orthograd_fast import reference as ref

METHODS = {
    "torch_fast": lambda g, G: project_orthogonal(g, G, backend="torch"),
    "torch_high": lambda g, G: project_orthogonal(g, G, backend="torch", precision="high"),
    "qr": ref.project_qr,  # the authors' path: reduced Householder QR, g - Q(Qᵀg)
}


def make_inputs(P: int, B: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(P, generator=gen), torch.randn(B, P, generator=gen)


def orthogonality_chunked(r: torch.Tensor, G: torch.Tensor, chunk: int = 1 << 16) -> float:
    """‖G r‖/(‖G‖₂‖r‖) in fp64 without an fp64 copy of G (‖G‖₂ from the fp64 Gram)."""
    B = G.shape[0]
    K = torch.zeros(B, B, dtype=torch.float64)
    Gr = torch.zeros(B, dtype=torch.float64)
    for s in range(0, G.shape[1], chunk):
        Gc = G[:, s : s + chunk].double()
        K += Gc @ Gc.T
        Gr += Gc @ r[s : s + chunk].double()
    norm_G = float(torch.linalg.eigvalsh(K)[-1].sqrt())
    return float(Gr.norm()) / (norm_G * float(r.double().norm()))


def peak_extra_mib(method: str, P: int, B: int) -> float:
    g, G = make_inputs(P, B)
    METHODS[method](g[:1000], G[:, :1000])  # load libraries, warm allocator
    with PeakMemory() as mem:
        METHODS[method](g, G)
    return mem.extra_mib


if __name__ == "__main__":
    print(f"{peak_extra_mib(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])):.1f}")
