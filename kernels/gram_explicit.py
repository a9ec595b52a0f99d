"""Explicit segment Gram of a matrix layer ("flash-Gram"): K = X P Xᵀ without storing X.

For a weight W (p x d) and the segment gradients (gram_plan.py for A, D, the plan)

    X_s = Σ_{rows r in s} Σ_t D_{r,t}ᵀ A_{r,t}          (p x d), s = 0..S-1
    K[s, s'] = <X_s, P ∘ X_s'> = Σ_{i,j} X_s[i,j] P[i,j] X_s'[i,j]     (P = 1 unless scaled)

The (S, p, d) tensor X is never stored. Work items: every segment is cut into runs of at
most r rows of the plan order (plan.items, r from ``rows_per_item``), so that the forget
segment's 64 rows are not one long program per tile; the Gram of the W items, M, gives
the segments' by bilinearity, K = Pᵀ M P (P the (W x S) one-hot of items to segments,
fp64 on the host). The weight is cut into (BLOCK_P x BLOCK_D) tiles, taken in waves of as
many tiles as the scratch budget holds for all W items (scratch = W · tiles_per_wave ·
BLOCK_P · BLOCK_D fp32, default 32 MiB so that it stays in L2, at least one tile); per
wave two kernels run:

1. ``_segment_tiles_kernel``, grid (tiles of the wave, W): program (tile, w) walks the
   flat rows of item w (gram_plan.py) in BLOCK_F chunks and accumulates
   X_w[tile] += D_chunkᵀ A_chunk, an fp32 ``tl.dot`` with IEEE products (never TF32),
   in fp32 registers (as the torch backend's fp32 GEMM), then stores the tile to the
   scratch (W, tiles_per_wave·BLOCK_P·BLOCK_D). With several calls of one layer the
   later calls add to the scratch (X sums over calls: cross terms between calls are
   part of <g_s, g_t>). Items run longest first. Ignored rows are never read; empty
   segments have no item (their rows and columns of K stay 0).
2. ``_tile_gram_kernel``, grid (k-splits, blocks i, blocks j >= i of BLOCK_S items):
   split-K Gram of the scratch, each BLOCK_K slice an fp32 IEEE ``tl.dot`` (with the
   scale P, gathered at the slice's weight entries, multiplied into the i side) added to
   fp64 registers; each program adds its (BLOCK_S x BLOCK_S) block into its own fp64
   partial slot, carried over waves (no atomics: deterministic). The host sums the
   slots, mirrors the upper block triangle and reduces items to segments once at the end.

Numerics. X_w entries are fp32 sums of n_w·T exact products of fp32 values (fp16/bf16
are converted exactly): |ΔX_w| ≤ γ(n_w·T)·Σ|D||A| (γ(n) = n·u/(1-n·u), u = 2^-24).
Each Gram slice adds γ(BLOCK_K) relative to Σ|X_w||P||X_w'| (+u for the scale's
product); slices, and items into segments, are summed in fp64 (no further growth).
``tests/test_gram_kernels.py`` checks exactly this bound (per item, summed into segments).

Cost: d·p·(N·T + W²/2) multiply-adds (W² up to block rounding); memory: the scratch plus
(n_split, W, W) fp64 partials. Measured on an H200 (Triton 3.6, bench/gpu_gram_bench.py):
the tile kernel runs at ~70 % of the card's fp32 cuBLAS rate (GPT-2's c_fc: 8.4 ms for
1.5e11 multiply-adds); the Gram kernel at 10-25 % (tl.dot's FMA path on small tiles), so
layers where W² rivals N·T (T = 1: the 4096 MLP) are the ghost kernel's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .gram_plan import SegmentPlan, check_flat, check_rows, flat_rows, interpreting, num_sms, row_offsets

DEFAULT_SCRATCH_BYTES = 32 << 20


@triton.jit
def _segment_tiles_kernel(
    A_ptr,  # [N, T, d] strided
    D_ptr,  # [N, T, p] strided
    order_ptr,  # [n_kept] int64
    item_lo_ptr,  # [W] int64: item w owns order[lo:hi]
    item_hi_ptr,  # [W] int64
    X_ptr,  # [W, stride_xs] fp32 scratch; tile k of the wave at k·BLOCK_P·BLOCK_D
    T,
    d,
    p,
    n_dt,
    tile0,
    stride_xs,
    sa_n,
    sa_t,
    sa_d,
    sd_n,
    sd_t,
    sd_p,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    w = tl.program_id(1)
    f_lo = tl.load(item_lo_ptr + w) * T  # [f_lo, f_hi): the item's flat rows (int64)
    f_hi = tl.load(item_hi_ptr + w) * T
    tile = tile0 + pid_tile
    offs_p = (tile // n_dt) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    offs_d = (tile % n_dt) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mask_p = offs_p < p
    mask_d = offs_d < d
    col_a = offs_d.to(tl.int64) * sa_d  # [BD]
    col_d = offs_p.to(tl.int64) * sd_p  # [BP]
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for f0 in range(f_lo, f_hi, BLOCK_F):
        _, row, t, mask_f = flat_rows(order_ptr, f0 + tl.arange(0, BLOCK_F), f_hi, T)  # [BF]
        a_row = row_offsets(row, t, sa_n, sa_t)  # [BF] int64
        d_row = row_offsets(row, t, sd_n, sd_t)
        a = tl.load(A_ptr + a_row[:, None] + col_a[None, :], mask=mask_f[:, None] & mask_d[None, :], other=0.0)
        g = tl.load(D_ptr + d_row[:, None] + col_d[None, :], mask=mask_f[:, None] & mask_p[None, :], other=0.0)
        # [BP, BF] @ [BF, BD]
        acc += tl.dot(tl.trans(g.to(tl.float32)), a.to(tl.float32), input_precision="ieee")
    e = tl.arange(0, BLOCK_P)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]  # [BP, BD]
    x_ptrs = X_ptr + w.to(tl.int64) * stride_xs + pid_tile.to(tl.int64) * (BLOCK_P * BLOCK_D) + e
    if ACC:
        acc += tl.load(x_ptrs)
    tl.store(x_ptrs, acc)


@triton.jit
def _tile_gram_kernel(
    X_ptr,  # [S, stride_xs] fp32 scratch of the wave
    P_ptr,  # [p, d] scale (read only when SCALE)
    K_part_ptr,  # [n_split, S, S] fp64 partials
    S,
    n_k,
    k_per_split,
    stride_xs,
    tile0,
    n_dt,
    p,
    d,
    sp_p,
    sp_d,
    FIRST: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    if pid_j >= pid_i:
        rows_i = pid_i * BLOCK_S + tl.arange(0, BLOCK_S)  # [BS]
        rows_j = pid_j * BLOCK_S + tl.arange(0, BLOCK_S)  # [BS]
        mask_i = rows_i < S
        mask_j = rows_j < S
        base_i = X_ptr + rows_i.to(tl.int64)[:, None] * stride_xs  # [BS, 1]
        base_j = X_ptr + rows_j.to(tl.int64)[:, None] * stride_xs  # [BS, 1]
        acc = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float64)
        k_lo = pid_s.to(tl.int64) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, n_k)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK] int64
            mask_k = offs_k < k_hi
            xi = tl.load(base_i + offs_k[None, :], mask=mask_i[:, None] & mask_k[None, :], other=0.0)  # [BS, BK]
            xj = tl.load(base_j + offs_k[None, :], mask=mask_j[:, None] & mask_k[None, :], other=0.0)  # [BS, BK]
            if SCALE:
                # slice entry k -> weight entry (row, col) of tile tile0 + k // (BP·BD)
                tile = tile0 + offs_k // (BLOCK_P * BLOCK_D)
                e = offs_k % (BLOCK_P * BLOCK_D)
                prow = (tile // n_dt) * BLOCK_P + e // BLOCK_D  # [BK]
                pcol = (tile % n_dt) * BLOCK_D + e % BLOCK_D  # [BK]
                sc = tl.load(P_ptr + prow * sp_p + pcol * sp_d, mask=mask_k & (prow < p) & (pcol < d), other=0.0)
                xi = xi * sc.to(tl.float32)[None, :]
            acc += tl.dot(xi, tl.trans(xj), input_precision="ieee").to(tl.float64)
        k_ptrs = K_part_ptr + pid_s.to(tl.int64) * S * S + rows_i.to(tl.int64)[:, None] * S + rows_j[None, :]
        mask = mask_i[:, None] & mask_j[None, :]
        if not FIRST:
            acc += tl.load(k_ptrs, mask=mask, other=0.0)
        tl.store(k_ptrs, acc, mask=mask)


def explicit_config(S: int, device: torch.device, compiled: bool | None = None) -> dict:
    """Block sizes: BLOCK_P/BLOCK_D (weight tile), BLOCK_F (flat rows per chunk), BLOCK_S
    (scratch rows per Gram block; 0: by the number of items, ``block_s``), BLOCK_K (Gram
    slice); optional ROWS_PER_ITEM (else ``rows_per_item``), num_warps/num_stages (segment
    tiles), num_warps2/num_stages2 (Gram). The interpreter prefers few, large programs
    (``compiled=True`` gives the GPU's sizes anyway, for tests)."""
    if interpreting() and not compiled:
        return dict(BLOCK_P=64, BLOCK_D=64, BLOCK_F=64, BLOCK_S=64, BLOCK_K=512)
    return dict(BLOCK_P=64, BLOCK_D=64, BLOCK_F=32, BLOCK_S=0, BLOCK_K=64)


def scratch_tiles(S: int, n_tiles: int, cfg: dict, scratch_bytes: int) -> int:
    """Tiles per wave: as many as ``scratch_bytes`` holds for all S rows (items), at least one."""
    per_tile = max(1, S) * cfg["BLOCK_P"] * cfg["BLOCK_D"] * 4
    return max(1, min(n_tiles, scratch_bytes // per_tile))


def _k_split(S: int, n_k: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(n_split, k_per_split): about two programs per SM over the upper block triangle."""
    nb = triton.cdiv(S, cfg["BLOCK_S"])
    slices = max(1, triton.cdiv(n_k, cfg["BLOCK_K"]))
    n_split = max(1, min(slices, (2 * num_sms(device)) // (nb * (nb + 1) // 2)))
    per = triton.cdiv(slices, n_split) * cfg["BLOCK_K"]
    return triton.cdiv(n_k, per), per


def flash_gram(
    calls: Sequence[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor],
    plan: SegmentPlan,
    *,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
    config: dict | None = None,
) -> torch.Tensor:
    """fp64 (S, S) segment Gram K[s, s'] = <X_s, scale ∘ X_s'> of one weight (module docstring).

    calls: (A, D) or a sequence of them, one per call of the layer (all with the plan's N
        rows; T may differ between calls): A (N, T, d), D (N, T, p), fp32/fp16/bf16, any
        strides. X_s sums over the calls.
    plan: gram_plan.segment_plan(ids, S) of the step.
    scale: optional (p, d) float tensor, the diagonal preconditioner P of G·P·Gᵀ (one per
        weight entry; read as fp32).
    out: optional fp64 (S, S) tensor; the Gram is added into it (per-layer sums of a
        global Gram) and returned.
    scratch_bytes: budget of the segment-tile scratch (at least one tile for all S).
    config: block sizes (explicit_config) to override.
    Never writes A, D or scale. Raises ValueError on shapes/dtypes/devices that do not
    match (gram_plan.check_rows) and for S > 65535 (grid limit).
    """
    if isinstance(calls, tuple) and len(calls) == 2 and isinstance(calls[0], torch.Tensor):
        calls = [calls]
    calls = list(calls)
    if not calls:
        raise ValueError("flash_gram needs at least one (A, D) call")
    for i, (A, D) in enumerate(calls):
        check_rows(f"A of call {i}", A, f"D of call {i}", D, plan)
    d, p = calls[0][0].shape[2], calls[0][1].shape[2]
    for i, (A, D) in enumerate(calls):
        if A.shape[2] != d or D.shape[2] != p:
            raise ValueError(f"call {i} has (d, p) = ({A.shape[2]}, {D.shape[2]}), call 0 has ({d}, {p})")
    S, dev = plan.S, plan.device
    if S > 65535:
        raise ValueError(f"flash_gram supports up to 65535 segments (grid axis), got S={S}; "
                         "use the torch backend")
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (p, d):
            raise ValueError(f"scale must be a ({p}, {d}) tensor (one entry per weight entry), "
                             f"got shape {tuple(getattr(scale, 'shape', ()))}")
        if not scale.dtype.is_floating_point or scale.device != dev:
            raise ValueError(f"scale must be a float tensor on {dev}, got {scale.dtype} on {scale.device}")
    if out is not None and (out.shape != (S, S) or out.dtype != torch.float64 or out.device != dev):
        raise ValueError(f"out must be an fp64 ({S}, {S}) tensor on {dev}")
    K = torch.zeros((S, S), dtype=torch.float64, device=dev) if out is None else out
    if S == 0 or plan.n_kept == 0 or d == 0 or p == 0:
        return K
    cfg = dict(explicit_config(S, dev), **(config or {}))
    for A, _ in calls:
        check_flat(plan, A.shape[1], "flash_gram")
    r = cfg.get("ROWS_PER_ITEM") or rows_per_item(plan, calls, cfg, dev)
    lo, hi, item_seg = plan.items(r)
    W = lo.numel()
    cfg["BLOCK_S"] = cfg["BLOCK_S"] or block_s(W)
    n_tiles = triton.cdiv(p, cfg["BLOCK_P"]) * triton.cdiv(d, cfg["BLOCK_D"])
    per_wave = scratch_tiles(W, n_tiles, cfg, scratch_bytes)
    X = torch.empty((W, per_wave * cfg["BLOCK_P"] * cfg["BLOCK_D"]), dtype=torch.float32, device=dev)
    n_split, _ = _k_split(W, X.shape[1], cfg, dev)
    part = torch.empty((n_split, W, W), dtype=torch.float64, device=dev)
    flash_gram_partials(calls, plan, (lo, hi), X, part, scale, cfg)
    M = add_upper_blocks(torch.zeros((W, W), dtype=torch.float64, device=dev), part.sum(0), cfg["BLOCK_S"])
    return K.add_(items_to_segments(M, item_seg, S))


def items_to_segments(M: torch.Tensor, item_seg: torch.Tensor, S: int) -> torch.Tensor:
    """(S, S) Pᵀ M P for the (W x S) one-hot P of items to segments: the Gram of the
    segments from that of their items (bilinearity; 0/1 products exact, sums in fp64;
    a dense product, deterministic where index_add_ on CUDA is not)."""
    P = torch.zeros((M.shape[0], S), dtype=torch.float64, device=M.device)
    P[torch.arange(M.shape[0], device=M.device), item_seg] = 1.0
    return P.T @ M @ P


def block_s(W: int) -> int:
    """Rows per block of the Gram kernel for W scratch rows. 64 beyond 32 rows although it
    rounds W = 96 up to 128: on an H200 (Triton 3.6) 64-blocks ran the 4096 x 4096 layer's
    Gram in 32 ms against 44 ms for 32-blocks (6 pairs of 32² against 3 pairs of 64²:
    fewer, larger tl.dot tiles win on the FMA path)."""
    return 16 if W <= 16 else (32 if W <= 32 else 64)


def rows_per_item(plan: SegmentPlan, calls, cfg: dict, device: torch.device) -> int:
    """Rows per work item of the segment-tile kernel (plan.items) for these calls.

    One segment of many rows (the forget batch) would be one long program per tile, the
    last to finish; cut into items, its flat rows spread over programs. Items are free up
    to the Gram kernel's block rounding (W <= S rounded up to a block: the (W x W) Gram of
    the scratch has as many blocks as the (S x S) one); more are taken only while the
    weight's tiles alone give fewer than ~4 programs per SM, and while W² stays below the
    flat rows n_kept·T (the Gram's W²/2·d·p below the tiles' n_kept·T·d·p)."""
    d, p = calls[0][0].shape[2], calls[0][1].shape[2]
    T = max(A.shape[1] for A, _ in calls)
    n_tiles = triton.cdiv(p, cfg["BLOCK_P"]) * triton.cdiv(d, cfg["BLOCK_D"])
    bs = block_s(plan.S)
    S_pad = -(-plan.S // bs) * bs
    want = -(-4 * num_sms(device) // max(1, n_tiles))
    cap = max(S_pad, min(want, int((plan.n_kept * T) ** 0.5)))
    r = 1
    while plan.n_items(r) > cap and r < plan.max_rows:
        r *= 2
    return r


def flash_gram_partials(calls, plan: SegmentPlan, items, X: torch.Tensor, part: torch.Tensor, scale, cfg: dict) -> None:
    """Run every wave into caller-provided buffers (tests poison them). items: (lo, hi)
    (W,) int64 row ranges of the plan order (plan.items); X: (W, tiles_per_wave·BLOCK_P·
    BLOCK_D) fp32 scratch (its width sets the wave); part: (n_split, W, W) fp64 partials of
    the items' Gram M, of which the upper block triangle (blocks of BLOCK_S, diagonal
    blocks included) is written. Inputs as ``flash_gram``, already checked."""
    lo, hi = items
    W = lo.numel()
    d, p = calls[0][0].shape[2], calls[0][1].shape[2]
    bp, bd = cfg["BLOCK_P"], cfg["BLOCK_D"]
    n_dt = triton.cdiv(d, bd)
    n_tiles = triton.cdiv(p, bp) * n_dt
    stride_xs = X.shape[1]
    per_wave = stride_xs // (bp * bd)
    n_split = part.shape[0]
    k_per = triton.cdiv(triton.cdiv(stride_xs, cfg["BLOCK_K"]), n_split) * cfg["BLOCK_K"]
    nb = triton.cdiv(W, cfg["BLOCK_S"])
    P = scale if scale is not None else X  # a dummy pointer when unscaled
    sp = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
    p1 = dict(BLOCK_P=bp, BLOCK_D=bd, BLOCK_F=cfg["BLOCK_F"])
    p2 = dict(BLOCK_S=cfg["BLOCK_S"], BLOCK_K=cfg["BLOCK_K"], BLOCK_P=bp, BLOCK_D=bd)
    w1 = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    w2 = {k[:-1]: cfg[k] for k in ("num_warps2", "num_stages2") if k in cfg}
    for w, tile0 in enumerate(range(0, n_tiles, per_wave)):
        nt = min(per_wave, n_tiles - tile0)
        for ci, (A, D) in enumerate(calls):
            _segment_tiles_kernel[(nt, W)](
                A, D, plan.order, lo, hi, X, A.shape[1], d, p, n_dt, tile0, stride_xs,
                A.stride(0), A.stride(1), A.stride(2), D.stride(0), D.stride(1), D.stride(2), ACC=ci > 0, **p1, **w1,
            )
        _tile_gram_kernel[(n_split, nb, nb)](
            X, P, part, W, nt * bp * bd, k_per, stride_xs, tile0, n_dt, p, d, sp[0], sp[1],
            FIRST=w == 0, SCALE=scale is not None, **p2, **w2,
        )


def add_upper_blocks(K: torch.Tensor, Ks: torch.Tensor, block: int) -> torch.Tensor:
    """K += the symmetric matrix whose upper block triangle (blocks of ``block``, diagonal
    blocks included) is Ks's; the lower blocks of Ks are never read (they were not written)."""
    S = Ks.shape[0]
    b = torch.arange(S, device=Ks.device) // block
    upper = b[:, None] <= b[None, :]
    full = torch.where(upper, Ks, Ks.T)
    return K.add_(0.5 * (full + full.T))
