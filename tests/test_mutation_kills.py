"""Tests that tell a right answer from a slightly wrong one (issue 8, "Tests that can tell a
right answer from a wrong one").

A mutation audit of the core found one-line bugs that every other test let through, or
killed only by a crash. Each test here kills one of them by an assertion, against an fp64
computation on fresh random inputs, with a bound derived from the numerics:

1. the torch projection summing its chunk Grams in fp32 instead of fp64;
2. SampleGram's precision="high" silently using fp32 products;
3. the default rank tolerances (linalg.default_rtol, OrthoGrad's DEFAULT_RTOL) moved;
4. OrthoGrad's non-finite-Gram check removed;
5. a store or load of the Triton projection kernels without its mask;
6. conv ``groups`` ignored by the engine's conv rule.

`make mutate` (bench/mutate.py) runs the mutation tool over the core; bench/RESULTS.md,
"Mutation testing", has the score and the survivors.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthograd_fast import OrthoGrad, SampleGram, project_orthogonal
from orthograd_fast import _torch_projection as tp
from orthograd_fast import reference as ref
from orthograd_fast.kernels import projection as kp
from orthograd_fast.linalg import default_rtol
from orthograd_fast.orthograd import DEFAULT_RTOL, NonFiniteGradientError

U32 = 2.0**-24  # unit roundoff, fp32
U64 = 2.0**-53  # unit roundoff, fp64


def _ints(shape, bound: int, gen) -> torch.Tensor:
    """fp32 tensor of random integers in [-bound, bound]."""
    return torch.randint(-bound, bound + 1, shape, generator=gen).to(torch.float32)


def _raised(fn) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # the test asserts on the kind, so a wrong one fails, not errors
        return e
    return None


# --------------------------------------------------------------------------------------
# 1. the torch projection's chunk sums are fp64
# --------------------------------------------------------------------------------------
N_CHUNKS = 40


def test_torch_gram_sums_many_chunks_exactly(gen):
    """K, b, ‖g‖² over 40 chunks equal the fp64 Gram *exactly* on integer data.

    |G|, |g| <= 31: inside one chunk every partial sum of the fp32 GEMMs is an integer of
    magnitude <= CHUNK·31² < 2^23 (8192·961 = 7.9e6), so it is exact in fp32 whatever the
    summation order, and the fp64 sum of the chunks is exact (< 2^53). The totals on the
    diagonal (~P·330 ≈ 1e8) pass 2^26, where fp32's spacing is 8: chunk sums added in fp32
    would round ~30 times, by up to ±4 each.
    """
    B = 3
    P = N_CHUNKS * tp.CHUNK - 123
    G = _ints((B, P), 31, gen)
    g = _ints((P,), 31, gen)
    K, b, gg = tp.gram([g], [G], torch.float32)
    Gd, gd = G.double(), g.double()
    assert float((Gd * Gd).sum(1).min()) > 2**26  # the claim above
    assert K.dtype == b.dtype == gg.dtype == torch.float64
    assert float((K - Gd @ Gd.T).abs().max()) == 0.0
    assert float((b - Gd @ gd).abs().max()) == 0.0
    assert float(gg) == float(gd @ gd)


def test_torch_combine_sums_many_chunks_exactly(gen):
    """r = r_in − Gᵀc, G r and ‖r‖² over 40 chunks, exact on integer data.

    |r_in| <= 15, |G| <= 7, c in {-1, 1}: |r| <= 15 + 3·7 = 36, so each chunk's G r
    (<= 8192·7·36 = 2.1e6) and ‖r‖² (<= 8192·36² = 1.1e7) are exact fp32 integers below
    2^24; the fp64 totals are exact, while ‖r‖² (~P·(80 + 3·18.7) ≈ 4.5e7) passes 2^25,
    where fp32 sums of chunks would round.
    """
    B = 3
    P = N_CHUNKS * tp.CHUNK - 77
    G = _ints((B, P), 7, gen)
    r_in = _ints((P,), 15, gen)
    c = torch.randint(0, 2, (B,), generator=gen).double() * 2 - 1
    (r,), Gr, rr = tp.combine([r_in], [G], c, torch.float32, [torch.float32], want_Gr=True)
    exact = r_in.double() - c @ G.double()
    assert float((r.double() - exact).abs().max()) == 0.0
    assert float(exact @ exact) > 2**25  # the claim above
    assert Gr.dtype == rr.dtype == torch.float64
    assert float((Gr - G.double() @ exact).abs().max()) == 0.0
    assert float(rr) == float(exact @ exact)


# --------------------------------------------------------------------------------------
# 2. SampleGram(precision="high") forms fp64 products
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ghost", "explicit"])
def test_sample_gram_high_precision_beats_fast(method, gen):
    """precision="high" is exact to fp64 where every per-row gradient is exact in fp32.

    Linear(d, p) on one position per row, loss Σ out·V with V powers of two: the output
    gradients are V exactly and every product V_ri·x_rj is exact in fp32, so the per-row
    gradients (and the explicit path's one-row segment tiles) are exact. fp64 products then
    leave only fp64 sums: |K − K_exact| <= k·u64·max|K| (k = d·p terms, the worst case of
    a length-k dot product, ~1.3e-12 here). fp32 products ("fast") carry fp32 rounding,
    ~1e-8..1e-6 here: far above that bound, and below the worst case k·u32.
    """
    N, d, p = 12, 300, 40
    lin = nn.Linear(d, p, bias=False)
    x = torch.randn(N, d, generator=gen) + 2.0
    V = torch.where(torch.rand(N, p, generator=gen) < 0.5, -1.0, 1.0) * 2.0 ** torch.randint(
        -3, 4, (N, p), generator=gen
    ).float()
    seg = torch.arange(N)
    seg[5] = -1  # an ignored row
    S = N
    xd, Vd = x.double(), V.double()
    K_exact = (xd @ xd.T) * (Vd @ Vd.T)
    K_exact[5] = 0
    K_exact[:, 5] = 0
    scale = float(K_exact.abs().max())
    err = {}
    for precision in ("fast", "high"):
        sg = SampleGram(lin, method=method, precision=precision)
        with sg.record(seg, num_segments=S):
            (lin(x) * V).sum().backward()
        assert any(v.endswith(method) for v in sg.coverage().values()), sg.coverage()
        err[precision] = float((sg.gram() - K_exact).abs().max()) / scale
        sg.close()
        lin.weight.grad = None
    k = d * p
    assert err["high"] <= k * U64, err
    assert err["fast"] <= k * U32, err
    assert err["high"] < err["fast"], err


# --------------------------------------------------------------------------------------
# 3. default rank tolerances, pinned by behaviour
# --------------------------------------------------------------------------------------
def _pair(ratio: float, dtype, gen, P: int = 64) -> torch.Tensor:
    """(2, P) rows of ``dtype`` whose row-normalised spectrum has σ_min/σ_max ≈ ratio.

    Row 0 lives on the first half of the entries, row 1 = row 0 + t·v with v on the second
    half: no rounding touches their common part, so the angle θ = atan(t·|v|/|row 0|) is
    what the data hold. Two unit rows at angle θ have σ_min/σ_max = tan(θ/2)."""
    h = P // 2
    a = torch.zeros(P, dtype=torch.float64)
    a[:h] = torch.randn(h, generator=gen, dtype=torch.float64)
    a /= a.norm()
    v = torch.zeros(P, dtype=torch.float64)
    v[h:] = torch.randn(P - h, generator=gen, dtype=torch.float64)
    v /= v.norm()
    t = torch.tan(torch.tensor(2 * torch.atan(torch.tensor(ratio, dtype=torch.float64)).item()))
    a = a.to(dtype)
    return torch.stack([a, a + (t * v).to(dtype)])


def _sigma_ratio(rows: torch.Tensor) -> float:
    """σ_min/σ_max of the row-normalised rows, fp64 (the quantity the rank rule reads)."""
    R = rows.double()
    R = R / R.norm(dim=1, keepdim=True)
    s = torch.linalg.svdvals(R)
    return float(s[-1] / s[0])


RTOL_CASES = [  # dtype, documented default of project_orthogonal
    (torch.float64, 1e-7),
    (torch.float32, 1e-7),
    (torch.float16, 1e-3),
    (torch.bfloat16, 1e-2),
]


@pytest.mark.parametrize("dtype,rtol", RTOL_CASES, ids=["fp64", "fp32", "fp16", "bf16"])
def test_project_orthogonal_default_rtol(dtype, rtol, gen):
    """A direction at 3x the default tolerance is kept, one at 1/3 of it dropped: a
    default 10x looser (or tighter) fails one side. Each spectrum is measured in fp64 on
    the data actually passed (preconditions), so only the rule is under test."""
    assert default_rtol(dtype) == rtol  # the documented table (linalg, README)
    for factor, rank in ((3.0, 2), (1 / 3, 1)):
        G = _pair(factor * rtol, dtype, gen)
        ratio = _sigma_ratio(G)
        assert 0.8 * factor * rtol < ratio < 1.25 * factor * rtol, ratio  # the construction worked
        g = torch.randn(G.shape[1], generator=gen).to(dtype)
        r, info = project_orthogonal(g, G, return_info=True, backend="torch")
        assert info.rtol == rtol
        assert info.rank == rank, (dtype, factor, ratio, info.rank)


OG_RTOL_CASES = [  # model dtype, OrthoGrad's documented default
    (torch.float64, 1e-7),
    (torch.float32, 1e-4),
    (torch.float16, 1e-2),
    (torch.bfloat16, 1e-2),
]


@pytest.mark.parametrize("dtype,rtol", OG_RTOL_CASES, ids=["fp64", "fp32", "fp16", "bf16"])
def test_orthograd_default_rtol(dtype, rtol, gen):
    """OrthoGrad's step keeps a retain direction at 3x its default tolerance and drops one
    at 1/3 of it. Linear(d, C) without bias and the per-sample loss Σ_c out_c·y_c: retain
    sample i's gradient is y ⊗ x_i (the same y for both), so its cosines are those of
    x_1, x_2 (``_pair``). The engine forms fp64 products (precision="high") so that the
    Gram resolves the spectrum (fp32 products resolve σ/σ_max to ~3e-4 only: orthograd.py)."""
    assert DEFAULT_RTOL[dtype] == rtol  # the documented table (orthograd.py)
    d, C = 64, 3
    for factor, rank in ((3.0, 2), (1 / 3, 1)):
        xr = _pair(factor * rtol, dtype, gen, P=d)
        ratio = _sigma_ratio(xr)
        assert 0.8 * factor * rtol < ratio < 1.25 * factor * rtol, ratio
        y = torch.randn(C, generator=gen).to(dtype)
        model = nn.Linear(d, C, bias=False).to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        engine = SampleGram(model, precision="high", record_grads=False)
        forget = (torch.randn(2, d, generator=gen).to(dtype), torch.randn(2, C, generator=gen).to(dtype))
        with OrthoGrad(model, opt, loss_fn=lambda out, t: (out * t).sum(1), engine=engine) as og:
            assert og.rtol == rtol
            stats = og.step(forget, (xr, y.expand(2, C)))
        assert stats["rank"] == rank, (dtype, factor, ratio, stats["rank"])


# --------------------------------------------------------------------------------------
# 4. a finite loss with an overflowing Gram is refused by OrthoGrad
# --------------------------------------------------------------------------------------
class Fp32GramEngine:
    """An engine with SampleGram's interface that hands its Grams over in fp32 (as one
    saving memory might): an fp64 Gram past 3.4e38 arrives as Inf, and nothing in this
    engine checks it. OrthoGrad takes any such engine (its ``engine`` argument)."""

    def __init__(self, sg: SampleGram):
        self.sg = sg

    def record(self, segments, num_segments=None):
        return self.sg.record(segments, num_segments)

    def gram(self, per_tensor: bool = False):
        out = self.sg.gram(per_tensor)
        if per_tensor:
            return {n: K.float().double() for n, K in out.items()}
        return out.float().double()

    def combine(self, weights):
        self.sg.combine(weights)

    def close(self):
        self.sg.close()


def _huge_batches(gen, d=16, C=4, B=4, Fn=2):
    """Inputs near 1e20 (fp32) into linear layers: the logits (~1e20) and the cross-entropy
    stay finite, the first layer's per-sample gradients (~1e20 entries) too, but their Gram
    (~1e40·d) passes fp32's 3.4e38."""
    xr = torch.randn(B, d, generator=gen) * 1e20
    xf = torch.randn(Fn, d, generator=gen) * 1e20
    return (xf, torch.randint(0, C, (Fn,), generator=gen)), (xr, torch.randint(0, C, (B,), generator=gen))


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("engine", ["default", "fp32-gram"])
def test_orthograd_refuses_overflowing_gram(engine, granularity, gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    d, C = 16, 4
    model = nn.Sequential(nn.Linear(d, 8), nn.Linear(8, C))  # no saturating activation
    forget, retain = _huge_batches(gen, d, C)
    x = torch.cat([retain[0], forget[0]])
    y = torch.cat([retain[1], forget[1]])
    assert bool(torch.isfinite(F.cross_entropy(model(x), y, reduction="none")).all())  # finite loss
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = None
    if engine == "fp32-gram":
        eng = Fp32GramEngine(SampleGram(model, precision="high", record_grads=False))
    with OrthoGrad(model, opt, granularity=granularity, engine=eng) as og:
        err = _raised(lambda: og.step(forget, retain))
    assert isinstance(err, NonFiniteGradientError), f"{type(err).__name__}: {err}"
    assert "Gram" in str(err), str(err)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # refused before the optimizer step


# --------------------------------------------------------------------------------------
# 5. the Triton projection kernels touch nothing outside their buffers
# --------------------------------------------------------------------------------------
def _guarded(shape, dtype, guard: int):
    """(view of ``shape``, the guard after it) in one NaN-filled buffer."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + guard,), float("nan"), dtype=dtype)
    return buf[:n].view(shape), buf[n:]


def _nan_padded(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """t (B, P) as a view into a larger NaN buffer (rows/cols of NaN below and after), so an
    unmasked load reads NaN and spoils the result."""
    B, P = t.shape
    big = torch.full((B + rows, P + cols), float("nan"), dtype=t.dtype)
    big[:B, :P] = t
    return big[:B, :P]


@pytest.mark.parametrize("high", [False, True])
@pytest.mark.parametrize("B,P", [(5, 1000), (21, 777)])
def test_gram_kernel_stays_in_bounds(high, B, P, gen):
    """Pass 1 with B and P off the block sizes: every output element written (NaN-poisoned),
    nothing after the outputs (guard regions stay NaN), no NaN read from past G's rows or
    columns, and the values those of the fp64 Gram."""
    cfg = kp.gram_config(B, high, torch.device("cpu"))
    tiles_per_split = 2
    n_tiles = -(-P // cfg["BLOCK_P"])
    n_split = -(-n_tiles // tiles_per_split)
    guard = 4 * cfg["BLOCK_I"] * cfg["BLOCK_J"]
    G = _nan_padded(torch.randn(B, P, generator=gen), cfg["BLOCK_I"], cfg["BLOCK_P"])
    g_buf = torch.full((P + cfg["BLOCK_P"],), float("nan"))
    g_buf[:P] = torch.randn(P, generator=gen)
    g = g_buf[:P]
    K_part, K_guard = _guarded((n_split, B, B), torch.float64, guard)
    b_part, b_guard = _guarded((n_split, B), torch.float64, guard)
    gg_part, gg_guard = _guarded((n_split,), torch.float64, guard)
    kp.gram_partials(g, G, K_part, b_part, gg_part, high, tiles_per_split, cfg)
    for name, gd in (("K", K_guard), ("b", b_guard), ("gg", gg_guard)):
        assert bool(gd.isnan().all()), f"pass 1 wrote past {name}_part"
    upper = torch.triu(torch.ones(B, B, dtype=torch.bool))
    K = K_part.sum(0)
    Gd, gd_ = G.double(), g.double()
    K_exact = Gd @ Gd.T
    scale = float(K_exact.diagonal().max())
    # fp64 products: fp64 sums of P terms; fp32 tiles: fp32 dots of BLOCK_P terms
    tol = P * U64 if high else cfg["BLOCK_P"] * U32
    assert float((K - K_exact)[upper].abs().max()) <= tol * scale  # NaN fails too
    assert float((b_part.sum(0) - Gd @ gd_).abs().max()) <= tol * (scale * float(gd_ @ gd_)) ** 0.5
    assert abs(float(gg_part.sum()) - float(gd_ @ gd_)) <= P * U64 * float(gd_ @ gd_)


@pytest.mark.parametrize("high", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,P", [(3, 1500), (21, 999)])
def test_combine_kernel_stays_in_bounds(high, out_dtype, B, P, gen):
    """Pass 2 writes r_out, G r and ‖r‖² partials and nothing after them (guards stay NaN),
    and reads nothing past r_in, c or G's rows and columns (NaN there would spoil r)."""
    cfg = kp.combine_config(B, torch.device("cpu"))
    work = torch.float64 if high else torch.float32
    n_tiles = -(-P // cfg["BLOCK_P"])
    G = _nan_padded(torch.randn(B, P, generator=gen), cfg["BLOCK_B"], cfg["BLOCK_P"])
    r_buf = torch.full((P + cfg["BLOCK_P"],), float("nan"))
    r_buf[:P] = torch.randn(P, generator=gen)
    r_in = r_buf[:P]
    c_buf = torch.full((B + cfg["BLOCK_B"],), float("nan"), dtype=work)
    c = torch.randn(B, generator=gen, dtype=torch.float64) / B
    c_buf[:B] = c.to(work)
    guard = 2 * max(cfg["BLOCK_P"], cfg["BLOCK_B"])
    r_out, r_guard = _guarded((P,), out_dtype, guard)
    Gr_part, Gr_guard = _guarded((n_tiles, B), torch.float64, guard)
    rr_part, rr_guard = _guarded((n_tiles,), torch.float64, guard)
    kp.combine_into(r_in, G, c_buf[:B], r_out, Gr_part, rr_part, True, high, cfg)
    for name, gd in (("r_out", r_guard), ("Gr_part", Gr_guard), ("rr_part", rr_guard)):
        assert bool(gd.isnan().all()), f"pass 2 wrote past {name}"
    exact = r_in.double() - c_buf[:B].double() @ G.double()
    u_out = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[out_dtype]
    u_work = U64 if high else U32
    tiny = torch.finfo(out_dtype).smallest_normal * u_out  # rounding below the normal range
    bound = u_out * exact.abs() + tiny + (B + 1) * u_work * (
        r_in.double().abs() + c_buf[:B].double().abs() @ G.double().abs()
    )
    assert bool(((r_out.double() - exact).abs() <= 1.01 * bound).all())  # NaN fails too
    rs = r_out.double()
    Gd = G.double()
    # G r of the stored r in the work dtype: B dots of BLOCK_P terms per tile
    gr_tol = cfg["BLOCK_P"] * u_work * float(Gd.abs().max(1).values.max()) * float(rs.abs().sum())
    assert float((Gr_part.sum(0) - Gd @ rs).abs().max()) <= gr_tol
    assert abs(float(rr_part.sum()) - float(rs @ rs)) <= cfg["BLOCK_P"] * u_work * float(rs @ rs)


# --------------------------------------------------------------------------------------
# 6. grouped convolutions
# --------------------------------------------------------------------------------------
class GroupedConvNet(nn.Module):
    """A grouped conv (groups > 1) whose shapes also fit a convolution that ignores the
    groups' structure as an (n·G)-row problem, then a head."""

    def __init__(self, nd: int, groups: int, kernel: int = 3, padding: int = 1):
        super().__init__()
        conv = nn.Conv1d if nd == 1 else nn.Conv2d
        self.conv = conv(6, 9, kernel, padding=padding, groups=groups)
        self.head = nn.Linear(9, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(h.flatten(2).mean(-1))


def _ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("one_position", [False, True], ids=["L>1", "L=1"])
@pytest.mark.parametrize("method", ["ghost", "explicit"])
@pytest.mark.parametrize("nd", [1, 2])
def test_grouped_conv_gram_matches_fp64_loop(method, nd, one_position, gen):
    """The weight Gram of a grouped conv (groups = 3) equals the fp64 batch-size-1 loop's.
    The cross-group terms that a rule ignoring groups would add change the value by O(1)
    (relative), so the fp64 tolerance 1e-10 tells them apart (fp64 engine: sums of
    ~1e3 products, ~1e-14)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    N = 7
    shape = (N, 6, 11) if nd == 1 else (N, 6, 5, 5)
    # one output position per row (a kernel covering the input): no ghost cancellation
    # check can send the layer to the explicit path, so the ghost's own value is tested
    model = (GroupedConvNet(nd, 3, kernel=shape[-1], padding=0) if one_position else GroupedConvNet(nd, 3)).double()
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (N,), generator=gen)
    seg = torch.tensor([0, 1, 2, 3, -1, 4, 5]) if one_position else torch.tensor([0, 1, 1, 2, -1, 3, 0])
    S = int(seg.max()) + 1
    sg = SampleGram(model, method=method)
    with sg.record(seg, num_segments=S):
        _ce_sum(model(x), y).backward()
    assert sg.coverage()["conv.weight"].endswith(method), sg.coverage()
    Kt = sg.gram(per_tensor=True)
    sg.close()
    gs = ref.segment_grads(ref.per_sample_grads_loop(copy.deepcopy(model), _ce_sum, x, y), seg, S)
    K_ref = ref.gram_from_grads(gs, per_tensor=True)
    for name in ("conv.weight", "conv.bias"):
        err = float((Kt[name] - K_ref[name]).norm() / K_ref[name].norm())
        assert err <= 1e-10, (name, err)


# --------------------------------------------------------------------------------------
# 7. survivors of `make mutate` that a test can tell apart (bench/RESULTS.md)
# --------------------------------------------------------------------------------------
def test_gram_pinv_runs_single_threaded_and_restores(monkeypatch, gen):
    """linalg._single_thread: the small eigh runs on one thread (20-100x faster on busy
    cores, linalg.py) and the caller's thread count comes back, also from 2 threads."""
    from orthograd_fast import linalg

    seen = []
    eigh = torch.linalg.eigh

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return eigh(*a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    G = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        solve = linalg.gram_pinv(G @ G.T, 1e-7)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert seen == [1]
    assert solve.rank == 5


def test_gram_pinv_without_directions(gen):
    """All-zero rows: nothing kept, rank 0, K⁺ = 0 and sigma_ratio 1.0 (documented); one
    zero row among others: sigma_ratio over the non-zero rows, as an fp64 SVD gives it."""
    from orthograd_fast.linalg import gram_pinv

    solve = gram_pinv(torch.zeros(3, 3, dtype=torch.float64), 1e-7)
    assert solve.rank == 0 and not bool(solve.kept.any()) and bool((solve.pinv == 0).all())
    assert solve.sigma_ratio == 1.0
    G = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    G[2] = 0
    solve = gram_pinv(G @ G.T, 1e-7)
    assert solve.kept.tolist() == [True, True, False, True] and solve.rank == 3
    rows = G[[0, 1, 3]]
    s = torch.linalg.svdvals(rows / rows.norm(dim=1, keepdim=True))
    assert solve.sigma_ratio == pytest.approx(float(s[-1] / s[0]), rel=1e-10)


def test_project_orthogonal_with_no_rows(gen):
    """B = 0: g comes back unchanged (a copy), with rank 0, orthogonality 0 and no coefficients."""
    g = torch.randn(7, 3, generator=gen)
    r, info = project_orthogonal(g, torch.empty(0, 7, 3), return_info=True)
    assert torch.equal(r, g) and r.data_ptr() != g.data_ptr()
    assert info.rank == 0 and info.orthogonality == 0.0 and info.coefficients.numel() == 0


class AuxHead(nn.Module):
    """A trained auxiliary head whose output this loss ignores: its layer is called, but
    no gradient reaches it (its per-sample gradients are zero)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(7, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        self.aux(h)
        return self.b(h)


@pytest.mark.parametrize("method", ["ghost", "explicit"])
def test_layer_without_gradient_and_all_rows_ignored(method, gen):
    """A called layer that gets no gradient has a zero Gram and a zero combination, the
    others match the fp64 loop; a step whose rows are all ignored (-1) gives zeros."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = AuxHead().double()
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    seg = torch.tensor([0, 1, 1, 2, -1, 0])
    sg = SampleGram(model, method=method)
    with sg.record(seg, num_segments=3):
        _ce_sum(model(x), y).backward()
    Kt = sg.gram(per_tensor=True)
    gs = ref.segment_grads(ref.per_sample_grads_loop(copy.deepcopy(model), _ce_sum, x, y), seg, 3)
    K_ref = ref.gram_from_grads(gs, per_tensor=True)
    for name, K in K_ref.items():
        assert float((Kt[name] - K).norm()) <= 1e-10 * max(float(K.norm()), 1.0), name
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    sg.combine(w)
    for name, p in model.named_parameters():
        expected = torch.einsum("s,s...->...", w, gs[name])
        assert p.grad is not None and float((p.grad - expected).norm()) <= 1e-10 * max(float(expected.norm()), 1.0)
    sg.close()

    model.zero_grad(set_to_none=True)
    sg = SampleGram(model, method=method)
    with sg.record(torch.full((6,), -1), num_segments=2):
        _ce_sum(model(x), y).backward()
    assert bool((sg.gram() == 0).all())
    sg.combine(torch.ones(2, dtype=torch.float64))
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in model.parameters())
    sg.close()


class ConvHead(nn.Module):
    """Conv1d(3 -> 5, kernel 3) over 7 positions (T = 7 != d = 9), then a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(3, 5, 3, padding=1), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(-1))


class TwoPositions(nn.Module):
    """Linear(5 -> 4) at T = 2 positions per row, summed: the smallest sequence."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(x).sum(1)


@pytest.mark.parametrize("case", ["conv-partial-tiles", "two-positions-ghost", "two-positions-explicit"])
def test_partial_tiles_and_two_positions(case, gen):
    """Multi-row segments through the explicit path's partial tiles (stream mode, a tile
    budget of 7 entries: the weight in (p, d) tiles, each from the generic patch GEMM), and
    the ghost's flat rows at T = 2; fp64 against the fp64 loop."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    N = 9
    if case == "conv-partial-tiles":
        model, x, method = ConvHead().double(), torch.randn(N, 3, 7, generator=gen, dtype=torch.float64), "explicit"
    else:
        model, x = TwoPositions().double(), torch.randn(N, 2, 5, generator=gen, dtype=torch.float64)
        method = case.rsplit("-", 1)[1]
    y = torch.randint(0, 4, (N,), generator=gen)
    seg = torch.tensor([0, 0, 1, 2, 2, 2, -1, 3, 1])
    # stream mode keeps no tiles, so the budget decides the tiles (store mode would keep
    # the whole (S, p·d) tensor: it is no larger than the recorded activations here)
    sg = SampleGram(model, method=method, mode="stream" if case == "conv-partial-tiles" else "store")
    if case == "conv-partial-tiles":
        sg._opts.budget = 7
    with sg.record(seg, num_segments=4):
        _ce_sum(model(x), y).backward()
    Kt = sg.gram(per_tensor=True)
    sg.close()
    gs = ref.segment_grads(ref.per_sample_grads_loop(copy.deepcopy(model), _ce_sum, x, y), seg, 4)
    for name, K in ref.gram_from_grads(gs, per_tensor=True).items():
        assert float((Kt[name] - K).norm()) <= 1e-10 * float(K.norm()), name


class WithBatchStat(nn.Module):
    """Per-row logits and, beside them, a batch statistic (for logging) that the loss ignores."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h), h.mean(0)


class InputFree(nn.Module):
    """Outputs that do not depend on the inputs at all (a learned constant per row)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return self.c.expand(x.shape[0], 3) * 1.0


def test_row_check_outputs_beside_batch_statistics(gen):
    """An output mixing the rows (a batch mean) beside per-row logits is no reason to refuse:
    the Gram of a loss on the logits is exact; a model none of whose outputs depends on its
    input rows is refused with the message that says so."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = WithBatchStat().double()
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    seg = torch.tensor([0, 1, 1, 2, -1, 0])

    def loss(out, t):
        return _ce_sum(out[0], t)

    sg = SampleGram(model)
    with sg.record(seg, num_segments=3):
        loss(model(x), y).backward()
    K = sg.gram()
    sg.close()
    K_ref = ref.gram_from_grads(ref.segment_grads(ref.per_sample_grads_loop(copy.deepcopy(model), loss, x, y), seg, 3))
    assert float((K - K_ref).norm()) <= 1e-10 * float(K_ref.norm())

    free = InputFree()
    sg = SampleGram(free)
    err = None
    try:
        with sg.record(seg, num_segments=3):
            free(x).sum().backward()
    except ValueError as e:
        err = e
    sg.close()
    assert err is not None and "no output of the model" in str(err), err


def _ill_conditioned(gen, B=8, P=300, cond=1e6, scale=1e-3) -> torch.Tensor:
    """fp64 (B, P) with singular values log-spaced over [scale/cond, scale]: ‖G‖₂ = scale < 1."""
    U, _ = torch.linalg.qr(torch.randn(B, B, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(P, B, generator=gen, dtype=torch.float64))
    s = scale * torch.logspace(0, -math.log10(cond), B, dtype=torch.float64)
    return (U * s) @ V.T


def test_projection_refinement_and_reported_orthogonality(gen):
    """fp64, cond(G) = 1e6 and ‖G‖₂ = 1e-3: the reported orthogonality is ‖G r‖/(‖G‖₂‖r‖)
    of the returned r (measured in fp64 by the last pass: it agrees with the reference's to
    rounding), and the refinement pass brings it from the first pass's ~cond·u (~1e-7) to
    the fp64 level: below 1e-9 (measured ~5e-12; a skipped refinement stays near 1e-7)."""
    G = _ill_conditioned(gen)
    g = torch.randn(G.shape[1], generator=gen, dtype=torch.float64)
    for refine in (0, 1):
        r, info = project_orthogonal(g, G, refine=refine, return_info=True)
        true = ref.orthogonality(r, G)
        assert info.orthogonality == pytest.approx(true, rel=1e-3), (refine, info.orthogonality, true)
        if refine:
            assert true <= 1e-9, true


def test_projection_explicit_rtol(gen):
    """An explicit rtol, 0 included (documented range [0, 1)), decides the rank: a direction
    at σ/σ_max = 3e-7 is dropped by rtol 1e-6 and kept by 1e-8 and by 0."""
    G = _pair(3e-7, torch.float64, gen)
    g = torch.randn(G.shape[1], generator=gen, dtype=torch.float64)
    for rtol, rank in ((1e-6, 1), (1e-8, 2), (0.0, 2)):
        _, info = project_orthogonal(g, G, rtol=rtol, return_info=True)
        assert info.rtol == rtol and info.rank == rank, (rtol, info.rank)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_projection_rounds_once(dtype, gen):
    """fp16/bf16 g and G: the work (fp32) keeps every intermediate r of the refinement, and
    only the result is rounded to g's dtype, so each entry is within one rounding
    (u_out·|r_i|) of the fp64 projection of the same data, plus the fp32 work's error
    ((B + 1)·u32·(|g_i| + Σ_k |c_k||G_ki|), twice: two passes). An intermediate r stored in
    the half dtype would add a second rounding, up to 2·u_out·|r_i|."""
    B, P = 4, 300
    G = torch.randn(B, P, generator=gen).to(dtype)
    g = torch.randn(P, generator=gen).to(dtype)
    r, info = project_orthogonal(g, G, return_info=True, backend="torch")
    exact = ref.project_svd(g.double(), G.double(), 1e-7)
    u_out = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    work = 2 * (B + 1) * U32 * (g.double().abs() + info.coefficients.abs() @ G.double().abs())
    bound = 1.01 * (u_out * exact.abs() + work) + torch.finfo(dtype).smallest_normal * u_out
    assert bool(((r.double() - exact).abs() <= bound).all()), float(((r.double() - exact).abs() / bound).max())


def test_projection_refuses_a_sequence_paired_with_a_non_sequence(gen):
    """g a list and G an iterator (or the other way round): refused with the message that
    names the accepted types, never half-consumed."""
    g = [torch.randn(5, generator=gen)]
    G = [torch.randn(2, 5, generator=gen)]
    for a, b in ((g, iter(G)), (iter(g), G)):
        with pytest.raises(ValueError, match="sequences"):
            project_orthogonal(a, b)


def test_orthograd_reported_stats_against_fp64_loop(gen):
    """The step's reported ``kept`` = ‖g_u⊥‖/‖g_u‖ and, with measure=True,
    ``step_orthogonality`` = ‖G·Δθ‖/(‖G‖₂‖Δθ‖) of the actual parameter change, against the
    fp64 batch-size-1 loop (fp64 model: both agree to ~1e-12; bound 1e-6 relative, and an
    absolute 1e-12 for the near-zero orthogonality of a step that descends with alpha)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    B, Fn = 5, 3
    xr, yr = torch.randn(B, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    xf, yf = torch.randn(Fn, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (Fn,), generator=gen)
    m0 = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    per_r = ref.per_sample_grads_loop(m0, _ce_sum, xr, yr)
    G = torch.cat([per_r[n].reshape(B, -1) for n in names], 1)  # [B, P]
    per_f = ref.per_sample_grads_loop(m0, _ce_sum, xf, yf)
    g_u = torch.cat([per_f[n].reshape(Fn, -1) for n in names], 1).mean(0)  # [P]
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with OrthoGrad(model, opt, alpha=0.3, measure=True) as og:
        stats = og.step((xf, yf), (xr, yr))
    r = ref.project_svd(g_u, G, og.rtol)
    assert stats["kept"] == pytest.approx(float(r.norm() / g_u.norm()), rel=1e-6)
    delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    true = float((G @ delta).norm() / (torch.linalg.matrix_norm(G, 2) * delta.norm()))
    assert "step_orthogonality" in stats, sorted(stats)
    assert abs(stats["step_orthogonality"] - true) <= 1e-6 * true + 1e-12, (stats["step_orthogonality"], true)


def test_orthograd_explicit_rtol(gen):
    """OrthoGrad(rtol=...) is taken as given (range [0, 1)) and decides the rank: a retain
    direction at σ/σ_max = 3e-4 is dropped by rtol 1e-3 and kept by 1e-5 and by 0; an rtol
    outside the range is refused."""
    d, C = 64, 3
    xr = _pair(3e-4, torch.float64, gen, P=d)
    y = torch.randn(C, generator=gen, dtype=torch.float64)
    forget = (torch.randn(2, d, generator=gen, dtype=torch.float64), torch.randn(2, C, generator=gen, dtype=torch.float64))
    for rtol, rank in ((1e-3, 1), (1e-5, 2), (0.0, 2)):
        model = nn.Linear(d, C, bias=False).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with OrthoGrad(model, opt, rtol=rtol, loss_fn=lambda out, t: (out * t).sum(1)) as og:
            assert og.rtol == rtol
            stats = og.step(forget, (xr, y.expand(2, C)))
        assert stats["rank"] == rank, (rtol, stats["rank"])
    model = nn.Linear(d, C).double()
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="rtol"):
            OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1), rtol=bad)


def test_projection_api_defaults_and_backend(monkeypatch, gen):
    """DESIGN.md §5's signature: rtol and the rest keyword-only; refine defaults to 1 (the
    default call is bitwise the refine=1 call, on a G whose second refinement would still
    change r); rtol outside [0, 1) refused; backend="torch" runs the torch passes."""
    G = _ill_conditioned(gen)
    g = torch.randn(G.shape[1], generator=gen, dtype=torch.float64)
    with pytest.raises(TypeError):
        project_orthogonal(g, G, 1e-7)
    r_default = project_orthogonal(g, G)
    assert torch.equal(r_default, project_orthogonal(g, G, refine=1))
    assert not torch.equal(r_default, project_orthogonal(g, G, refine=2))  # the premise above
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="rtol"):
            project_orthogonal(g, G, rtol=bad)
    calls = []
    gram = tp.gram

    def spy(*a, **k):
        calls.append(1)
        return gram(*a, **k)

    monkeypatch.setattr(tp, "gram", spy)
    project_orthogonal(g.float(), G.float(), backend="torch")
    assert calls, "backend='torch' did not run the torch passes"
