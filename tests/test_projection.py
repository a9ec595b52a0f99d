"""project_orthogonal against the fp64 SVD reference, for every backend (Triton via the
CPU interpreter). Tolerances follow DESIGN.md §3 and README "Numerics":

* well-conditioned fp32: relative error ≤ 1e-5 (measured ~1e-7);
* ill-conditioned with a spectral gap: orthogonality ‖G r‖/(‖G‖₂‖r‖) ≤ 1e-5 up to
  cond 1e4 for precision="fast", ≤ 1e-6 up to cond 1e6 for "high";
* other dtypes: the output rounding dominates, so error ≤ 8 u(dtype).
"""
import pytest
import torch
from projection_cases import UNIT_ROUNDOFF, rank_deficient, rel_err, well_conditioned, with_spectrum

from orthograd_fast import default_rtol, project_orthogonal
from orthograd_fast import reference as ref

BACKENDS = ["torch", "triton"]


def _check_unmodified(before, after):
    for x, y in zip(before, after):
        assert torch.equal(x, y) or (torch.isnan(x).any() and torch.equal(x.nan_to_num(), y.nan_to_num()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["fast", "high"])
@pytest.mark.parametrize("B,P", [(16, 3000), (64, 5000), (3, 1001)])
def test_well_conditioned_fp32(backend, precision, B, P, gen):
    g, G = well_conditioned(B, P, torch.float32, gen)
    g0, G0 = g.clone(), G.clone()
    r, info = project_orthogonal(g, G, precision=precision, backend=backend, return_info=True)
    _check_unmodified([g0, G0], [g, G])
    assert r.dtype == torch.float32 and r.shape == g.shape
    r0, rank0 = ref.project_svd(g, G, info.rtol, return_rank=True)
    assert info.rank == rank0 == B
    assert rel_err(r, r0, r0) <= 1e-5
    assert ref.orthogonality(r, G) <= 1e-6
    # return_info is honest: coefficients reproduce r and the orthogonality is measured
    assert rel_err(g.double() - info.coefficients @ G.double(), r, g) <= 1e-6
    # measured in the work precision: fp32 partial sums for "fast", fp64 for "high"
    assert info.orthogonality == pytest.approx(ref.orthogonality(r, G), rel=0.2, abs=2e-7 if precision == "fast" else 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision,cond,target", [("fast", 1e2, 1e-5), ("fast", 1e4, 1e-5), ("high", 1e4, 1e-6), ("high", 1e6, 1e-6)])
def test_ill_conditioned_with_gap(backend, precision, cond, target, gen):
    B, P, n_null = 48, 4000, 8
    g, G = with_spectrum(B, P, cond, n_null, torch.float32, gen)
    r, info = project_orthogonal(g, G, precision=precision, backend=backend, return_info=True)
    r0, rank0 = ref.project_svd(g, G, info.rtol, return_rank=True)
    assert rank0 == B - n_null
    assert ref.orthogonality(r, G) <= target
    # error bound of a backward-stable projection: ~ cond · u
    assert rel_err(r, r0, g) <= max(1e-5, 100 * cond * UNIT_ROUNDOFF[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["fast", "high"])
@pytest.mark.parametrize("B,P,rank", [(64, 2000, 40), (65, 17, 17), (20, 500, 1)])
def test_rank_deficient(backend, precision, B, P, rank, gen):
    g, G = rank_deficient(B, P, rank, torch.float32, gen)
    r, info = project_orthogonal(g, G, precision=precision, backend=backend, return_info=True)
    r0 = ref.project_svd(g, G, info.rtol)
    assert rel_err(r, r0, g) <= 1e-5
    # r is orthogonal to every row relative to g's size (r itself may be ~0 when B > P)
    Gd = G.double()
    assert float((Gd @ r.double()).norm() / (torch.linalg.matrix_norm(Gd, 2) * g.double().norm())) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_zero_and_single_rows(backend, gen):
    g, G = well_conditioned(6, 300, torch.float32, gen)
    G[3] = G[1]  # duplicate
    G[4] = 0.0  # zero row
    G[5] = -2.5 * G[0]  # parallel
    r, info = project_orthogonal(g, G, backend=backend, return_info=True)
    r0, rank0 = ref.project_svd(g, G, info.rtol, return_rank=True)
    assert info.rank == rank0 == 3
    assert rel_err(r, r0, g) <= 1e-5
    r1 = project_orthogonal(g, G[:1], backend=backend)  # B = 1: g - (g·u)u
    u = G[0].double() / G[0].double().norm()
    assert rel_err(r1, g.double() - (g.double() @ u) * u, g) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 3, 65])
@pytest.mark.parametrize("P", [1, 17, 1001, 65537])
def test_odd_sizes(backend, B, P, gen):
    if backend == "triton" and P == 65537 and B == 65:
        B = 33  # keep the interpreter run short; 65 rows are covered at the other P
    g, G = well_conditioned(B, P, torch.float32, gen)
    r, info = project_orthogonal(g, G, backend=backend, return_info=True)
    r0 = ref.project_svd(g, G, info.rtol)
    assert rel_err(r, r0, g) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", ["fast", "high"])
def test_dtypes(backend, dtype, precision, gen):
    g, G = well_conditioned(12, 777, dtype, gen)
    r = project_orthogonal(g, G, precision=precision, backend=backend)
    assert r.dtype == dtype
    r0 = ref.project_svd(g, G, default_rtol(dtype, precision))
    tol = 1e-12 if dtype == torch.float64 else 8 * UNIT_ROUNDOFF[dtype]
    assert rel_err(r, r0, r0) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_shape_and_non_contiguous(backend, gen):
    base = torch.randn(5, 9, 4, 11, generator=gen)
    G = base.permute(0, 3, 1, 2)[:, ::2]  # (5, 6, 9, 4), non-contiguous
    g = torch.randn(4, 9, 6, generator=gen).permute(2, 1, 0)  # (6, 9, 4), non-contiguous
    assert not G.is_contiguous() and not g.is_contiguous()
    r = project_orthogonal(g, G, backend=backend)
    assert r.shape == g.shape
    r0 = ref.project_svd(g.contiguous(), G.contiguous(), default_rtol(torch.float32))
    assert rel_err(r, r0, g) <= 1e-5
    # a row-strided 2-D view goes to the kernels without a copy of G
    wide = torch.randn(7, 500, generator=gen)
    G2, g2 = wide[:, 100:400], torch.randn(300, generator=gen)
    r2 = project_orthogonal(g2, G2, backend=backend)
    assert rel_err(r2, ref.project_svd(g2, G2.contiguous(), 1e-5), g2) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_projected_jointly(backend, gen):
    shapes = [(30, 7), (5,), (2, 3, 4)]
    B = 9
    gs = [torch.randn(s, generator=gen) for s in shapes]
    Gs = [torch.randn(B, *s, generator=gen) for s in shapes]
    rs, info = project_orthogonal(gs, Gs, backend=backend, return_info=True)
    assert isinstance(rs, list) and [r.shape for r in rs] == [g.shape for g in gs]
    r0 = ref.project_svd(gs, Gs, info.rtol)
    assert rel_err(rs, r0, gs) <= 1e-5
    # jointly, not piecewise: the flat concatenation gives the same answer
    flat = project_orthogonal(torch.cat([g.reshape(-1) for g in gs]),
                              torch.cat([G.reshape(B, -1) for G in Gs], 1), backend=backend)
    assert rel_err(torch.cat([r.reshape(-1) for r in rs]), flat, flat) <= 1e-5
    tup = project_orthogonal(tuple(gs), tuple(Gs), backend=backend)
    assert isinstance(tup, list)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_returns_a_copy(backend, gen):
    g = torch.randn(3, 4, generator=gen)
    r, info = project_orthogonal(g, torch.empty(0, 3, 4), backend=backend, return_info=True)
    assert torch.equal(r, g) and r.data_ptr() != g.data_ptr()
    assert info.rank == 0 and info.coefficients.numel() == 0


def test_auto_is_torch_on_cpu(gen):
    g, G = well_conditioned(4, 50, torch.float32, gen)
    _, info = project_orthogonal(g, G, return_info=True)
    assert info.backend == "torch"


def test_refine_improves_fast_at_high_condition(gen):
    g, G = with_spectrum(48, 4000, 1e4, 8, torch.float32, gen)
    orth = [ref.orthogonality(project_orthogonal(g, G, refine=k), G) for k in (0, 1)]
    assert orth[1] <= orth[0] * 1.5 and orth[1] <= 1e-6


# --------------------------------------------------------------------------------------
# bad input: clear errors, nothing modified
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["g_nan", "G_inf", "G_nan", "g_inf"])
def test_non_finite_inputs_raise(backend, where, gen):
    g, G = well_conditioned(5, 200, torch.float32, gen)
    if where.startswith("g"):
        g[17] = float("nan") if where.endswith("nan") else float("inf")
    else:
        G[2, 33] = float("nan") if where.endswith("nan") else float("-inf")
    g0, G0 = g.clone(), G.clone()
    with pytest.raises(ValueError, match="non-finite"):
        project_orthogonal(g, G, backend=backend)
    _check_unmodified([g0, G0], [g, G])


def test_non_finite_g_with_empty_batch_raises():
    with pytest.raises(ValueError, match="non-finite"):
        project_orthogonal(torch.tensor([1.0, float("nan")]), torch.empty(0, 2))


@pytest.mark.parametrize(
    "g,G,match",
    [
        (torch.zeros(5), torch.zeros(3, 4), r"G must have shape \(B, \*g.shape\)"),
        (torch.zeros(2, 5), torch.zeros(3, 5, 2), r"G must have shape"),
        (torch.zeros(5), torch.zeros(5), r"G must have shape"),
        (torch.zeros(5, dtype=torch.int64), torch.zeros(3, 5, dtype=torch.int64), "dtype torch.int64"),
        (torch.zeros(5), torch.zeros(3, 5, dtype=torch.int32), "dtype torch.int32"),
        (torch.zeros(5), [torch.zeros(3, 5)], "both be tensors or both be sequences"),
        ([torch.zeros(5), torch.zeros(2)], [torch.zeros(3, 5)], "has 2 tensors but G has 1"),
        ([torch.zeros(5), torch.zeros(2)], [torch.zeros(3, 5), torch.zeros(4, 2)], "same leading dim B"),
        ([], [], "empty sequences"),
        (torch.zeros(5), torch.zeros(3, 5, device="meta"), "one device"),
        ("abc", "abc", "not a tensor"),
    ],
)
def test_bad_inputs_raise(g, G, match):
    with pytest.raises(ValueError, match=match):
        project_orthogonal(g, G)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rtol=-1.0), "rtol"),
        (dict(rtol=2.0), "rtol"),
        (dict(refine=-1), "refine"),
        (dict(refine=1.5), "refine"),
        (dict(precision="exact"), "precision"),
        (dict(backend="jax"), "backend"),
        (dict(backend="cuda"), "CUDA C\\+\\+ extension"),
    ],
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        project_orthogonal(torch.ones(4), torch.ones(2, 4), **kw)


def test_triton_without_interpreter_or_gpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu"):
        project_orthogonal(torch.ones(4), torch.ones(2, 4), backend="triton")


def test_fast_escalates_only_when_the_fp32_gram_cannot_resolve(gen):
    g, G = well_conditioned(32, 3000, torch.float32, gen)
    _, info = project_orthogonal(g, G, return_info=True)
    assert info.gram_dtype == torch.float32  # well-conditioned: the fp32-tile Gram is used
    g, G = with_spectrum(32, 3000, 1e4, 4, torch.float32, gen)
    _, info = project_orthogonal(g, G, return_info=True)
    assert info.gram_dtype == torch.float64
    _, info = project_orthogonal(g, G, precision="high", return_info=True)
    assert info.gram_dtype == torch.float64
