"""Weighted combination of a matrix layer's segment gradients: one GEMM over the rows.

    out = Σ_s w_s X_s = Σ_{kept rows r} w_{seg(r)} Σ_t D_{r,t}ᵀ A_{r,t}          (p x d)

(gram_plan.py for A, D and the plan.) ``_combine_kernel``, grid (p tiles, d tiles,
k-splits): program (i, j, z) walks split z of the kept flat rows (plan order: ignored
rows are never read) in BLOCK_F chunks, loads the D chunk (BLOCK_F x BLOCK_P), multiplies
each flat row by its segment's weight in registers (the row weights are folded into the
load: no scaled copy of D), and accumulates Dwᵀ A in fp32 with IEEE ``tl.dot``. Splits
write fp32 partials (n_split, p, d) that the host sums (deterministic); one split
writes the output directly. Splits are used when the weight has too few tiles to fill
the GPU (GPT-2's 768 x 768, a conv's 64 x 576), bounded by a partials budget.

The torch alternative is one cuBLAS GEMM on a scaled copy of D,
``(D * w_row).reshape(-1, p).T @ A.reshape(-1, d)`` (``combine_torch``). Measured on an
H200 (Triton 3.6, fp32, B = 64 + 64 rows; bench/gpu_gram_bench.py): cuBLAS is faster on
every layer of the benchmark, 1.04-1.3x on ViT-S's linears with 128 x 128 tiles and
8 warps, 1.7-3x with the default 64 x 64 tiles on GPT-2's (c_fc: 6.4 ms against 11.0 ms);
the scaled matmul is the one to use for speed. This kernel's advantage is memory: no
scaled copy of D (GPT-2's c_fc: 0.8 GB at N·T = 65536).

Numerics: each entry is an fp32 sum of n_kept·T products fl(w·D)·A (one rounding each):
|Δout| ≤ γ(n_kept·T + n_split + 1)·Σ|w||D||A| (γ(n) = n·u/(1-n·u), u = 2^-24).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .gram_plan import SegmentPlan, check_flat, check_rows, flat_rows, interpreting, num_sms, row_offsets

PARTIALS_BYTES = 64 << 20


@triton.jit
def _combine_kernel(
    A_ptr,  # [N, T, d] strided
    D_ptr,  # [N, T, p] strided
    order_ptr,  # [n_kept] int64
    seg_ptr,  # [n_kept] int64
    w_ptr,  # [S] fp32 segment weights
    out_ptr,  # [n_split, p, d] fp32
    n_flat,
    f_per_split,
    T,
    d,
    p,
    sa_n,
    sa_t,
    sa_d,
    sd_n,
    sd_t,
    sd_p,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_z = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mask_p = offs_p < p
    mask_d = offs_d < d
    col_a = offs_d.to(tl.int64) * sa_d
    col_d = offs_p.to(tl.int64) * sd_p
    f_lo = pid_z.to(tl.int64) * f_per_split
    f_hi = tl.minimum(f_lo + f_per_split, n_flat)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for f0 in range(f_lo, f_hi, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)  # [BF]
        pos, row, t, mask_f = flat_rows(order_ptr, f, f_hi, T)
        a_row = row_offsets(row, t, sa_n, sa_t)  # [BF] int64
        d_row = row_offsets(row, t, sd_n, sd_t)
        seg = tl.load(seg_ptr + pos, mask=mask_f, other=0)  # [BF]
        w = tl.load(w_ptr + seg, mask=mask_f, other=0.0)  # [BF]
        a = tl.load(A_ptr + a_row[:, None] + col_a[None, :], mask=mask_f[:, None] & mask_d[None, :], other=0.0)
        g = tl.load(D_ptr + d_row[:, None] + col_d[None, :], mask=mask_f[:, None] & mask_p[None, :], other=0.0)
        gw = g.to(tl.float32) * w[:, None]  # [BF, BP]
        acc += tl.dot(tl.trans(gw), a.to(tl.float32), input_precision="ieee")  # [BP, BD]
    o = out_ptr + pid_z.to(tl.int64) * p * d + offs_p.to(tl.int64)[:, None] * d + offs_d[None, :]
    tl.store(o, acc, mask=mask_p[:, None] & mask_d[None, :])


def combine_config(device: torch.device, compiled: bool | None = None) -> dict:
    """BLOCK_P x BLOCK_D output tile, BLOCK_F flat rows per chunk (``compiled=True``: the
    GPU's sizes even under the interpreter, for tests)."""
    if interpreting() and not compiled:
        return dict(BLOCK_P=64, BLOCK_D=64, BLOCK_F=64)
    return dict(BLOCK_P=64, BLOCK_D=64, BLOCK_F=32)


def combine_splits(n_flat: int, p: int, d: int, cfg: dict, device: torch.device,
                   partials_bytes: int = PARTIALS_BYTES) -> tuple[int, int]:
    """(n_split, flat rows per split): about two programs per SM when the weight's tiles
    are fewer, each split at least 4 chunks, partials within ``partials_bytes``."""
    tiles = triton.cdiv(p, cfg["BLOCK_P"]) * triton.cdiv(d, cfg["BLOCK_D"])
    chunks = max(1, triton.cdiv(n_flat, cfg["BLOCK_F"]))
    want = max(1, (2 * num_sms(device)) // tiles)
    n_split = max(1, min(want, chunks // 4, partials_bytes // max(1, 4 * p * d)))
    per = triton.cdiv(chunks, n_split) * cfg["BLOCK_F"]
    return triton.cdiv(n_flat, per) if n_flat else 1, per


def combine(
    calls: Sequence[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor],
    plan: SegmentPlan,
    weights: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """fp32 (p, d) Σ_s weights[s]·X_s of one weight over its calls (module docstring).

    calls: (A, D) or a sequence of them (one per call of the layer), A (N, T, d),
        D (N, T, p), fp32/fp16/bf16, any strides.
    plan: gram_plan.segment_plan(ids, S); weights: (S,) float (read as fp32).
    out: optional fp32 (p, d) tensor the result is added into (and returned).
    Raises ValueError on mismatched inputs.
    """
    if isinstance(calls, tuple) and len(calls) == 2 and isinstance(calls[0], torch.Tensor):
        calls = [calls]
    calls = list(calls)
    if not calls:
        raise ValueError("combine needs at least one (A, D) call")
    for i, (A, D) in enumerate(calls):
        check_rows(f"A of call {i}", A, f"D of call {i}", D, plan)
    d, p = calls[0][0].shape[2], calls[0][1].shape[2]
    for i, (A, D) in enumerate(calls):
        if A.shape[2] != d or D.shape[2] != p:
            raise ValueError(f"call {i} has (d, p) = ({A.shape[2]}, {D.shape[2]}), call 0 has ({d}, {p})")
    dev = plan.device
    if not isinstance(weights, torch.Tensor) or weights.shape != (plan.S,) or not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be a float ({plan.S},) tensor (one per segment), got "
                         f"{tuple(getattr(weights, 'shape', ()))}")
    if out is not None and (out.shape != (p, d) or out.dtype != torch.float32 or out.device != dev):
        raise ValueError(f"out must be an fp32 ({p}, {d}) tensor on {dev}")
    res = torch.zeros((p, d), dtype=torch.float32, device=dev) if out is None else out
    if plan.n_kept == 0 or p == 0 or d == 0:
        return res
    w = weights.to(device=dev, dtype=torch.float32).contiguous()
    cfg = dict(combine_config(dev), **(config or {}))
    for A, D in calls:
        check_flat(plan, A.shape[1], "combine")
    for A, D in calls:
        n_flat = plan.n_kept * A.shape[1]
        if n_flat == 0:
            continue
        n_split, per = combine_splits(n_flat, p, d, cfg, dev)
        part = torch.empty((n_split, p, d), dtype=torch.float32, device=dev)
        combine_partials(A, D, plan, w, part, per, cfg)
        res.add_(part[0] if n_split == 1 else part.sum(0))
    return res


def combine_partials(A, D, plan: SegmentPlan, w: torch.Tensor, part: torch.Tensor, f_per_split: int, cfg: dict) -> None:
    """Launch the combine kernel into caller-provided fp32 partials (n_split, p, d)."""
    n_split, p, d = part.shape
    grid = (triton.cdiv(p, cfg["BLOCK_P"]), triton.cdiv(d, cfg["BLOCK_D"]), n_split)
    _combine_kernel[grid](
        A, D, plan.order, plan.seg_sorted, w, part, plan.n_kept * A.shape[1], f_per_split, A.shape[1], d, p,
        *A.stride(), *D.stride(), **cfg,
    )


def combine_torch(calls, plan: SegmentPlan, weights: torch.Tensor) -> torch.Tensor:
    """The same sum as one torch GEMM per call on a row-scaled copy of D (the comparison
    point for the kernel; fp32 (p, d)). Reads only the kept rows."""
    if isinstance(calls, tuple) and len(calls) == 2 and isinstance(calls[0], torch.Tensor):
        calls = [calls]
    w_kept = weights.to(device=plan.device, dtype=torch.float32)[plan.seg_sorted]  # [n_kept]
    if plan.n_kept == plan.N:  # every row kept: the rows as they are, weights put in row order
        w_row = torch.empty_like(w_kept).index_copy_(0, plan.order, w_kept)
    res = None
    for A, D in calls:
        if plan.n_kept == plan.N:
            Ak, Dk, wk = A, D, w_row
        else:
            Ak, Dk, wk = A.index_select(0, plan.order), D.index_select(0, plan.order), w_kept
        Dw = (Dk.float() * wk[:, None, None]).reshape(-1, D.shape[2])  # [n·T, p]
        r = Dw.T @ Ak.float().reshape(-1, A.shape[2])  # [p, d]
        res = r if res is None else res + r
    return res
