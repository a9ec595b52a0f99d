"""The two passes of ``project_orthogonal`` in plain torch ops (the CPU production path).

G is walked in column chunks of ``CHUNK`` entries, so the extra memory is O(B·CHUNK + P):
never a second (B, P) buffer. Within a chunk the GEMMs run in the work dtype (fp32 for
precision="fast", fp64 for "high" or fp64 inputs) and chunk results are summed in fp64.
"""
from __future__ import annotations

import torch

# Columns of G per chunk: large enough for BLAS efficiency, small enough that fp32 partial
# sums stay short (accuracy) and a converted chunk stays in cache.
CHUNK = 8192


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


def gram(gs, Gs, work: torch.dtype):
    """K = Σ G_i G_iᵀ (B, B), b = Σ G_i g_i (B,), gg = Σ ‖g_i‖² (), all fp64.

    gs: list of (P_i,) tensors; Gs: list of (B, P_i) tensors.
    """
    B = Gs[0].shape[0]
    dev = Gs[0].device
    K = torch.zeros(B, B, dtype=torch.float64, device=dev)
    b = torch.zeros(B, dtype=torch.float64, device=dev)
    gg = torch.zeros((), dtype=torch.float64, device=dev)
    for g, G in zip(gs, Gs):
        for s, e in _chunks(g.shape[0]):
            Gc = G[:, s:e].to(work)  # [B, C]
            gc = g[s:e].to(work)  # [C]
            K += (Gc @ Gc.T).to(torch.float64)
            b += (Gc @ gc).to(torch.float64)
            gg += torch.dot(gc, gc).to(torch.float64)
    return K, b, gg


def combine(rs, Gs, c: torch.Tensor, work: torch.dtype, out_dtypes, want_Gr: bool):
    """r_i = rs_i - G_iᵀ c for each piece, stored in ``out_dtypes``; optionally G r.

    rs: list of (P_i,) tensors (g, or the previous r); Gs: list of (B, P_i); c: (B,) fp64.
    Returns (new rs, G r (B,) fp64 or None, ‖r‖² () fp64 or None), where G r and ‖r‖² use
    the stored (rounded) r: they measure what is returned.
    """
    B = Gs[0].shape[0]
    dev = Gs[0].device
    cw = c.to(work)
    Gr = torch.zeros(B, dtype=torch.float64, device=dev) if want_Gr else None
    rr = torch.zeros((), dtype=torch.float64, device=dev) if want_Gr else None
    out = []
    for r_in, G, dt in zip(rs, Gs, out_dtypes):
        r = torch.empty(r_in.shape, dtype=dt, device=dev)
        for s, e in _chunks(r_in.shape[0]):
            Gc = G[:, s:e].to(work)  # [B, C]
            rc = r_in[s:e].to(work) - cw @ Gc  # [C]
            r[s:e] = rc
            if want_Gr:
                rc = r[s:e].to(work)
                Gr += (Gc @ rc).to(torch.float64)
                rr += torch.dot(rc, rc).to(torch.float64)
        out.append(r)
    return out, Gr, rr
