"""Triton kernels for ``project_orthogonal``: the two passes over G.

Pass 1, ``_gram_kernel``: one read of G computes K = G Gᵀ, b = G g and ‖g‖² together.
    grid = (splits over P, row blocks i, column blocks j); a program walks its P range in
    BLOCK_P tiles and accumulates the (i, j) block of K in fp64 registers. Only blocks with
    j >= i run (K is symmetric; the host mirrors the upper triangle). Diagonal programs
    also accumulate b for their rows, program (0, 0) also ‖g‖². Each split writes fp64
    partials; the host sums them (deterministic, no atomics).
    "fast": each tile product is an fp32 ``tl.dot`` (IEEE, never TF32) over BLOCK_P
    entries, summed across tiles in fp64. "high" (or fp64 inputs): tiles are cast to fp64
    and multiplied element-wise and reduced, so K and b are exact fp64 dot products
    (``tl.dot`` has no portable fp64 path in Triton 3.6/3.7).

Pass 2, ``_combine_kernel``: r = r_in - Gᵀc, and in the same read of G the partials of
    G r and ‖r‖² (used by the refinement and by return_info) computed from the *stored*
    r, i.e. measuring what is returned.
    grid = (tiles over P); each program loops over B in BLOCK_B row blocks twice (the
    second time the tile comes from cache).

Offsets are int64 (P·B past 2^31 must not wrap); every load/store is masked.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _gram_kernel(
    G_ptr,  # [B, P] rows with stride stride_gb, unit column stride
    g_ptr,  # [P]
    K_part_ptr,  # [n_split, B, B] fp64
    b_part_ptr,  # [n_split, B] fp64
    gg_part_ptr,  # [n_split] fp64
    B,
    P,
    stride_gb,
    tiles_per_split,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HIGH: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    if pid_j >= pid_i:
        rows_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI]
        rows_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ]
        mask_i = rows_i < B
        mask_j = rows_j < B
        base_i = G_ptr + rows_i.to(tl.int64)[:, None] * stride_gb  # [BI, 1]
        base_j = G_ptr + rows_j.to(tl.int64)[:, None] * stride_gb  # [BJ, 1]
        diag = pid_i == pid_j
        first = (pid_i == 0) & (pid_j == 0)
        acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float64)
        acc_b = tl.zeros([BLOCK_I], dtype=tl.float64)
        acc_gg = tl.zeros([BLOCK_P], dtype=tl.float64)
        p0 = pid_s.to(tl.int64) * tiles_per_split * BLOCK_P
        for t in range(0, tiles_per_split):
            offs_p = p0 + t * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP] int64
            mask_p = offs_p < P
            a = tl.load(base_i + offs_p[None, :], mask=mask_i[:, None] & mask_p[None, :], other=0.0)
            c = tl.load(base_j + offs_p[None, :], mask=mask_j[:, None] & mask_p[None, :], other=0.0)
            if HIGH:
                a64 = a.to(tl.float64)  # [BI, BP]
                c64 = c.to(tl.float64)  # [BJ, BP]
                acc += tl.sum(a64[:, None, :] * c64[None, :, :], axis=2)
            else:
                acc += tl.dot(
                    a.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee"
                ).to(tl.float64)
            if diag:
                gv = tl.load(g_ptr + offs_p, mask=mask_p, other=0.0)  # [BP]
                if HIGH:
                    acc_b += tl.sum(a.to(tl.float64) * gv.to(tl.float64)[None, :], axis=1)
                else:
                    acc_b += tl.sum(a.to(tl.float32) * gv.to(tl.float32)[None, :], axis=1).to(tl.float64)
                if first:
                    g64 = gv.to(tl.float64)
                    acc_gg += g64 * g64
        k_ptrs = K_part_ptr + pid_s.to(tl.int64) * B * B + rows_i.to(tl.int64)[:, None] * B + rows_j[None, :]
        tl.store(k_ptrs, acc, mask=mask_i[:, None] & mask_j[None, :])
        if diag:
            tl.store(b_part_ptr + pid_s.to(tl.int64) * B + rows_i, acc_b, mask=mask_i)
        if first:
            tl.store(gg_part_ptr + pid_s, tl.sum(acc_gg, axis=0))


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32; NaN stays NaN.

    Done by hand because the Triton interpreter truncates fp32->bf16 and mangles
    fp64->bf16; on GPUs the result is bit-identical to a direct conversion.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _combine_kernel(
    G_ptr,  # [B, P] rows with stride stride_gb, unit column stride
    r_in_ptr,  # [P]
    c_ptr,  # [B] in the work dtype
    r_out_ptr,  # [P] output dtype
    Gr_part_ptr,  # [n_tiles, B] fp64
    rr_part_ptr,  # [n_tiles] fp64
    B,
    P,
    stride_gb,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    WANT_GR: tl.constexpr,
    HIGH: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    mask_p = offs_p < P
    if HIGH:
        acc = tl.load(r_in_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float64)
    else:
        acc = tl.load(r_in_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)  # [BB]
        mask_b = rows < B
        tile = tl.load(
            G_ptr + rows.to(tl.int64)[:, None] * stride_gb + offs_p[None, :],
            mask=mask_b[:, None] & mask_p[None, :],
            other=0.0,
        )  # [BB, BP]
        cb = tl.load(c_ptr + rows, mask=mask_b, other=0.0)  # [BB]
        acc -= tl.sum(cb[:, None] * tile.to(cb.dtype), axis=0)
    if OUT_BF16:
        stored = _round_bf16(acc.to(tl.float32))
    else:
        stored = acc.to(r_out_ptr.dtype.element_ty)
    tl.store(r_out_ptr + offs_p, stored.to(r_out_ptr.dtype.element_ty), mask=mask_p)
    if WANT_GR:
        r_st = stored.to(acc.dtype)  # what was returned, in the work dtype
        r_st = tl.where(mask_p, r_st, 0.0)
        r64 = r_st.to(tl.float64)
        tl.store(rr_part_ptr + pid, tl.sum(r64 * r64, axis=0))
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            mask_b = rows < B
            tile = tl.load(
                G_ptr + rows.to(tl.int64)[:, None] * stride_gb + offs_p[None, :],
                mask=mask_b[:, None] & mask_p[None, :],
                other=0.0,
            )
            part = tl.sum(tile.to(r_st.dtype) * r_st[None, :], axis=1)  # [BB]
            tl.store(Gr_part_ptr + pid.to(tl.int64) * B + rows, part.to(tl.float64), mask=mask_b)


# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def gram_config(B: int, high: bool, device: torch.device) -> dict:
    """Block sizes for pass 1. The interpreter prefers few, large programs."""
    blk = min(64, max(16, triton.next_power_of_2(B)))
    if _interpreting():
        return dict(BLOCK_I=blk, BLOCK_J=blk, BLOCK_P=256 if not high else 64)
    if high:  # fp64 element-wise tile products: keep the [BI, BJ, BP] product small
        return dict(BLOCK_I=16, BLOCK_J=16, BLOCK_P=16)
    return dict(BLOCK_I=blk, BLOCK_J=blk, BLOCK_P=64)


def combine_config(B: int, device: torch.device) -> dict:
    if _interpreting():
        return dict(BLOCK_B=min(64, max(16, triton.next_power_of_2(B))), BLOCK_P=1024)
    return dict(BLOCK_B=min(32, max(16, triton.next_power_of_2(B))), BLOCK_P=256)


def _rows_unit_stride(G: torch.Tensor) -> torch.Tensor:
    return G if G.shape[1] <= 1 or G.stride(1) == 1 else G.contiguous()


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def gram_partials(g, G, K_part, b_part, gg_part, high: bool, tiles_per_split: int, cfg: dict):
    """Launch pass 1 into caller-provided fp64 partial buffers (tests poison them).

    g: (P,), G: (B, P) with unit column stride; K_part: (n_split, B, B), b_part:
    (n_split, B), gg_part: (n_split,), n_split = cdiv(cdiv(P, BLOCK_P), tiles_per_split).
    Only the upper triangle of each K_part[s] and the diagonal-block entries are written.
    """
    B, P = G.shape
    n_split = K_part.shape[0]
    nb_i = triton.cdiv(B, cfg["BLOCK_I"])
    nb_j = triton.cdiv(B, cfg["BLOCK_J"])
    _gram_kernel[(n_split, nb_i, nb_j)](
        G, g, K_part, b_part, gg_part, B, P, G.stride(0), tiles_per_split, HIGH=high, **cfg
    )


def _split_plan(P: int, block_p: int, programs_per_split: int, device: torch.device):
    n_tiles = max(1, triton.cdiv(P, block_p))
    target = max(1, (2 * _num_sms(device)) // programs_per_split)
    n_split = min(n_tiles, target)
    tiles_per_split = triton.cdiv(n_tiles, n_split)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def gram(gs, Gs, work: torch.dtype):
    """K (B, B), b (B,), ‖g‖² (), fp64, summed over the pieces (same contract as torch)."""
    high = work == torch.float64
    B = Gs[0].shape[0]
    dev = Gs[0].device
    cfg = gram_config(B, high, dev)
    nb = triton.cdiv(B, cfg["BLOCK_I"])
    K = torch.zeros(B, B, dtype=torch.float64, device=dev)
    b = torch.zeros(B, dtype=torch.float64, device=dev)
    gg = torch.zeros((), dtype=torch.float64, device=dev)
    upper = torch.triu(torch.ones(B, B, dtype=torch.bool, device=dev))
    for g, G in zip(gs, Gs):
        if g.shape[0] == 0:
            continue
        G = _rows_unit_stride(G)
        g = g.contiguous()
        n_split, tps = _split_plan(g.shape[0], cfg["BLOCK_P"], nb * (nb + 1) // 2, dev)
        K_part = torch.empty(n_split, B, B, dtype=torch.float64, device=dev)
        b_part = torch.empty(n_split, B, dtype=torch.float64, device=dev)
        gg_part = torch.empty(n_split, dtype=torch.float64, device=dev)
        gram_partials(g, G, K_part, b_part, gg_part, high, tps, cfg)
        Ks = K_part.sum(0)
        K += torch.where(upper, Ks, Ks.T)
        b += b_part.sum(0)
        gg += gg_part.sum()
    return K, b, gg


def combine_into(r_in, G, c_work, r_out, Gr_part, rr_part, want_Gr: bool, high: bool, cfg: dict):
    """Launch pass 2 into caller-provided buffers: r_out (P,), Gr_part (n_tiles, B), rr_part (n_tiles,)."""
    B, P = G.shape
    n_tiles = triton.cdiv(P, cfg["BLOCK_P"])
    _combine_kernel[(n_tiles,)](
        G, r_in, c_work, r_out, Gr_part, rr_part, B, P, G.stride(0), WANT_GR=want_Gr, HIGH=high,
        OUT_BF16=r_out.dtype == torch.bfloat16, **cfg
    )


def combine(rs, Gs, c: torch.Tensor, work: torch.dtype, out_dtypes, want_Gr: bool):
    """r_i = rs_i - G_iᵀc (stored in out_dtypes) and optionally G r, ‖r‖² (fp64); torch contract."""
    high = work == torch.float64
    B = Gs[0].shape[0]
    dev = Gs[0].device
    cfg = combine_config(B, dev)
    c_work = c.to(work).contiguous()
    Gr = torch.zeros(B, dtype=torch.float64, device=dev) if want_Gr else None
    rr = torch.zeros((), dtype=torch.float64, device=dev) if want_Gr else None
    out = []
    for r_in, G, dt in zip(rs, Gs, out_dtypes):
        P = r_in.shape[0]
        r_out = torch.empty(P, dtype=dt, device=dev)
        if P == 0:
            out.append(r_out)
            continue
        G = _rows_unit_stride(G)
        n_tiles = triton.cdiv(P, cfg["BLOCK_P"])
        Gr_part = torch.empty(n_tiles if want_Gr else 1, B, dtype=torch.float64, device=dev)
        rr_part = torch.empty(n_tiles if want_Gr else 1, dtype=torch.float64, device=dev)
        combine_into(r_in.contiguous(), G, c_work, r_out, Gr_part, rr_part, want_Gr, high, cfg)
        if want_Gr:
            Gr += Gr_part.sum(0)
            rr += rr_part.sum()
        out.append(r_out)
    return out, Gr, rr
