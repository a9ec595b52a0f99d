"""Ghost segment Gram of a matrix layer: K = Pᵀ [(A Aᵀ) ∘ (D Dᵀ)] P, never forming X_s.

With flat rows f (a kept row at one position; gram_plan.py) and P the (F x S) one-hot map
of flat rows to segments (matrix.py has the derivation):

    K[s, s'] = Σ_{f in s, q in s'} (A_f · A_q)(D_f · D_q)           (weight)
    Kb[s, s'] = Σ_{f in s, q in s'} D_f · D_q                         (bias, optional)

The (F x F) matrices are never stored. ``_ghost_kernel``, grid (q-splits, segment blocks
i, segment blocks j): program (z, i, j) owns the output block K[I, J] of BLOCK_S
segments each; segments are consecutive in the plan, so I's flat rows are one range
[starts[I0]·T, starts[I1]·T) of the plan order, and likewise J's. It walks I's flat rows
in BLOCK_F chunks against J's chunks z, z + n_split, ... (the split spreads the big
forget x forget block over programs). Per pair of chunks:

    Ma = A_f A_qᵀ, Md = D_f D_qᵀ        fp32 IEEE tl.dot over d (resp. p) in BLOCK_K slices
    M  = fp32(fp64(Ma) · fp64(Md))      one rounding of an exact product
    K[I, J] += fp64(E_Iᵀ M E_J)          E_I (BLOCK_F x BLOCK_S) one-hot of the chunk's
                                        segments relative to I0, a 0/1 fp32 tl.dot (the
                                        sum over the pair's ≤ BLOCK_F² cells is fp32)

Each program stores its fp64 block into its own partial slot (deterministic, no
atomics); the host sums the slots. One call: only blocks j >= i run (K symmetric; the
host mirrors and symmetrizes, as the torch path). Two calls c ≠ c' of one layer
(``calls`` of length > 1): every block of the cross Gram K_cc' runs and the host adds
K_cc' + K_cc'ᵀ (the cross terms of X_s summed over calls).

Numerics: |ΔK[s,s']| ≤ (γ(d) + γ(p) + γ(2·BLOCK_F + 1) + O(u²)) · Σ_{f,q} |A_f||A_q|·|D_f||D_q|
(γ(n) = n·u/(1-n·u), u = 2^-24, |·| elementwise then dotted: the sums of absolute
products). The Gram's diagonal entries are sums of squares' products and do not cancel;
off-diagonal entries can cancel, and this bound, not their size, is what they are good
to. No scale P: the ghost form cannot weight per weight entry (use flash_gram).

Cost: Σ_blocks F_I·F_J·(d + p) multiply-adds (F²(d+p)/2 for one call); memory: the
(n_split, S, S) fp64 partials.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .gram_plan import SegmentPlan, check_flat, check_rows, flat_rows, interpreting, num_sms, row_offsets


@triton.jit
def _gram_of_rows(X1_ptr, X2_ptr, off1, off2, m1, m2, n, s1, s2, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BF, BF] fp32: rows off1 of X1 dotted with rows off2 of X2 over n features (strides s1, s2)."""
    acc = tl.zeros([BLOCK_F, BLOCK_F], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # [BK]
        mk = k < n
        x1 = tl.load(X1_ptr + off1[:, None] + k[None, :] * s1, mask=m1[:, None] & mk[None, :], other=0.0)
        x2 = tl.load(X2_ptr + off2[:, None] + k[None, :] * s2, mask=m2[:, None] & mk[None, :], other=0.0)
        acc += tl.dot(x1.to(tl.float32), tl.trans(x2.to(tl.float32)), input_precision="ieee")
    return acc


@triton.jit
def _ghost_kernel(
    A1_ptr,  # [N, T1, d] rows side (call c)
    D1_ptr,  # [N, T1, p]
    A2_ptr,  # [N, T2, d] columns side (call c')
    D2_ptr,  # [N, T2, p]
    order_ptr,  # [n_kept] int64
    seg_ptr,  # [n_kept] int64 segment of each order entry
    starts_ptr,  # [S+1] int64
    K_part_ptr,  # [n_split, S, S] fp64
    Kb_part_ptr,  # [n_split, S, S] fp64 (BIAS)
    S,
    T1,
    T2,
    d,
    p,
    n_split,
    sa1_n,
    sa1_t,
    sa1_d,
    sd1_n,
    sd1_t,
    sd1_p,
    sa2_n,
    sa2_t,
    sa2_d,
    sd2_n,
    sd2_t,
    sd2_p,
    SYM: tl.constexpr,
    BIAS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_z = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    run = True
    if SYM:
        run = pid_j >= pid_i
    if run:
        i0 = pid_i * BLOCK_S
        j0 = pid_j * BLOCK_S
        fi_lo = tl.load(starts_ptr + i0) * T1  # block I's flat rows [fi_lo, fi_hi)
        fi_hi = tl.load(starts_ptr + tl.minimum(i0 + BLOCK_S, S)) * T1
        fj_lo = tl.load(starts_ptr + j0) * T2
        fj_hi = tl.load(starts_ptr + tl.minimum(j0 + BLOCK_S, S)) * T2
        cols = tl.arange(0, BLOCK_S)  # [BS]
        acc = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float64)
        accb = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float64)
        for fi in range(fi_lo, fi_hi, BLOCK_F):
            pos, row, t, mf = flat_rows(order_ptr, fi + tl.arange(0, BLOCK_F), fi_hi, T1)
            oa1 = row_offsets(row, t, sa1_n, sa1_t)  # [BF] int64
            od1 = row_offsets(row, t, sd1_n, sd1_t)
            si = tl.load(seg_ptr + pos, mask=mf, other=-1) - i0  # [BF] segment within block I
            ei = ((si[:, None] == cols[None, :]) & mf[:, None]).to(tl.float32)  # [BF, BS]
            for qj in range(fj_lo + pid_z * BLOCK_F, fj_hi, n_split * BLOCK_F):
                pos2, row2, t2, mq = flat_rows(order_ptr, qj + tl.arange(0, BLOCK_F), fj_hi, T2)
                oa2 = row_offsets(row2, t2, sa2_n, sa2_t)
                od2 = row_offsets(row2, t2, sd2_n, sd2_t)
                sj = tl.load(seg_ptr + pos2, mask=mq, other=-1) - j0
                ej = ((sj[:, None] == cols[None, :]) & mq[:, None]).to(tl.float32)  # [BF, BS]
                ma = _gram_of_rows(A1_ptr, A2_ptr, oa1, oa2, mf, mq, d, sa1_d, sa2_d, BLOCK_F, BLOCK_K)
                md = _gram_of_rows(D1_ptr, D2_ptr, od1, od2, mf, mq, p, sd1_p, sd2_p, BLOCK_F, BLOCK_K)
                m = (ma.to(tl.float64) * md.to(tl.float64)).to(tl.float32)  # [BF, BF]
                r = tl.dot(tl.trans(ei), m, input_precision="ieee")  # [BS, BF]
                acc += tl.dot(r, ej, input_precision="ieee").to(tl.float64)
                if BIAS:
                    rb = tl.dot(tl.trans(ei), md, input_precision="ieee")
                    accb += tl.dot(rb, ej, input_precision="ieee").to(tl.float64)
        rows = i0 + cols
        cj = j0 + cols
        mask = (rows < S)[:, None] & (cj < S)[None, :]
        offs = pid_z.to(tl.int64) * S * S + rows.to(tl.int64)[:, None] * S + cj[None, :]
        tl.store(K_part_ptr + offs, acc, mask=mask)
        if BIAS:
            tl.store(Kb_part_ptr + offs, accb, mask=mask)


def ghost_config(S: int, device: torch.device, compiled: bool | None = None) -> dict:
    """BLOCK_S segments per output block, BLOCK_F flat rows per chunk, BLOCK_K features per
    dot slice (tl.dot needs every dimension >= 16); ``compiled=True``: the GPU's sizes
    even under the interpreter (tests)."""
    if interpreting() and not compiled:
        return dict(BLOCK_S=min(64, max(16, triton.next_power_of_2(S))), BLOCK_F=64, BLOCK_K=128)
    return dict(BLOCK_S=16 if S <= 16 else 32, BLOCK_F=32, BLOCK_K=128)


def _n_split(plan: SegmentPlan, T: int, pairs: int, cfg: dict, device) -> int:
    """Splits of the column chunks: about two programs per SM, no more than the chunks of
    the biggest segment block (more would only add idle programs)."""
    chunks = max(1, triton.cdiv(min(plan.n_kept, plan.max_rows * cfg["BLOCK_S"]) * T, cfg["BLOCK_F"]))
    return max(1, min(chunks, triton.cdiv(2 * num_sms(device), pairs)))


def ghost_gram(
    calls: Sequence[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor],
    plan: SegmentPlan,
    *,
    bias: bool = False,
    out: torch.Tensor | None = None,
    config: dict | None = None,
):
    """fp64 (S, S) ghost segment Gram of one weight (module docstring).

    calls: (A, D) or a sequence of them, one per call of the layer, A (N, T, d), D (N, T, p)
        fp32/fp16/bf16, any strides (T may differ between calls); segment gradients sum
        over calls.
    plan: gram_plan.segment_plan(ids, S) of the step.
    bias: also return the bias's Gram Kb (a bias row's gradient is Σ_t D_{r,t}).
    out: optional fp64 (S, S) tensor the weight's Gram is added into (and returned).
    config: block sizes (ghost_config) to override.
    Returns K, or (K, Kb) with ``bias``. Raises ValueError on mismatched inputs
    (gram_plan.check_rows).
    """
    if isinstance(calls, tuple) and len(calls) == 2 and isinstance(calls[0], torch.Tensor):
        calls = [calls]
    calls = list(calls)
    if not calls:
        raise ValueError("ghost_gram needs at least one (A, D) call")
    for i, (A, D) in enumerate(calls):
        check_rows(f"A of call {i}", A, f"D of call {i}", D, plan)
    d, p = calls[0][0].shape[2], calls[0][1].shape[2]
    for i, (A, D) in enumerate(calls):
        if A.shape[2] != d or D.shape[2] != p:
            raise ValueError(f"call {i} has (d, p) = ({A.shape[2]}, {D.shape[2]}), call 0 has ({d}, {p})")
        check_flat(plan, A.shape[1], "ghost_gram")
    S, dev = plan.S, plan.device
    if out is not None and (out.shape != (S, S) or out.dtype != torch.float64 or out.device != dev):
        raise ValueError(f"out must be an fp64 ({S}, {S}) tensor on {dev}")
    K = torch.zeros((S, S), dtype=torch.float64, device=dev) if out is None else out
    Kb = torch.zeros((S, S), dtype=torch.float64, device=dev) if bias else None
    if S == 0 or plan.n_kept == 0:
        return (K, Kb) if bias else K
    cfg = dict(ghost_config(S, dev), **(config or {}))
    bs = cfg["BLOCK_S"]
    nb = triton.cdiv(S, bs)
    blk = torch.arange(S, device=dev) // bs
    upper = blk[:, None] <= blk[None, :]
    for c1 in range(len(calls)):
        for c2 in range(c1, len(calls)):
            (A1, D1), (A2, D2) = calls[c1], calls[c2]
            sym = c1 == c2
            pairs = nb * (nb + 1) // 2 if sym else nb * nb
            n_split = _n_split(plan, A2.shape[1], pairs, cfg, dev)
            part = torch.empty((n_split, S, S), dtype=torch.float64, device=dev)
            part_b = torch.empty((n_split, S, S), dtype=torch.float64, device=dev) if bias else part
            ghost_partials(A1, D1, A2, D2, plan, part, part_b, sym, bias, cfg)
            for acc, pt in ((K, part),) + (((Kb, part_b),) if bias else ()):
                Ks = pt.sum(0)
                if sym:
                    full = torch.where(upper, Ks, Ks.T)
                    acc.add_(0.5 * (full + full.T))
                else:
                    acc.add_(Ks + Ks.T)
    return (K, Kb) if bias else K


def ghost_partials(A1, D1, A2, D2, plan: SegmentPlan, part, part_b, sym: bool, bias: bool, cfg: dict) -> None:
    """Launch the ghost kernel into caller-provided fp64 partials (n_split, S, S) (tests
    poison them). With ``sym`` only blocks j >= i are written, else all blocks; part_b is
    written only with ``bias``."""
    S = plan.S
    nb = triton.cdiv(S, cfg["BLOCK_S"])
    n_split = part.shape[0]
    d, p = A1.shape[2], D1.shape[2]
    _ghost_kernel[(n_split, nb, nb)](
        A1, D1, A2, D2, plan.order, plan.seg_sorted, plan.starts, part, part_b, S, A1.shape[1], A2.shape[1],
        d, p, n_split, *A1.stride(), *D1.stride(), *A2.stride(), *D2.stride(), SYM=sym, BIAS=bias, **cfg,
    )
