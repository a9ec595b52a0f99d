"""Segment Gram of a matrix layer (Linear, Conv as unfolded patches): ghost or explicit.

A matrix layer computes out[f] = W a_f (+ b) at every position f of every row. With G
independent groups (conv ``groups``; 1 for Linear) the weight is G blocks W_g (p x d), and
for row r with positions t:

    g_r = Σ_t D_{r,t}ᵀ A_{r,t}             (per group: (p x d) = Σ_t outer(D, A))
    g_s = Σ_{r in s} g_r                    (segment s)

Ghost (never forms g_s). Flatten positions of all kept rows into F = N'·T "flat rows":

    <g_s, g_t> = Σ_g Σ_{f in s, q in t} (A_fg · A_qg)(D_fg · D_qg)

i.e. K = Pᵀ [(A Aᵀ) ∘ (D Dᵀ)] P with P the (F x S) one-hot segment map (applied as
index sums, never formed): cost ~ F²·G·(d+p), memory one (block x F) slab at a time.

Explicit ("flash-Gram"). Per (p-tile, d-tile), segment tiles X_s = Σ_{r in s} D_r[:, tile]ᵀ
A_r[:, tile]: for one-row segments by one batched GEMM over those rows (T reduced inside
the GEMM), for a multi-row segment by one GEMM over all its positions; then K += X Xᵀ
(fp32 GEMM summed in fp64). Cost ~ G·d·p·(N'·T + S²); only an (S, tile) slab and an
(n, tile) slab of row tiles ever exist, never (S, d, p) for the whole layer. Ignored rows
are never read.

Cost model: ghost when F²(d+p) < d·p·(N'·T + S²) and its slabs fit, else explicit. For
T = 1 (MLP heads) ghost wins by orders of magnitude; for convolutions and sequences
(T >> 1) explicit does (notes/peers-and-numerics.md §2).

Kept tiles (store mode). The explicit path forms every g_s anyway; when the whole
(S, G, p, d) tensor X is no larger than what the calls already hold (A and D:
N·T·G·(d+p) elements, or the tile budget), it is formed in one tile and returned, so that
combine is Σ_s w_s X_s, an (S)·(S x G·p·d) contraction instead of a second GEMM over the
rows, the probe is uᵀ(Σ_s X_s)w, and the layer's A and D can be dropped right after.

Rows of a segment that sit next to each other in the batch are read as slices (views), not
gathered: an OrthoGrad batch is [retain rows, one per segment; forget rows, one segment].

Row providers. Both paths read rows through ``MatrixRows.chunk(idx)``, which returns
A: (n, G, d, T) and D: (n, G, p, T) for the rows ``idx`` (a slice or an index tensor;
position-last, so a conv's patches and its output gradient are views). Conv unfolds
patches chunk by chunk there; its whole-weight tiles (``row_tiles``, ``segment_tile``)
come from the convolution's own weight-gradient kernel instead, without patches (conv.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Protocol

import torch

from .base import (
    GramOptions,
    Probe,
    Rule,
    Segments,
    gram_from_row_grads,
    gram_of_segment_tiles,
    probe_row_grads,
    probe_tiles,
    sq_norm,
)


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

    def row_tiles(self, idx, p0: int, p1: int, d0: int, d1: int, out=None) -> torch.Tensor:
        """(n, G, p1-p0, d1-d0) per-row tiles Σ over each row's positions of D[p0:p1]ᵀ A[d0:d1]
        for the rows idx (written into ``out`` when given)."""

    def held(self) -> int:
        """Elements of the recorded tensors of the call (its input and output gradient)."""


def row_tiles_from_chunk(rows: MatrixRows, idx, p0: int, p1: int, d0: int, d1: int, out=None) -> torch.Tensor:
    """Generic ``row_tiles``: one batched GEMM over the rows' positions."""
    A, D = rows.chunk(idx)  # [n, G, d, T], [n, G, p, T]
    Dt, At = D[:, :, p0:p1].to(rows.dtype), A[:, :, d0:d1].to(rows.dtype).transpose(-1, -2)
    return torch.matmul(Dt, At) if out is None else torch.matmul(Dt, At, out=out)


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


def as_slice(idx: torch.Tensor):
    """idx: (n,) indices; a slice when they are one ascending run lo, lo+1, ... (so ``take``
    is a view, not a copy), else idx itself."""
    n = idx.numel()
    if n == 0:
        return idx
    lo = int(idx[0])
    return slice(lo, lo + n) if n == 1 or bool((idx.diff() == 1).all()) else idx


def kept_chunks(seg: Segments, device, rows: int):
    """[(idx, ids)] chunks of at most ``rows`` kept rows; idx a slice when no row is ignored."""
    return seg.memo(("chunks", torch.device(device), rows), lambda: _kept_chunks(seg, device, rows))


def _kept_chunks(seg: Segments, device, rows: int):
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


def _ghost_wins(F: int, G: int, d: int, p: int, S: int, opts: GramOptions) -> bool:
    """Cost model (module docstring): ghost ~F²·G·(d+p) against explicit ~G·d·p·(F + S²)."""
    ghost = float(F) * F * G * (d + p)
    explicit = float(G) * d * p * (F + S**2)
    fits = F * G * (d + p) <= 16 * opts.budget
    return ghost < explicit and fits


def choose_method(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions) -> str:
    """"ghost" or "explicit" for these calls (module docstring, cost model)."""
    if opts.method in ("ghost", "explicit"):
        return opts.method
    c0 = calls[0]
    F = sum(seg.n_kept * c.T for c in calls)
    return "ghost" if _ghost_wins(F, c0.G, c0.d, c0.p, seg.S, opts) else "explicit"


def keeps_tiles(N: int, T: int, G: int, d: int, p: int, S: int, held: int, opts: GramOptions) -> bool:
    """Whether a call of these sizes, all N rows kept, gets the explicit Gram with kept tiles
    (``choose_method`` and ``storable`` for it alone). More calls of the same layer only
    add rows (F) and held elements, which keeps both true: safe to decide at the first call."""
    if opts.method == "ghost" or (opts.method == "auto" and _ghost_wins(N * T, G, d, p, S, opts)):
        return False
    return S * G * p * d <= max(opts.budget, held)


def gram(
    calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions, method: str, keep: bool = False,
    force_keep: bool = False, bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(K, X, Kb): fp64 (S, S) segment Gram of the layer weight over all calls (rows of every
    call add); the kept segment gradients X (S, G·p·d) when ``keep`` and the explicit path
    stores them (``storable``, or always with ``force_keep``), else None; the bias's Gram
    when ``bias`` and the ghost path formed it on the way (gram_ghost), else None."""
    if method == "ghost":
        K, Kb = gram_ghost(calls, seg, opts, bias=bias)
        return K, None, Kb
    K, X = gram_explicit(calls, seg, opts, keep=keep and (force_keep or storable(calls, seg, opts)))
    return K, X, None


def _plan(seg: Segments, device):
    """Kept rows split into one-row segments (rows (n1,) ascending, their segment ids
    (n1,)) and the rows of each multi-row segment [(s, rows)] (once per step)."""
    return seg.memo(("plan", torch.device(device)), lambda: _make_plan(seg, device))


def _make_plan(seg: Segments, device):
    ids = seg.ids_on(device)
    kept = seg.kept_on(device)
    counts = torch.bincount(ids[kept], minlength=seg.S)
    single = kept & (counts.clamp_min(1)[ids.clamp_min(0)] == 1)
    singles = single.nonzero().flatten()
    multi = []
    for s in (counts > 1).nonzero().flatten().tolist():
        multi.append((s, (ids == s).nonzero().flatten()))
    return singles, ids[singles], multi


def storable(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions) -> bool:
    """Whether the layer's (S, G, p, d) segment gradients may be kept (module docstring):
    no more elements than the calls hold, or than one tile of the budget."""
    c0 = calls[0]
    return seg.S * c0.G * c0.p * c0.d <= max(opts.budget, sum(c.held() for c in calls))


def gram_explicit(
    calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions, keep: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Explicit flash-Gram (module docstring): fp64 (S, S) Gram, and with ``keep`` the
    segment gradients X: (S, G·p·d) (one tile for the whole layer), else None.

    Tiles over p and d. One-row segments get their tile from a batched GEMM over rows,
    written straight into X when their ids are one contiguous run (one call); a multi-row
    segment from one GEMM over all of its positions (T·rows), so no per-row tiles exist
    for it. Contiguous rows are read as views (as_slice)."""
    c0 = calls[0]
    S, G, d, p = seg.S, c0.G, c0.d, c0.p
    device, dtype = c0.device, c0.dtype
    K = torch.zeros((S, S), dtype=torch.float64, device=device)
    if S == 0 or seg.n_kept == 0:
        return K, (torch.zeros((S, G * p * d), dtype=dtype, device=device) if keep else None)
    budget = opts.budget
    if keep:
        td, tp = d, p
    else:
        td = min(d, max(1, budget // (S * G)))
        tp = min(p, max(1, budget // (S * G * td)))
    rows = max(1, budget // (G * max(tp * td, (tp + td) * c0.T)))
    singles, single_ids, multi = _plan(seg, device)
    chunks = []  # (rows of the batch, rows of X) per chunk of one-row segments
    for r0 in range(0, singles.numel(), rows):
        chunks.append((as_slice(singles[r0 : r0 + rows]), as_slice(single_ids[r0 : r0 + rows])))
    multi = [(s, [as_slice(srows[r0 : r0 + rows]) for r0 in range(0, srows.numel(), rows)]) for s, srows in multi]
    alloc = torch.empty if singles.numel() + len(multi) == S else torch.zeros  # all written?
    for p0 in range(0, p, tp):
        p1 = min(p, p0 + tp)
        for d0 in range(0, d, td):
            d1 = min(d, d0 + td)
            X = alloc((S, G, p1 - p0, d1 - d0), dtype=dtype, device=device)
            for ci, c in enumerate(calls):
                for idx, sid in chunks:
                    if isinstance(sid, slice) and ci == 0:
                        c.row_tiles(idx, p0, p1, d0, d1, out=X[sid])  # [n, G, tp, td]
                    elif isinstance(sid, slice):
                        X[sid] += c.row_tiles(idx, p0, p1, d0, d1)
                    else:
                        R = c.row_tiles(idx, p0, p1, d0, d1)
                        X.index_copy_(0, sid, R if ci == 0 else X.index_select(0, sid) + R)
                for s, parts in multi:
                    for j, idx in enumerate(parts):
                        tile = c.segment_tile(idx, p0, p1, d0, d1)  # [G, tp, td]
                        if ci == 0 and j == 0:
                            X[s] = tile
                        else:
                            X[s] += tile
            K += gram_of_segment_tiles(X.reshape(S, -1), opts.precision)
    return K, (X.reshape(S, -1) if keep else None)


def _flat_ids(ids: torch.Tensor, T: int) -> torch.Tensor:
    """(n·T,) segment ids of the flat rows (positions) of rows with segment ids (n,)."""
    return ids.repeat_interleave(T) if T > 1 else ids


def _add_segment_sums(K: torch.Tensor, M: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor) -> None:
    """K += Pᵣᵀ M P_c for the one-hot maps of row_ids (b,) and col_ids (F,): M (b, F) summed
    into (segment of row, segment of column) cells. Two index_add_ passes, O(b·F), where
    the dense one-hot products cost O(b·F·S) (B = 128, F = 256 on one CPU core: 0.17 ms
    against 0.97 ms); deterministic on CPU and CUDA."""
    R = M.new_zeros((K.shape[0], M.shape[1])).index_add_(0, row_ids, M)  # [S, F]
    K.index_add_(1, col_ids, R)


def gram_ghost(
    calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions, bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ghost Gram (module docstring), in (block x F) slabs accumulated in fp64: the weight's
    (S, S), and with ``bias`` also the bias's, Pᵀ [Σ_g D_g D_gᵀ] P (a bias row's gradient
    is Σ over its positions of D), from the D·D products the weight needs anyway."""
    c0 = calls[0]
    S, G = seg.S, c0.G
    K = torch.zeros((S, S), dtype=torch.float64, device=c0.device)
    Kb = torch.zeros((S, S), dtype=torch.float64, device=c0.device) if bias else None
    rows = max(1, opts.budget // max(1, c0.T * G * (c0.d + c0.p)))
    As, Ds, flat = [], [], []
    for c in calls:
        for j, (idx, ids) in enumerate(kept_chunks(seg, c0.device, rows)):
            A, D = c.chunk(idx)
            n, T = A.shape[0], A.shape[-1]
            As.append(A.permute(0, 3, 1, 2).reshape(n * T, G, c.d))
            Ds.append(D.permute(0, 3, 1, 2).reshape(n * T, G, c.p))
            flat.append(seg.memo(("flat_ids", c0.device, rows, j, T), partial(_flat_ids, ids, T)))
    if S == 0 or not As:
        return K, Kb
    dtype = torch.float64 if opts.precision == "high" else c0.dtype
    A = (As[0] if len(As) == 1 else torch.cat(As)).to(dtype)  # [F, G, d]
    D = (Ds[0] if len(Ds) == 1 else torch.cat(Ds)).to(dtype)  # [F, G, p]
    ids = flat[0] if len(flat) == 1 else torch.cat(flat)  # [F] segment of each flat row
    F = A.shape[0]
    At, Dt = A.permute(1, 2, 0), D.permute(1, 2, 0)  # [G, d, F], [G, p, F]
    blk = max(1, opts.budget // (G * F))
    for i0 in range(0, F, blk):
        i1 = min(F, i0 + blk)
        Ma = torch.matmul(A[i0:i1].transpose(0, 1), At).double()  # [G, b, F]  A_f · A_q
        Md = torch.matmul(D[i0:i1].transpose(0, 1), Dt).double()  # [G, b, F]  D_f · D_q
        M = (Ma * Md).sum(0)  # [b, F]
        _add_segment_sums(K, M, ids[i0:i1], ids)
        if bias:
            _add_segment_sums(Kb, Md.sum(0), ids[i0:i1], ids)
    return 0.5 * (K + K.T), (None if Kb is None else 0.5 * (Kb + Kb.T))


class MatrixRule(Rule):
    """Shared ``grams`` of the weight-matrix layers (Linear, Conv): the weight's Gram ghost
    or explicit by the cost model (``choose_method``), the bias's from the D·Dᵀ the ghost
    path forms anyway or from its per-row gradients. Subclasses give ``_rows(calls)``
    (a list of MatrixRows) and ``kind`` (the coverage label)."""

    def _rows(self, calls) -> list:
        raise NotImplementedError

    @staticmethod
    def _bias_rows(rows) -> torch.Tensor:
        return sum(r.bias_rows() for r in rows)  # [N, p]

    def _combine_bias(self, rows, seg: Segments, weights, out: dict) -> None:
        """out[bias] = Σ_rows w_row · (the row's bias gradient), when weights name the bias."""
        gb = self.local("bias")
        if gb in weights:
            for r in rows:
                gB = seg.row_weights(weights[gb], r.device, r.dtype) @ r.bias_rows()
                out[gb] = out[gb] + gB if gb in out else gB

    def _probe_bias(self, rows, seg: Segments, probes: dict[str, Probe], tiles: dict, noise2=None) -> None:
        """Bias probe Σ_f D_f·w over all positions (from the kept tiles when every row is
        kept); noise2 = Σ_f |D_f|² unless the caller already has it. A detached bias needs
        none."""
        gb = self.local("bias")
        if gb is None or gb in self.skipped:
            return
        if noise2 is None:
            noise2 = sum(float(sq_norm(r.g)) for r in rows)
        count = sum(r.N * r.T for r in rows)
        pr = probes[gb]
        if gb in tiles and seg.all_kept:
            pr.add(probe_tiles(pr, tiles[gb]), noise2, count)
        else:
            probe_row_grads(pr, self._bias_rows(rows), noise2, count)

    def grams(self, calls, seg: Segments, opts: GramOptions, tiles=None):
        rows = self._rows(calls)
        out = {}
        gw, gb = self.local("weight"), self.local("bias")
        if gw is not None and rows:
            force = gw in self.forced
            method = "explicit" if force else choose_method(rows, seg, opts)
            out[gw], X, Kb = gram(rows, seg, opts, method, keep=tiles is not None, force_keep=force, bias=gb is not None)
            if X is not None:
                tiles[gw] = X
            if Kb is not None:
                out[gb] = Kb
            self.methods[gw] = f"{self.kind}:{method}"
        if gb is not None and rows and gb not in out:
            out[gb] = gram_from_row_grads(self._bias_rows(rows), seg, opts.precision, tiles, gb)
            self.methods[gb] = f"{self.kind}:bias"
        return out
