"""The Gram engine's Triton launchers on their own (kernels/gram_*.py).

Every result is compared with an fp64 per-segment reference (X_s = Σ_{r in s} Σ_t D_rtᵀ A_rt
by einsum in fp64, K = X P Xᵀ) on fresh random inputs, within a bound derived from the
kernels' numerics (each module docstring): fp32 sums of n terms err by at most
γ(n)·Σ|terms|, γ(n) = n·u/(1-n·u), u = 2^-24, the bound's absolute sums computed in fp64
from |A|, |D|. Such a bound cannot be met by a missing or doubled row (errors of the
order of the terms themselves). Outputs and scratch buffers are poisoned with NaN where a
test calls a launch function directly, so an unwritten element fails.

Runs on the CPU through the Triton interpreter (conftest sets TRITON_INTERPRET=1; the
interpreter computes bf16 tl.dot wrongly, so bf16 runs only compiled) and, with
TRITON_INTERPRET=0 on a CUDA machine, compiled on the GPU (default block sizes there).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from orthograd_fast.kernels import gram_combine as gc
from orthograd_fast.kernels import gram_explicit as ge
from orthograd_fast.kernels import gram_ghost as gg
from orthograd_fast.kernels import gram_plan as gp

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
U = 2.0**-24  # fp32 unit roundoff
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


# ----------------------------------------------------------------------------- references
def make_ids(N: int, S: int, gen, ignored: int = 0, empty: tuple = ()) -> torch.Tensor:
    """(N,) ids in [0, S) avoiding the segments ``empty``, ``ignored`` rows set to -1."""
    allowed = torch.tensor([s for s in range(S) if s not in empty])
    ids = allowed[torch.randint(len(allowed), (N,), generator=gen)]
    if ignored:
        ids[torch.randperm(N, generator=gen)[:ignored]] = -1
    return ids


def onehot(ids: torch.Tensor, S: int) -> torch.Tensor:
    """(N, S) fp64 one-hot of the kept rows (ignored rows: zero rows)."""
    P = torch.zeros(ids.numel(), S, dtype=torch.float64)
    kept = ids >= 0
    P[kept.nonzero().flatten(), ids[kept]] = 1.0
    return P


def seg_grads(calls, ids, S):
    """fp64 X (S, p, d) and Xabs = Σ|D|ᵀ|A| per segment, summed over calls."""
    P = onehot(ids, S)
    X = Xa = 0
    for A, D in calls:
        A, D = A.cpu().double(), D.cpu().double()
        X = X + torch.einsum("ns,ntp,ntd->spd", P, D, A)
        Xa = Xa + torch.einsum("ns,ntp,ntd->spd", P, D.abs(), A.abs())
    return X, Xa


def explicit_ref(calls, ids, S, block_k: int, scale=None, items=None):
    """(K, bound): fp64 Gram and the error bound of flash_gram (gram_explicit docstring).

    items: (plan, rows_per_item) when the kernel works on the plan's items (row runs of
    segments): the bound is then that of the items' Gram M summed into segments, Pᵀ|ΔM|P
    (an item's fp32 sums are shorter than its segment's, but items of one segment may
    cancel, so the segment-level bound would not hold)."""
    if items is None:
        X, Xa = seg_grads(calls, ids, S)
        counts = torch.bincount(ids[ids >= 0], minlength=S).double()
        n = counts * sum(A.shape[1] for A, _ in calls) + len(calls) + 1  # fp32 terms per X_s entry
        return explicit_bound(X.reshape(S, -1), Xa.reshape(S, -1), n, block_k, scale)
    plan, r = items
    lo, hi, iseg = (t.cpu() for t in plan.items(r))
    W = lo.numel()
    item_of_row = torch.full((ids.numel(),), -1, dtype=torch.int64)
    order = plan.order.cpu()
    for w in range(W):
        item_of_row[order[lo[w]:hi[w]]] = w
    _, bM = explicit_ref(calls, item_of_row, W, block_k, scale)
    P = onehot(iseg, S)  # [W, S]
    K, _ = explicit_ref(calls, ids, S, block_k, scale)  # from the ids alone, not the items
    return K, P.T @ bM @ P


def explicit_expect(calls, ids, S, plan, config=None, scale=None):
    """explicit_ref for what flash_gram(calls, plan, config=config) runs (its items, its BLOCK_K)."""
    dev = torch.device(DEVICE)
    cfg = dict(ge.explicit_config(S, dev), **(config or {}))
    r = cfg.get("ROWS_PER_ITEM") or ge.rows_per_item(plan, calls, cfg, dev)
    return explicit_ref(calls, ids, S, cfg["BLOCK_K"], scale, items=(plan, r))


def explicit_bound(X, Xa, n, block_k: int, scale=None):
    """K = X P Xᵀ (fp64) and |ΔK| ≤ u·(n_s·Xa_s|P||X_s'| + n_s'·|X_s||P|Xa_s' + (BK+3)·|X_s||P||X_s'|)
    + u²·n_s·n_s'·Xa_s|P|Xa_s': X (S, k) exact segment gradients, Xa (S, k) their sums of
    absolute products, n (S,) the fp32 terms summed into each X_s entry (+1)."""
    Pw = torch.ones(X.shape[1], dtype=torch.float64) if scale is None else scale.cpu().double().reshape(-1)
    Xb, Pa = X.abs(), Pw.abs()
    K = (X * Pw) @ X.T
    bound = U * (n[:, None] * ((Xa * Pa) @ Xb.T) + n[None, :] * ((Xb * Pa) @ Xa.T)
                 + (block_k + 3) * ((Xb * Pa) @ Xb.T)) + U * U * n[:, None] * n[None, :] * ((Xa * Pa) @ Xa.T)
    return K, bound


def ghost_ref(calls, ids, S, block_f: int):
    """(K, Kb, bound, bound_b): fp64 weight and bias Grams, and ghost_gram's bounds."""
    X, _ = seg_grads(calls, ids, S)
    K = X.reshape(S, -1) @ X.reshape(S, -1).T
    Pm = onehot(ids, S)
    kept = ids >= 0
    flat = []  # flat rows of all calls: (A, D, one-hot)
    for A, D in calls:
        T = A.shape[1]
        flat.append((A.cpu().double()[kept].reshape(-1, A.shape[2]), D.cpu().double()[kept].reshape(-1, D.shape[2]),
                     Pm[kept].repeat_interleave(T, 0)))
    Af = torch.cat([f[0] for f in flat]).abs()
    Df = torch.cat([f[1] for f in flat])
    Pf = torch.cat([f[2] for f in flat])
    Kb = Pf.T @ (Df @ Df.T) @ Pf
    Dabs = Df.abs() @ Df.abs().T
    Kabs = Pf.T @ ((Af @ Af.T) * Dabs) @ Pf
    d, p = calls[0][0].shape[2], calls[0][1].shape[2]
    bound = U * (d + p + 2 * block_f + 3) * Kabs * 1.01
    bound_b = U * (p + 2 * block_f + 3) * (Pf.T @ Dabs @ Pf) * 1.01
    return K, Kb, bound, bound_b


def within(K: torch.Tensor, K_ref: torch.Tensor, bound: torch.Tensor):
    K = K.cpu()
    assert not K.isnan().any(), "NaN in the result"
    err = (K - K_ref).abs()
    worst = float((err - bound).max())
    assert bool((err <= bound + 1e-300).all()), \
        f"error exceeds the bound by {worst:.3e} (max err {float(err.max()):.3e})"


def rand_rows(N, T, d, p, dtype, gen, layout="contiguous"):
    """A (N, T, d), D (N, T, p) on DEVICE; 'transposed' gives conv-like (N, d, T).transpose views."""
    if layout == "transposed":
        A = torch.randn(N, d, T, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
        D = torch.randn(N, p, T, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    else:
        A = torch.randn(N, T, d, generator=gen).to(dtype).to(DEVICE)
        D = torch.randn(N, T, p, generator=gen).to(dtype).to(DEVICE)
    return A, D


def plan_of(ids, S):
    return gp.segment_plan(ids.to(DEVICE), S)


# ----------------------------------------------------------------------------- the plan
def test_segment_plan_groups_rows():
    ids = torch.tensor([3, 0, -1, 3, 0, 3, -1, 1])
    plan = gp.segment_plan(ids, 5)
    assert (plan.N, plan.S, plan.n_kept, plan.max_rows) == (8, 5, 6, 3)
    assert plan.order.tolist() == [1, 4, 7, 0, 3, 5]  # by segment, ascending rows inside
    assert plan.seg_sorted.tolist() == [0, 0, 1, 3, 3, 3]
    assert plan.starts.tolist() == [0, 2, 3, 3, 6, 6]  # segments 2 and 4 empty
    assert plan.by_size.tolist()[:3] == [3, 0, 1]
    lo, hi, seg = plan.items(2)  # runs of <= 2 rows, longest first, covering every kept row once
    assert sorted(zip(lo.tolist(), hi.tolist(), seg.tolist())) == [(0, 2, 0), (2, 3, 1), (3, 5, 3), (5, 6, 3)]
    assert (hi - lo).tolist() == sorted((hi - lo).tolist(), reverse=True)
    assert plan.n_items(2) == 4 and plan.n_items(1) == 6
    assert ids.tolist() == [3, 0, -1, 3, 0, 3, -1, 1]  # input untouched


@pytest.mark.parametrize("ids,S,match", [
    (torch.tensor([0, 5]), 5, "segment id 5 is outside"),
    (torch.tensor([0, -2]), 5, "segment id -2 is outside"),
    (torch.tensor([0.0, 1.0]), 5, "integers"),
    (torch.zeros(2, 2, dtype=torch.int64), 5, "1-D"),
    (torch.tensor([0]), -1, "num_segments"),
])
def test_segment_plan_refuses(ids, S, match):
    with pytest.raises(ValueError, match=match):
        gp.segment_plan(ids, S)


def test_launchers_refuse_bad_inputs(gen):
    ids = torch.tensor([0, 1, 1])
    plan = plan_of(ids, 2)
    A, D = rand_rows(3, 2, 5, 4, torch.float32, gen)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ge.flash_gram((A.double(), D), plan)
    with pytest.raises(ValueError, match="agree on"):
        gg.ghost_gram((A, D[:, :1]), plan)
    with pytest.raises(ValueError, match="rows but the segment plan has"):
        gc.combine((A[:2], D[:2]), plan, torch.ones(2))
    with pytest.raises(ValueError, match="3-D"):
        ge.flash_gram((A[0], D[0]), plan)
    with pytest.raises(ValueError, match=r"scale must be a \(4, 5\)"):
        ge.flash_gram((A, D), plan, scale=torch.ones(5, 4, device=DEVICE))
    with pytest.raises(ValueError, match="weights must be"):
        gc.combine((A, D), plan, torch.ones(3))
    with pytest.raises(ValueError, match="call 1 has"):
        ge.flash_gram([(A, D), (A[..., :3], D)], plan)
    big = gp.segment_plan(torch.zeros(3, dtype=torch.int64, device=DEVICE), 70000)
    with pytest.raises(ValueError, match="65535"):
        ge.flash_gram((A, D), big)


def test_empty_cases(gen):
    A, D = rand_rows(4, 2, 5, 3, torch.float32, gen)
    none_kept = plan_of(torch.full((4,), -1), 3)
    assert ge.flash_gram((A, D), none_kept).abs().sum() == 0
    assert gg.ghost_gram((A, D), none_kept).abs().sum() == 0
    assert gc.combine((A, D), none_kept, torch.ones(3)).abs().sum() == 0
    no_segments = plan_of(torch.full((4,), -1), 0)
    assert ge.flash_gram((A, D), no_segments).shape == (0, 0)


# ----------------------------------------------------------------------------- int64 index math
@triton.jit
def _offsets_probe(order_ptr, out_ptr, mask_ptr, f0_ptr, f_hi, T, s_n, s_t, BLOCK: tl.constexpr):
    f = tl.load(f0_ptr) + tl.arange(0, BLOCK)  # int64 flat indices, as the kernels form them
    _, row, t, m = gp.flat_rows(order_ptr, f, f_hi, T)
    tl.store(out_ptr + tl.arange(0, BLOCK), gp.row_offsets(row, t, s_n, s_t))
    tl.store(mask_ptr + tl.arange(0, BLOCK), m.to(tl.int8))


@triton.jit
def _offsets_probe_int32(order_ptr, out_ptr, T, s_n, s_t, BLOCK: tl.constexpr):
    """The same math without the int64 widening (what the kernels must not do)."""
    f = tl.arange(0, BLOCK)
    row = tl.load(order_ptr + f // T).to(tl.int32)
    tl.store(out_ptr + f, (row * s_n + (f % T) * s_t).to(tl.int64))


def test_flat_offsets_are_int64_past_2_31():
    """Row 3e6 of an (N, 512, 768) activation starts at 1.2e12 elements, and position 511
    at a stride of 2^22 at 2.1e9: both past 2^31. The offsets of 64 flat rows are checked
    against Python integers, with no 8 GB tensor allocated; the int32 version of the
    same math (second kernel) is checked to wrap, so the test can fail."""
    T, s_n, s_t = 4, 393_216, 1 << 22
    order = torch.tensor([7, 3_000_001, 5_460, 3_000_000, 2, 6_000_000, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43],
                         dtype=torch.int64, device=DEVICE)
    f0, f_hi = 1 * T, 14 * T - 3  # flat rows from order position 1 on
    out = torch.full((64,), -1, dtype=torch.int64, device=DEVICE)
    mask = torch.full((64,), -1, dtype=torch.int8, device=DEVICE)
    _offsets_probe[(1,)](order, out, mask, torch.tensor([f0], device=DEVICE), f_hi, T, s_n, s_t, BLOCK=64)
    o = order.tolist()
    for j in range(64):
        f = f0 + j
        assert int(mask[j]) == int(f < f_hi)
        if f < f_hi:
            assert int(out[j]) == o[f // T] * s_n + (f % T) * s_t, f
    assert max(int(v) for v in out) > 2**31
    naive = torch.zeros(64, dtype=torch.int64, device=DEVICE)
    _offsets_probe_int32[(1,)](order, naive, T, s_n, s_t, BLOCK=64)
    exact = [o[f // T] * s_n + (f % T) * s_t for f in range(64)]
    assert naive.tolist() != exact  # int32 products wrap: the check above can fail


# ----------------------------------------------------------------------------- flash-Gram
CASES = [  # N, T, d, p, S, ignored rows, empty segments
    (17, 1, 63, 100, 5, 0, ()),
    (17, 3, 17, 63, 20, 3, (0, 7, 19)),
    (9, 5, 100, 17, 70, 2, ()),  # S > one 64-block, most segments empty
    (1, 1, 1, 1, 1, 0, ()),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,T,d,p,S,ign,empty", CASES)
def test_flash_gram(N, T, d, p, S, ign, empty, dtype, gen):
    ids = make_ids(N, S, gen, ign, empty)
    A, D = rand_rows(N, T, d, p, dtype, gen)
    plan = plan_of(ids, S)
    K = ge.flash_gram((A, D), plan)
    K_ref, bound = explicit_expect([(A, D)], ids, S, plan)
    within(K, K_ref, bound)
    assert torch.equal(K, K.T)
    if S > 1:  # and with whole segments as the work items
        K_ref, bound = explicit_expect([(A, D)], ids, S, plan, dict(ROWS_PER_ITEM=N))
        within(ge.flash_gram((A, D), plan, config=dict(ROWS_PER_ITEM=N)), K_ref, bound)


def test_flash_gram_poisoned_waves_and_splits(gen):
    """Small blocks, a scratch of one tile (13 waves), three k-splits, two calls with
    different T and a transposed (conv-like) layout, items of 2 rows; scratch and
    partials poisoned."""
    N, d, p, S = 11, 37, 45, 7
    ids = make_ids(N, S, gen, 2, (4,))
    calls = [rand_rows(N, 3, d, p, torch.float32, gen), rand_rows(N, 2, d, p, torch.float32, gen, "transposed")]
    plan = plan_of(ids, S)
    cfg = dict(BLOCK_P=16, BLOCK_D=16, BLOCK_F=16, BLOCK_S=16, BLOCK_K=64, ROWS_PER_ITEM=2)
    lo, hi, iseg = plan.items(2)
    W = lo.numel()
    X = torch.full((W, 16 * 16), float("nan"), device=DEVICE)
    part = torch.full((3, W, W), float("nan"), dtype=torch.float64, device=DEVICE)
    ge.flash_gram_partials(calls, plan, (lo, hi), X, part, None, cfg)
    assert not part.isnan().any()  # W < BLOCK_S: one diagonal block, all written
    M = ge.add_upper_blocks(torch.zeros(W, W, dtype=torch.float64, device=DEVICE), part.sum(0), 16)
    K_ref, bound = explicit_expect(calls, ids, S, plan, cfg)
    within(ge.items_to_segments(M, iseg, S), K_ref, bound)
    # the public launcher with the same small scratch agrees
    within(ge.flash_gram(calls, plan, scratch_bytes=1, config=cfg), K_ref, bound)


def test_flash_gram_upper_blocks_written(gen):
    """40 items over blocks of 16: every upper block (6 of 9) of every split written."""
    N, T, d, p, S = 40, 2, 20, 24, 30
    ids = make_ids(N, S, gen)
    A, D = rand_rows(N, T, d, p, torch.float32, gen)
    plan = plan_of(ids, S)
    cfg = dict(BLOCK_P=16, BLOCK_D=16, BLOCK_F=16, BLOCK_S=16, BLOCK_K=128, ROWS_PER_ITEM=1)
    lo, hi, iseg = plan.items(1)
    W = lo.numel()
    assert W == 40
    X = torch.full((W, 2 * 256), float("nan"), device=DEVICE)
    part = torch.full((2, W, W), float("nan"), dtype=torch.float64, device=DEVICE)
    ge.flash_gram_partials([(A, D)], plan, (lo, hi), X, part, None, cfg)
    b = torch.arange(W, device=DEVICE) // 16
    upper = b[:, None] <= b[None, :]
    assert not part[:, upper].isnan().any()
    M = ge.add_upper_blocks(torch.zeros(W, W, dtype=torch.float64, device=DEVICE), part.sum(0), 16)
    K_ref, bound = explicit_expect([(A, D)], ids, S, plan, cfg)
    within(ge.items_to_segments(M, iseg, S), K_ref, bound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_gram_scaled(dtype, gen):
    """G·P·Gᵀ with a positive diagonal P (p, d) (an Adam-like preconditioner), a
    non-contiguous P, accumulated into ``out``."""
    N, T, d, p, S = 13, 2, 33, 47, 6
    ids = make_ids(N, S, gen, 2, (1,))
    A, D = rand_rows(N, T, d, p, dtype, gen)
    P = (torch.rand(d, p, generator=gen) + 0.1).to(DEVICE).T  # (p, d), strides (1, p)
    plan = plan_of(ids, S)
    prior = torch.randn(S, S, dtype=torch.float64, generator=gen)
    out = prior.clone().to(DEVICE)
    K = ge.flash_gram((A, D), plan, scale=P, out=out)
    assert K is out
    K_ref, bound = explicit_expect([(A, D)], ids, S, plan, scale=P)
    within(K.cpu() - prior, K_ref, bound + 1e-15 * prior.abs())


# ----------------------------------------------------------------------------- ghost
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,T,d,p,S,ign,empty", CASES[:3])
def test_ghost_gram(N, T, d, p, S, ign, empty, dtype, gen):
    ids = make_ids(N, S, gen, ign, empty)
    A, D = rand_rows(N, T, d, p, dtype, gen)
    plan = plan_of(ids, S)
    K, Kb = gg.ghost_gram((A, D), plan, bias=True)
    bf = gg.ghost_config(S, torch.device(DEVICE))["BLOCK_F"]
    K_ref, Kb_ref, bound, bound_b = ghost_ref([(A, D)], ids, S, bf)
    within(K, K_ref, bound)
    within(Kb, Kb_ref, bound_b)


def test_ghost_poisoned_splits_and_calls(gen):
    """Two calls (T = 3 and a transposed T = 2): the cross Gram's blocks all run; four
    column splits, S = 40 over blocks of 16; partials poisoned."""
    N, d, p, S = 23, 19, 21, 40
    ids = make_ids(N, S, gen, 3, (5, 6))
    calls = [rand_rows(N, 3, d, p, torch.float32, gen), rand_rows(N, 2, d, p, torch.float32, gen, "transposed")]
    plan = plan_of(ids, S)
    cfg = dict(BLOCK_S=16, BLOCK_F=16, BLOCK_K=16)
    b = torch.arange(S, device=DEVICE) // 16
    upper = b[:, None] <= b[None, :]
    for sym, (A2, D2) in ((True, calls[0]), (False, calls[1])):
        part = torch.full((4, S, S), float("nan"), dtype=torch.float64, device=DEVICE)
        part_b = torch.full((4, S, S), float("nan"), dtype=torch.float64, device=DEVICE)
        gg.ghost_partials(*calls[0], A2, D2, plan, part, part_b, sym, True, cfg)
        written = upper if sym else torch.ones_like(upper)
        assert not part[:, written].isnan().any() and not part_b[:, written].isnan().any()
    K, Kb = gg.ghost_gram(calls, plan, bias=True, config=cfg)
    K_ref, Kb_ref, bound, bound_b = ghost_ref(calls, ids, S, 16)
    within(K, K_ref, bound)
    within(Kb, Kb_ref, bound_b)
    Ke = ge.flash_gram(calls, plan)  # explicit and ghost agree on the same calls
    within(Ke, K_ref, explicit_expect(calls, ids, S, plan)[1])


# ----------------------------------------------------------------------------- combine
def combine_ref(calls, ids, S, w):
    X, Xa = seg_grads(calls, ids, S)
    wd = w.cpu().float().double()
    F_total = int((ids >= 0).sum()) * sum(A.shape[1] for A, _ in calls)
    bound = U * (2 * F_total + len(calls) + 4) * torch.einsum("s,spd->pd", wd.abs(), Xa)
    return torch.einsum("s,spd->pd", wd, X), bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,T,d,p,S,ign,empty", CASES)
def test_combine(N, T, d, p, S, ign, empty, dtype, gen):
    ids = make_ids(N, S, gen, ign, empty)
    A, D = rand_rows(N, T, d, p, dtype, gen)
    plan = plan_of(ids, S)
    w = torch.randn(S, generator=gen, dtype=torch.float64).to(DEVICE)
    ref, bound = combine_ref([(A, D)], ids, S, w)
    within(gc.combine((A, D), plan, w), ref, bound)
    within(gc.combine_torch((A, D), plan, w), ref, bound)


def test_combine_poisoned_splits_and_calls(gen):
    N, d, p, S = 21, 70, 33, 6
    ids = make_ids(N, S, gen, 4, (2,))
    calls = [rand_rows(N, 5, d, p, torch.float32, gen), rand_rows(N, 3, d, p, torch.float16, gen, "transposed")]
    plan = plan_of(ids, S)
    w = torch.randn(S, generator=gen).to(DEVICE)
    cfg = dict(BLOCK_P=16, BLOCK_D=32, BLOCK_F=16)
    part = torch.full((3, p, d), float("nan"), device=DEVICE)
    per = 16 * triton.cdiv(triton.cdiv(plan.n_kept * 5, 16), 3)
    gc.combine_partials(*calls[0], plan, w, part, per, cfg)
    assert not part.isnan().any()
    ref0, bound0 = combine_ref(calls[:1], ids, S, w)
    within(part.sum(0).double(), ref0, bound0)
    prior = torch.randn(p, d, generator=gen)
    out = prior.clone().to(DEVICE)
    res = gc.combine(calls, plan, w, out=out, config=cfg)
    assert res is out
    ref, bound = combine_ref(calls, ids, S, w)
    within(res.cpu().double() - prior.double(), ref, bound + U * prior.double().abs())


# ----------------------------------------------------------------------------- conv via unfold
@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 2, 1, 1), (2, 1, 0, 2)])
def test_conv_through_unfold(groups, stride, padding, dilation, gen):
    """Conv2d per-segment weight gradients = the Linear kernels on unfolded patches, one
    call per group (strided views of the patches, no copies): checked against an fp64
    batch-size-1 autograd loop on fp32-representable inputs; the bound's absolute sums
    are the same loop on |x| and |grad_out| (patches of |x| are |patches|)."""
    N, C_in, C_out, H, k, S = 6, 4, 6, 9, 3, 4
    conv = torch.nn.Conv2d(C_in, C_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           bias=False).double()
    x = torch.randn(N, C_in, H, H, generator=gen).double()
    gout = torch.randn(N, *conv(x).shape[1:], generator=gen).double()
    L = gout.shape[2] * gout.shape[3]
    ids = make_ids(N, S, gen, 1, (3,))

    def per_row(x, gout):  # fp64 per-sample weight gradients (N, C_out·C_in/G·k²)
        out = []
        for n in range(N):
            conv.zero_grad()
            (conv(x[n : n + 1]) * gout[n : n + 1]).sum().backward()
            out.append(conv.weight.grad.flatten().clone())
        return torch.stack(out)

    P1 = onehot(ids, S)
    X, Xa = P1.T @ per_row(x, gout), P1.T @ per_row(x.abs(), gout.abs())  # [S, weight entries]
    n = torch.bincount(ids[ids >= 0], minlength=S).double() * L + 2
    K_ref, bound = explicit_bound(X, Xa, n, ge.explicit_config(S, torch.device(DEVICE))["BLOCK_K"])
    patches = F.unfold(x.float(), k, dilation=dilation, padding=padding, stride=stride)  # [N, C_in·k², L]
    dg, pg = C_in // groups * k * k, C_out // groups
    go = gout.float().reshape(N, groups, pg, L)
    calls = [(patches[:, g * dg:(g + 1) * dg].to(DEVICE).transpose(1, 2), go[:, g].to(DEVICE).transpose(1, 2))
             for g in range(groups)]  # per group A (N, L, dg), D (N, L, pg)
    plan = plan_of(ids, S)
    K = torch.zeros(S, S, dtype=torch.float64, device=DEVICE)
    Kg = torch.zeros(S, S, dtype=torch.float64, device=DEVICE)
    g_bound = torch.zeros(S, S, dtype=torch.float64)
    bf = gg.ghost_config(S, torch.device(DEVICE))["BLOCK_F"]
    for c in calls:  # groups are disjoint weight entries: their Grams add
        ge.flash_gram(c, plan, out=K)
        gg.ghost_gram(c, plan, out=Kg)
        g_bound += ghost_ref([c], ids, S, bf)[2]
    within(K, K_ref, bound)
    within(Kg, K_ref, g_bound + 1e-15 * K_ref.abs())  # + the fp64 sum over groups
    w = torch.randn(S, generator=gen, dtype=torch.float64)
    Wg = torch.cat([gc.combine(c, plan, w.to(DEVICE)) for c in calls]).cpu()  # [C_out, dg]
    wd = w.float().double()
    W_ref = (wd @ X).reshape(C_out, -1)
    W_bound = U * (2 * float(n.max()) + 4) * (wd.abs() @ Xa).reshape(C_out, -1)
    within(Wg.double(), W_ref, W_bound)


def test_gpu_block_sizes(gen):
    """The compiled (GPU) block sizes, run here too (the interpreter's defaults differ):
    S = 65 (one retain row per segment and a 5-row forget segment), T = 2."""
    N, T, d, p, S = 69, 2, 40, 70, 65
    ids = torch.cat([torch.arange(64), torch.full((5,), 64)])[torch.randperm(N, generator=gen)]
    A, D = rand_rows(N, T, d, p, torch.float32, gen)
    plan = plan_of(ids, S)
    dev = torch.device(DEVICE)
    ce, cg, cc = ge.explicit_config(S, dev, True), gg.ghost_config(S, dev, True), gc.combine_config(dev, True)
    K_ref, bound = explicit_expect([(A, D)], ids, S, plan, ce)
    within(ge.flash_gram((A, D), plan, config=ce), K_ref, bound)
    K_ref, _, gbound, _ = ghost_ref([(A, D)], ids, S, cg["BLOCK_F"])
    within(gg.ghost_gram((A, D), plan, config=cg), K_ref, gbound)
    w = torch.randn(S, generator=gen).to(DEVICE)
    ref, bound = combine_ref([(A, D)], ids, S, w)
    within(gc.combine((A, D), plan, w, config=cc), ref, bound)


# ----------------------------------------------------------------------------- the torch backend
def test_matches_torch_backend(gen):
    """Same Gram as the engine's torch path (matrix.gram_explicit / gram_ghost on Linear
    rows): their difference within the sum of both error bounds (the torch path sums a
    whole tile of p·d products in one fp32 GEMM)."""
    from orthograd_fast.gram.rules import matrix
    from orthograd_fast.gram.rules.base import GramOptions, Segments
    from orthograd_fast.gram.rules.linear import LinearRows

    N, T, d, p, S = 15, 3, 21, 30, 6
    ids = make_ids(N, S, gen, 2, (4,))
    A, D = rand_rows(N, T, d, p, torch.float32, gen)
    plan = plan_of(ids, S)
    seg = Segments(ids.to(DEVICE), S)
    rows = [LinearRows(A, D, {})]
    K_t, _ = matrix.gram_explicit(rows, seg, GramOptions(method="explicit"))
    K_ref, bound = explicit_expect([(A, D)], ids, S, plan)
    _, bound_torch = explicit_ref([(A, D)], ids, S, d * p)
    within(ge.flash_gram((A, D), plan), K_t.cpu(), bound + bound_torch)
    K_tg, _ = matrix.gram_ghost(rows, seg, GramOptions(method="ghost"))
    bf = gg.ghost_config(S, torch.device(DEVICE))["BLOCK_F"]
    _, _, gbound, _ = ghost_ref([(A, D)], ids, S, max(bf, N * T))
    within(gg.ghost_gram((A, D), plan), K_tg.cpu(), 2 * gbound)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 exists only on the GPU")
def test_tf32_does_not_leak(gen):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ids = make_ids(64, 9, gen, 3)
        A, D = rand_rows(64, 7, 300, 200, torch.float32, gen)
        plan = plan_of(ids, 9)
        K_ref, bound = explicit_expect([(A, D)], ids, 9, plan)
        within(ge.flash_gram((A, D), plan), K_ref, bound)
        K_ref, _, gbound, _ = ghost_ref([(A, D)], ids, 9, gg.ghost_config(9, torch.device(DEVICE))["BLOCK_F"])
        within(gg.ghost_gram((A, D), plan), K_ref, gbound)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
