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
(fp32 GEMMs over at most GRAM_CHUNK columns, summed in fp64). Cost ~ G·d·p·(N'·T + S²); only an (S, tile) slab and an
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

Backends. These are the torch path's (the reference, and the CPU's); with backend
"triton" (or "auto" on CUDA) matrix_triton.py forms the ghost Gram and the explicit Gram
without kept tiles with the Triton kernels, the same cancellation safeguard included
(``guard_ghost``); kept tiles and combine stay torch ops (matrix_triton.py says why).

Row providers. Both paths read rows through ``MatrixRows.chunk(idx)``, which returns
A: (n, G, d, T) and D: (n, G, p, T) for the rows ``idx`` (a slice or an index tensor;
position-last, so a conv's patches and its output gradient are views). Conv unfolds
patches chunk by chunk there; its whole-weight tiles (``row_tiles``, ``segment_tile``)
come from the convolution's own weight-gradient kernel instead, without patches (conv.py).

Cancellation: ghost entries no worse than explicit ones. The ghost forms K_st from
F_s·F_t products; when a segment's outer products D_f A_fᵀ cancel (near-equal positions
under output gradients of alternating sign, a segment of opposing rows) each product is
far larger than their sum and its rounding survives the sum. Linear(128, 128) on 4
near-equal positions per row, |g_r| ~ 5e-5·Σ_t|A_t||D_t|: the fp32 ghost was 5.8 off
(relative Frobenius) with negative diagonal entries, the explicit path, which rounds
X_s = Σ_f D_f A_fᵀ once and then squares it, 8e-6.

Model: rounding errors independent with mean zero, so that a reduction of k terms is off
by ~sqrt(k)·u times the norm of its terms (Higham & Mary, SIAM J. Sci. Comput. 41, 2019;
the worst case k·u is never met, and the two paths' worst-case bounds differ by constants
that swamp the comparison). With x_fg = |A_fg|·|D_fg| and Q_s = Σ_{f in s, g} x_fg²:

    ghost     A_fg·A_qg and D_fg·D_qg (d and p terms) are off by ~sqrt(d)·u_g|A_fg||A_qg|
              and ~sqrt(p)·u_g|D_fg||D_qg|, independently for every pair (f, q); summed
              over f in s, q in t, g:   |dK_st| ~ sqrt(d + p)·u_g·sqrt(Q_s Q_t)
    explicit  K_st = <X_s, X_t> reduces k >= d + p terms (a tile) and is off by at least
              ~sqrt(k)·u_e·|g_s||g_t| (X_s's own rounding only adds): on the diagonal
              |dK_ss| >= sqrt(d + p)·u_e·K_ss

so on the diagonal ghost/explicit <= (u_g/u_e)/κ_s, κ_s = K_ss/Q_s: ~1 for summands that
do not cancel (exactly 1 for one position of one row), tiny when they do. Segment s is
*weak* when K_ss < τ·Q_s, τ = (u_g/u_e)/R, R = GHOST_ERROR_RATIO = 2. Measured over 4500
random inputs mixing cancelling and sound rows (d, p in [3, 200], T in [1, 8], one- and
multi-row segments): the ghost Gram within 3.9 (Frobenius), 2.1 (largest entry over
sqrt(K_ss K_tt)) times the explicit path's error plus u·|K|.

Off the diagonal a weak s spoils its whole row: against a sound t the explicit error is
the projection of X_s's rounding on X_t, measured 15x below the ghost's. So the rows *and
columns* of the weak segments W are redone with fp64 products (rows W of the slabs
against all F flat rows: κ·F_W·F·G·(d+p), κ = fp64/fp32 GEMM time, ``_fp64_slowdown``)
when that costs less than the explicit path, G·d·p·(F + S²); otherwise, and for fp64 rows
(no higher precision), the layer's whole Gram is explicit. fp64 products have weak
segments of their own: against fp32 tiles, whose result carries at least u_e·K_ss, the
fp64 ghost's sqrt(d + p)·u_64·Q_s stays within R while K_ss >= τ_64·Q_s, τ_64 =
(u_64/u_e)·sqrt(d + p)/R (1.5e-8 for d = p = 128); the block of segments weak in fp64 too
is explicit (their entries with the others keep fp64 products, off by ~sqrt((d+p)·k)·u_64/
u_e ~ 1e-5 of the explicit's). precision="high" starts in fp64.

The test needs no extra pass: |A_fg|², |D_fg|² are the diagonals of the ghost's own slabs
A·Aᵀ, D·Dᵀ, and K_ss is the ghost diagonal (known to ~sqrt(d + p)·u·Q_s, so κ_s is read to
that). Never a negative diagonal: a kept K_ss passed K_ss >= τ·Q_s >= 0, a redone one
passed the fp64 test or comes from the explicit path, whose diagonal adds squares.

The bias gradient of s is Σ_{f in s} D_f; its ghost Gram Pᵀ[D Dᵀ]P has the same model with
Q_s = Σ_{f in s} |D_f|² and dot length G·p. Its explicit Gram (segment sums of the per-row
bias gradients, ~N·T·G·p) costs less than the ghost pass, so the bias is held to R = 1
and its weak rows and columns come from that.
"""
from __future__ import annotations

import math
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
    kept_segment_sum,
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

    def bias_rows(self) -> torch.Tensor:
        """(N, G·p) per-row bias gradients Σ over each row's positions of D (layers with a
        bias: ``gram_ghost(..., bias=True)`` reads it for weak segments)."""


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
    force_keep: bool = False, bias: bool = False, name: str = "", info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(K, X, Kb): fp64 (S, S) segment Gram of the layer weight over all calls (rows of every
    call add); the kept segment gradients X (S, G·p·d) when ``keep`` and the explicit path
    stores them (``storable``, or always with ``force_keep``), else None; the bias's Gram
    when ``bias`` and the ghost path formed it on the way (gram_ghost), else None.

    ``opts.backend`` is resolved for these rows by matrix_triton.serves (``name``, the
    weight's, for its errors); kept segment gradients always come from the torch path
    (matrix_triton.py says why). ``info``, when given, gets "backend": the one that formed K."""
    keep = keep and method != "ghost" and (force_keep or storable(calls, seg, opts))
    backend = "torch"
    if opts.backend != "torch":
        from . import matrix_triton

        if matrix_triton.serves(calls, seg, opts, name) and (method == "ghost" or not keep):
            backend = "triton"  # serves() raises where a named "triton" cannot run
    if info is not None:
        info["backend"] = backend
    if backend == "triton":
        if method == "ghost":
            K, Kb = matrix_triton.gram_ghost(calls, seg, opts, bias=bias)
            return K, None, Kb
        return matrix_triton.gram_explicit(calls, seg, opts)[0], None, None
    if method == "ghost":
        K, Kb = gram_ghost(calls, seg, opts, bias=bias)
        return K, None, Kb
    K, X = gram_explicit(calls, seg, opts, keep=keep)
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


def _explicit_chunks(seg: Segments, device, rows: int):
    """``gram_explicit``'s row chunks for at most ``rows`` rows at a time (memoised per
    Segments): [(rows of the batch, rows of X)] of the one-row segments, [(s, [rows])] of
    the multi-row ones (slices where the rows are one ascending run), and the allocator of
    X (torch.empty when every segment gets written)."""
    singles, single_ids, multi = _plan(seg, device)
    chunks = []  # (rows of the batch, rows of X) per chunk of one-row segments
    for r0 in range(0, singles.numel(), rows):
        chunks.append((as_slice(singles[r0 : r0 + rows]), as_slice(single_ids[r0 : r0 + rows])))
    multi = [(s, [as_slice(srows[r0 : r0 + rows]) for r0 in range(0, srows.numel(), rows)]) for s, srows in multi]
    alloc = torch.empty if singles.numel() + len(multi) == seg.S else torch.zeros  # all written?
    return chunks, multi, alloc


def storable(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions) -> bool:
    """Whether the layer's (S, G, p, d) segment gradients may be kept (module docstring):
    no more elements than the calls hold, or than one tile of the budget."""
    c0 = calls[0]
    return seg.S * c0.G * c0.p * c0.d <= max(opts.budget, sum(c.held() for c in calls))


#: longest fp32 reduction of the explicit path's X·Xᵀ (``_tiles_gram``)
GRAM_CHUNK = 1 << 15


def _tiles_gram(X: torch.Tensor, precision: str) -> torch.Tensor:
    """fp64 (S, S) Gram of segment tiles X: (S, k), in column chunks of at most GRAM_CHUNK
    summed in fp64. A BLAS reduction of k terms in fp32 is off by up to ~(k/k_c)·u relative
    (k_c its inner block) on the positive diagonal: one (1 x 2^20) tile, the shape a
    one-segment layer of 1024 x 1024 gets, measured 2.3e-5 unchunked, 3.9e-8 in chunks of
    2^15 (0.10 ms -> 0.25 ms); a (65 x 2^16) one 5.4e-7 -> 2.4e-7 for +7% time. So no
    Gram is less accurate for having fewer segments (the ghost's weak blocks, a small S)."""
    k = X.shape[1]
    if precision == "high" or X.dtype == torch.float64 or k <= GRAM_CHUNK:
        return gram_of_segment_tiles(X, precision)
    K = gram_of_segment_tiles(X[:, :GRAM_CHUNK], precision)
    for c0 in range(GRAM_CHUNK, k, GRAM_CHUNK):
        K += gram_of_segment_tiles(X[:, c0 : c0 + GRAM_CHUNK], precision)
    return K


def gram_explicit(
    calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions, keep: bool = False, need_gram: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Explicit flash-Gram (module docstring): fp64 (S, S) Gram, and with ``keep`` the
    segment gradients X: (S, G·p·d) (one tile for the whole layer), else None. With
    ``need_gram=False`` (and ``keep``) only X is formed; the Gram returned is zeros.

    Tiles over p and d. One-row segments get their tile from a batched GEMM over rows,
    written straight into X when their ids are one contiguous run (one call); a multi-row
    segment from one GEMM over all of its positions (T·rows), so no per-row tiles exist
    for it. Contiguous rows are read as views (as_slice)."""
    if opts.precision == "high":  # fp64 products in the tiles too, not only in their Gram
        for c in calls:
            c.dtype = torch.float64
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
    chunks, multi, alloc = seg.memo(("explicit_chunks", torch.device(device), rows),
                                    lambda: _explicit_chunks(seg, device, rows))
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
            if need_gram or not keep:
                K += _tiles_gram(X.reshape(S, -1), opts.precision)
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


#: R of the cancellation test (module docstring, "Cancellation"): a ghost entry is kept
#: while its expected rounding error is at most R times the explicit path's; the bias,
#: whose explicit Gram costs less than its ghost pass, is held to R = 1
GHOST_ERROR_RATIO = 2.0


def _unit(dtype: torch.dtype) -> float:
    """Unit roundoff u of dtype (2^-24 for fp32, 2^-53 for fp64)."""
    return torch.finfo(dtype).eps / 2


def _fp64_slowdown(device: torch.device) -> float:
    """κ: an fp64 GEMM's time over an fp32 one's. 2 on CPUs (measured, AMD EPYC, one thread:
    (128 x 1024)·(1024 x 128) 0.33 ms fp32, 0.70 ms fp64) and on data-center GPUs with full
    fp64 (P100, V100, A100, H100/H200, B200: sm_60/70/80/90/100); 64 on the others (fp64 at
    1/32..1/64 of fp32)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 2.0 if minor == 0 and major in (6, 7, 8, 9, 10) else 64.0
    return 2.0


def _tau(ghost: torch.dtype, explicit: torch.dtype, length: int, ratio: float = GHOST_ERROR_RATIO) -> float:
    """τ of the cancellation test K_ss >= τ·Q_s for a ghost whose dot products (``length``
    = d + p terms) are in ``ghost``, against explicit tiles in ``explicit`` (module
    docstring): (u_g/u_e)/R in one precision, (u_g/u_e)·sqrt(length)/R for an fp64 ghost
    against fp32 tiles."""
    ug, ue = _unit(ghost), _unit(explicit)
    return ug / ue / ratio * (1.0 if ug >= ue else math.sqrt(length))


def _sub_segments(seg: Segments, which: torch.Tensor) -> Segments:
    """Segments of the rows in segments ``which`` (w,), renumbered 0..w-1 in that order;
    every other row ignored (-1)."""
    dev = which.device
    remap = torch.full((seg.S + 1,), -1, dtype=torch.long, device=dev)
    remap[which] = torch.arange(which.numel(), device=dev)
    return Segments(remap[seg.ext_on(dev)], which.numel())


def _flat_rows(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions):
    """A: (F, G, d), D: (F, G, p), ids: (F,) of the kept rows' positions over all calls (the
    flat rows), or None when there are none."""
    c0 = calls[0]
    G, dev = c0.G, c0.device
    rows = max(1, opts.budget // max(1, c0.T * G * (c0.d + c0.p)))
    As, Ds, flat = [], [], []
    for c in calls:
        for j, (idx, ids) in enumerate(kept_chunks(seg, dev, rows)):
            A, D = c.chunk(idx)
            n, T = A.shape[0], A.shape[-1]
            As.append(A.permute(0, 3, 1, 2).reshape(n * T, G, c.d))
            Ds.append(D.permute(0, 3, 1, 2).reshape(n * T, G, c.p))
            flat.append(seg.memo(("flat_ids", dev, rows, j, T), partial(_flat_ids, ids, T)))
    if not As:
        return None
    A = As[0] if len(As) == 1 else torch.cat(As)
    D = Ds[0] if len(Ds) == 1 else torch.cat(Ds)
    return A, D, (flat[0] if len(flat) == 1 else torch.cat(flat))


def _ghost_slabs(A, D, ids, S: int, opts: GramOptions, dtype: torch.dtype, bias: bool, sel=None):
    """Ghost sums with products in ``dtype`` over flat rows A (F, G, d), D (F, G, p) of
    segments ids (F,), in (block x F) slabs accumulated in fp64: (K, Kb, Q, Qb).

    K (S, S) = Pᵀ[(A Aᵀ) ∘ (D Dᵀ)]P summed over groups; Kb (S, S) = Pᵀ[D Dᵀ]P (with
    ``bias``, else None); Q (S,) = Σ_{f in s, g} |A_fg|²|D_fg|², Qb (S,) = Σ_{f in s} |D_f|²
    (the cancellation test's sums, module docstring), from the slabs' diagonals. With
    ``sel`` (m,) flat-row indices, only the rows sel of the slabs are formed: K and Kb hold
    the rows of the segments of sel (their columns all segments), Q and Qb are None."""
    G, F = A.shape[1], A.shape[0]
    dev = A.device
    A, D = A.to(dtype), D.to(dtype)
    At, Dt = A.permute(1, 2, 0), D.permute(1, 2, 0)  # [G, d, F], [G, p, F]
    Ar, Dr, rid = (A, D, ids) if sel is None else (A[sel], D[sel], ids[sel])
    K = torch.zeros((S, S), dtype=torch.float64, device=dev)
    Kb = torch.zeros((S, S), dtype=torch.float64, device=dev) if bias else None
    Q = torch.zeros(S, dtype=torch.float64, device=dev) if sel is None else None
    Qb = torch.zeros(S, dtype=torch.float64, device=dev) if bias and sel is None else None
    blk = max(1, opts.budget // (G * F))
    for i0 in range(0, Ar.shape[0], blk):
        i1 = min(Ar.shape[0], i0 + blk)
        Ma = torch.matmul(Ar[i0:i1].transpose(0, 1), At).double()  # [G, b, F]  A_f · A_q
        Md = torch.matmul(Dr[i0:i1].transpose(0, 1), Dt).double()  # [G, b, F]  D_f · D_q
        _add_segment_sums(K, (Ma * Md).sum(0), rid[i0:i1], ids)
        if bias:
            _add_segment_sums(Kb, Md.sum(0), rid[i0:i1], ids)
        if sel is None:
            a2 = Ma.diagonal(offset=i0, dim1=1, dim2=2)  # [G, b]  |A_fg|²
            d2 = Md.diagonal(offset=i0, dim1=1, dim2=2)  # [G, b]  |D_fg|²
            Q.index_add_(0, rid[i0:i1], (a2 * d2).sum(0))
            if bias:
                Qb.index_add_(0, rid[i0:i1], d2.sum(0))
    return K, Kb, Q, Qb


def _weak(K: torch.Tensor, Q: torch.Tensor, tau: float) -> torch.Tensor:
    """(w,) segments whose ghost diagonal fails K_ss >= τ·Q_s (module docstring)."""
    return (K.diagonal() < tau * Q).nonzero().flatten()


def gram_ghost(
    calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions, bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ghost Gram (module docstring): the weight's fp64 (S, S), and with ``bias`` also the
    bias's, Pᵀ [Σ_g D_g D_gᵀ] P (a bias row's gradient is Σ over its positions of D), from
    the D·D products the weight needs anyway.

    Cancellation (module docstring): the rows and columns of weak segments W (K_ss < τ·Q_s)
    are redone with fp64 products, and the block of those still weak in fp64 explicitly;
    where fp64 products are not available or cost more than the explicit path, the layer's
    whole Gram is explicit. A weak bias segment makes the bias's whole Gram explicit."""
    c0 = calls[0]
    S = seg.S
    K = torch.zeros((S, S), dtype=torch.float64, device=c0.device)
    Kb = torch.zeros_like(K) if bias else None
    flat = _flat_rows(calls, seg, opts) if S else None
    if flat is None:
        return K, Kb
    A, D, ids = flat
    dtype = torch.float64 if opts.precision == "high" else c0.dtype
    return guard_ghost(calls, seg, opts, _ghost_slabs(A, D, ids, S, opts, dtype, bias), dtype, flat)


def guard_ghost(calls: Sequence[MatrixRows], seg: Segments, opts: GramOptions, sums, dtype: torch.dtype,
                flat=None, extra: int = 0, explicit=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cancellation safeguard (module docstring, "Cancellation") on the sums
    (K, Kb, Q, Qb) of a ghost pass (as ``_ghost_slabs`` returns them, Kb and Qb None
    without a bias) whose dot products were in ``dtype``: the weight's and the bias's
    fp64 (S, S) Grams, symmetric, weak segments redone (``gram_ghost`` docstring).

    flat: the layer's flat rows (``_flat_rows``), built here only when a segment is weak.
    extra: fp32 summands the pass adds to each entry beyond the d + p of its dot products
    (the Triton kernel's in-register segment sums, matrix_triton.py): with the docstring's
    model the ghost error grows to sqrt(d + p + extra)·u·sqrt(Q_s Q_t), so τ is scaled by
    sqrt((d + p + extra)/(d + p)) (and the bias's by the same with G·p). explicit: the
    explicit path of the pass's backend (default ``gram_explicit``)."""
    K, Kb, Q, Qb = sums
    c0 = calls[0]
    S, G, d, p = seg.S, c0.G, c0.d, c0.p
    explicit = explicit or gram_explicit
    K = 0.5 * (K + K.T)
    weak = _weak(K, Q, _tau(dtype, c0.dtype, d + p) * math.sqrt((d + p + extra) / (d + p)))
    if weak.numel():
        A, D, ids = flat if flat is not None else _flat_rows(calls, seg, opts)
        F = A.shape[0]
        sel = torch.isin(ids, weak).nonzero().flatten()  # flat rows of weak segments
        if dtype == torch.float64 and _unit(dtype) < _unit(c0.dtype):
            W = weak  # precision="high": the products are fp64 already
        elif dtype != torch.float64 and _fp64_slowdown(c0.device) * sel.numel() * F * (d + p) < d * p * (F + S**2):
            K64 = _ghost_slabs(A, D, ids, S, opts, torch.float64, False, sel)[0]
            K[weak] = K64[weak]
            K[:, weak] = K64[weak].T
            W = weak[_weak(K[weak][:, weak], Q[weak], _tau(torch.float64, c0.dtype, d + p))]
        else:  # no higher precision, or it costs more than the explicit path
            W = None
        if W is None:
            K = explicit(calls, seg, opts)[0]
        elif W.numel():
            Kw = explicit(calls, _sub_segments(seg, W), opts)[0]
            K[W.unsqueeze(1), W] = Kw
        K = 0.5 * (K + K.T)
    if Kb is not None:
        Kb = 0.5 * (Kb + Kb.T)
        weak_b = _weak(Kb, Qb, _tau(dtype, c0.dtype, G * p, ratio=1.0) * math.sqrt((G * p + extra) / (G * p)))
        if weak_b.numel():
            _explicit_bias_rows(calls, seg, Kb, weak_b, opts.precision)
    return K, Kb


def _explicit_bias_rows(
    calls: Sequence[MatrixRows], seg: Segments, Kb: torch.Tensor, which: torch.Tensor, precision: str
) -> None:
    """Rows and columns ``which`` (w,) of the bias Gram Kb (S, S), in place, from the
    explicit segment sums Xb (S, G·p) of the per-row bias gradients: Kb[which] = Xb[which]·Xbᵀ
    (the explicit path's arithmetic; its diagonal a sum of squares)."""
    dev = Kb.device
    rows = calls[0].bias_rows()  # [N, G·p]
    for c in calls[1:]:
        rows = rows + c.bias_rows()
    ids = seg.ids_on(dev)
    if not seg.all_kept:
        kept = seg.kept_on(dev)
        ids, rows = ids[kept], rows[kept]
    Xb = rows.new_zeros((seg.S, rows.shape[1])).index_add_(0, ids, rows)  # [S, G·p]
    if precision == "high":
        Xb = Xb.double()
    R = (Xb[which] @ Xb.T).double()  # [w, S]
    Kb[which] = R
    Kb[:, which] = R.T


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

    def segment_grads(self, calls, seg: Segments, opts: GramOptions):
        """{name: (X (S, numel), None)}: the weight's per-segment gradients from the explicit
        path's tiles (one tile for the layer), the bias's from its per-row gradients."""
        rows = self._rows(calls)
        out = {}
        gw, gb = self.local("weight"), self.local("bias")
        if gw is not None and rows:
            out[gw] = (gram_explicit(rows, seg, opts, keep=True, need_gram=False)[1], None)
        if gb is not None and rows:
            out[gb] = (kept_segment_sum(self._bias_rows(rows), seg), None)
        return out

    def grams(self, calls, seg: Segments, opts: GramOptions, tiles=None):
        rows = self._rows(calls)
        out = {}
        gw, gb = self.local("weight"), self.local("bias")
        if gw is not None and rows:
            force = gw in self.forced
            method = "explicit" if force else choose_method(rows, seg, opts)
            info: dict = {}
            out[gw], X, Kb = gram(rows, seg, opts, method, keep=tiles is not None, force_keep=force,
                                  bias=gb is not None, name=gw, info=info)
            if X is not None:
                tiles[gw] = X
            if Kb is not None:
                out[gb] = Kb
            self.methods[gw] = f"{self.kind}:{method}" + ("[triton]" if info["backend"] == "triton" else "")
        if gb is not None and rows and gb not in out:
            out[gb] = gram_from_row_grads(self._bias_rows(rows), seg, opts.precision, tiles, gb)
            self.methods[gb] = f"{self.kind}:bias"
        return out
