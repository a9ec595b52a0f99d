"""Segment Gram of a matrix layer (Linear, Conv as unfolded patches): ghost or explicit.

A matrix layer computes out[f] = W a_f (+ b) at every position f of every row. With G
independent groups (conv ``groups``; 1 for Linear) the weight is G blocks W_g (p x d), and
for row r with positions t:

    g_r = Σ_t D_{r,t}ᵀ A_{r,t}             (per group: (p x d) = Σ_t outer(D, A))
    g_s = Σ_{r in s} g_r                    (segment s)

Ghost (never forms g_s). Flatten positions of all kept rows into F = N'·T "flat rows":

    <g_s, g_t> = Σ_g Σ_{f in s, q in t} (A_fg · A_qg)(D_fg · D_qg)

i.e. K = Pᵀ [(A Aᵀ) ∘ (D Dᵀ)] P with P the (F x S) one-hot segment map: cost ~ F²·G·(d+p),
memory one (block x F) slab at a time.

Explicit ("flash-Gram"). Per (p-tile, d-tile), segment tiles X_s = Σ_{r in s} D_r[:, tile]ᵀ
A_r[:, tile]: for one-row segments by one batched GEMM over those rows (T reduced inside
the GEMM), for a multi-row segment by one GEMM over all its positions; then K += X Xᵀ
(fp32 GEMM summed in fp64). Cost ~ G·d·p·(N'·T + S²); only an (S, tile) slab and an
(n, tile) slab of row tiles ever exist, never (S, d, p) for the whole layer. Ignored rows
are never read.

Cost model: ghost when F²(d+p) < d·p·(N'·T + S²) and its slabs fit, else explicit. For
T = 1 (MLP heads) ghost wins by orders of magnitude; for convolutions and sequences
(T >> 1) explicit does (notes/peers-and-numerics.md §2).

Row providers. Both paths read rows through ``MatrixRows.chunk(idx)``, which returns
A: (n, G, d, T) and D: (n, G, p, T) for the rows ``idx`` (a slice or an index tensor;
position-last, so a conv's patches and its output gradient are views). Conv unfolds
patches chunk by chunk there.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .base import GramOptions, Segments, gram_of_segment_tiles


class MatrixRows(Protocol):
    N: int  # rows
    G: int  # groups
    T: int  # positions per row
    d: int  # input features per group
    p: int  # output features per group
    device: torch.device
    dtype: torch.dtype  # compute dtype (at least fp32)

    def chunk(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """A: (n, G, d, T), D: (n, G, p, T) for the rows idx (slice or LongTensor)."""

    def segment_tile(self, idx, p0: int, p1: int, d0: int, d1: int) -> torch.Tensor:
        """(G, p1-p0, d1-d0) = Σ over rows idx and their positions of D[p0:p1]ᵀ A[d0:d1]."""


def segment_tile_from_chunk(rows: MatrixRows, idx, p0: int, p1: int, d0: int, d1: int) -> torch.Tensor:
    """Generic ``segment_tile``: one GEMM over all positions of the rows (copies A and D)."""
    A, D = rows.chunk(idx)
    n, G, T = A.shape[0], rows.G, A.shape[-1]
    A2 = A[:, :, d0:d1].to(rows.dtype).permute(1, 0, 3, 2).reshape(G, n * T, d1 - d0)
    D2 = D[:, :, p0:p1].to(rows.dtype).permute(1, 2, 0, 3).reshape(G, p1 - p0, n * T)
    return torch.matmul(D2, A2)


def take(t: torch.Tensor, idx) -> torch.Tensor:
    """Rows idx of t: a view for a slice, a gather for an index tensor."""
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


def kept_chunks(seg: Segments, device, rows: int):
    """[(idx, ids)] chunks of at most ``rows`` kept rows; idx a slice when no row is ignored."""
    ids = seg.ids_on(device)
    kept = seg.kept_on(device)
    out = []
    if bool(kept.all()):
        for r0 in range(0, seg.N, rows):
            r1 = min(seg.N, r0 + rows)
            out.append((slice(r0, r1), ids[r0:r1]))
    else:
        idx = kept.nonzero().flatten()
        for r0 in range(0, idx.numel(), rows):
            sub = idx[r0 : r0 + rows]
            out.append((sub, ids[sub]))
    return out


def choose_method(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions) -> str:
    """"ghost" or "explicit" for these calls (module docstring, cost model)."""
    if opts.method in ("ghost", "explicit"):
        return opts.method
    c0 = calls[0]
    n_kept = int(seg.kept_on("cpu").sum())
    F = sum(n_kept * c.T for c in calls)
    ghost = float(F) * F * c0.G * (c0.d + c0.p)
    explicit = float(c0.G) * c0.d * c0.p * (F + seg.S**2)
    fits = F * c0.G * (c0.d + c0.p) <= 16 * opts.budget
    return "ghost" if (ghost < explicit and fits) else "explicit"


def gram(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions, method: str) -> torch.Tensor:
    """fp64 (S, S) segment Gram of the layer weight over all calls (rows of every call add)."""
    if method == "ghost":
        return gram_ghost(calls, seg, opts)
    return gram_explicit(calls, seg, opts)


def _plan(seg: Segments, device):
    """Kept rows split into one-row segments (rows, their segment ids) and the rows of each
    multi-row segment [(s, rows)]."""
    ids = seg.ids_on(device)
    kept = seg.kept_on(device)
    counts = torch.bincount(ids[kept], minlength=seg.S)
    single = kept & (counts.clamp_min(1)[ids.clamp_min(0)] == 1)
    singles = single.nonzero().flatten()
    multi = []
    for s in (counts > 1).nonzero().flatten().tolist():
        multi.append((s, (ids == s).nonzero().flatten()))
    return singles, ids[singles], multi


def gram_explicit(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions) -> torch.Tensor:
    """Explicit flash-Gram (module docstring): tiles over p and d. One-row segments get their
    tile from a batched GEMM over rows; a multi-row segment from one GEMM over all of its
    positions (T·rows), so no per-row tiles exist for it."""
    c0 = calls[0]
    S, G, d, p = seg.S, c0.G, c0.d, c0.p
    device, dtype = c0.device, c0.dtype
    K = torch.zeros((S, S), dtype=torch.float64, device=device)
    if S == 0 or not bool(seg.kept_on(device).any()):
        return K
    budget = opts.budget
    td = min(d, max(1, budget // (S * G)))
    tp = min(p, max(1, budget // (S * G * td)))
    rows = max(1, budget // (G * max(tp * td, (tp + td) * c0.T)))
    singles, single_ids, multi = _plan(seg, device)
    all_single = singles.numel() == seg.N
    for p0 in range(0, p, tp):
        p1 = min(p, p0 + tp)
        for d0 in range(0, d, td):
            d1 = min(d, d0 + td)
            X = torch.zeros((S, G, p1 - p0, d1 - d0), dtype=dtype, device=device)
            for c in calls:
                for r0 in range(0, singles.numel(), rows):
                    idx = slice(r0, r0 + rows) if all_single else singles[r0 : r0 + rows]
                    A, D = c.chunk(idx)  # [n, G, d, T], [n, G, p, T]
                    R = torch.matmul(D[:, :, p0:p1].to(dtype), A[:, :, d0:d1].to(dtype).transpose(-1, -2))
                    sid = single_ids[r0 : r0 + rows]
                    X.index_copy_(0, sid, R if len(calls) == 1 else X.index_select(0, sid) + R)
                for s, srows in multi:
                    for r0 in range(0, srows.numel(), rows):
                        X[s] += c.segment_tile(srows[r0 : r0 + rows], p0, p1, d0, d1)  # [G, tp, td]
            K += gram_of_segment_tiles(X.reshape(S, -1), opts.precision)
    return K


def gram_ghost(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions) -> torch.Tensor:
    """Ghost Gram (module docstring), in (block x F) slabs accumulated in fp64."""
    c0 = calls[0]
    S, G = seg.S, c0.G
    K = torch.zeros((S, S), dtype=torch.float64, device=c0.device)
    rows = max(1, opts.budget // max(1, c0.T * G * (c0.d + c0.p)))
    As, Ds, Ss = [], [], []
    for c in calls:
        for idx, ids in kept_chunks(seg, c0.device, rows):
            A, D = c.chunk(idx)
            n, T = A.shape[0], A.shape[-1]
            As.append(A.permute(0, 3, 1, 2).reshape(n * T, G, c.d))
            Ds.append(D.permute(0, 3, 1, 2).reshape(n * T, G, c.p))
            Ss.append(ids.repeat_interleave(T))
    if S == 0 or not As:
        return K
    dtype = torch.float64 if opts.precision == "high" else c0.dtype
    A = torch.cat(As).to(dtype)  # [F, G, d]
    D = torch.cat(Ds).to(dtype)  # [F, G, p]
    ids = torch.cat(Ss)  # [F]
    F = A.shape[0]
    P = torch.zeros((F, S), dtype=torch.float64, device=A.device)
    P[torch.arange(F, device=A.device), ids] = 1.0  # one-hot segment map
    At, Dt = A.permute(1, 2, 0), D.permute(1, 2, 0)  # [G, d, F], [G, p, F]
    blk = max(1, opts.budget // (G * F))
    for i0 in range(0, F, blk):
        i1 = min(F, i0 + blk)
        Ma = torch.matmul(A[i0:i1].transpose(0, 1), At)  # [G, b, F]  A_f · A_q
        Md = torch.matmul(D[i0:i1].transpose(0, 1), Dt)  # [G, b, F]  D_f · D_q
        M = (Ma.double() * Md.double()).sum(0)  # [b, F]
        K += P[i0:i1].T @ (M @ P)
    return 0.5 * (K + K.T)
