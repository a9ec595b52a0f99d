"""project_orthogonal's Triton backend compiled for CUDA (run by bench/gpu_check.sh with
TRITON_INTERPRET=0). Skipped on machines without a GPU. Same references and tolerances as
test_projection.py, plus what only a GPU can break: TF32 must not leak into the Gram."""
import os

import pytest
import torch
from projection_cases import UNIT_ROUNDOFF, rank_deficient, rel_err, well_conditioned, with_spectrum

from orthograd_fast import default_rtol, project_orthogonal
from orthograd_fast import reference as ref
from orthograd_fast.kernels import projection as kp

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset or 0)",
)


def _cuda(*ts):
    return [t.cuda() for t in ts]


@pytest.mark.parametrize("precision", ["fast", "high"])
@pytest.mark.parametrize("B,P", [(1, 1), (3, 17), (16, 100_003), (64, 1_000_000), (65, 65537), (200, 50_000)])
def test_well_conditioned(precision, B, P, gen):
    g, G = well_conditioned(B, P, torch.float32, gen)
    gc, Gc = _cuda(g, G)
    r, info = project_orthogonal(gc, Gc, precision=precision, return_info=True)
    assert info.backend == "triton" and r.is_cuda
    r0 = ref.project_svd(g, G, info.rtol)
    assert rel_err(r.cpu(), r0, g) <= 1e-5


@pytest.mark.parametrize("precision,cond,target", [("fast", 1e4, 1e-5), ("high", 1e6, 1e-6)])
def test_ill_conditioned_with_gap(precision, cond, target, gen):
    g, G = with_spectrum(48, 200_000, cond, 8, torch.float32, gen)
    r = project_orthogonal(*_cuda(g, G), precision=precision)
    assert ref.orthogonality(r.cpu(), G) <= target


def test_tf32_does_not_leak(gen):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        g, G = with_spectrum(32, 100_000, 1e4, 4, torch.float32, gen)
        r = project_orthogonal(*_cuda(g, G), precision="fast")
        assert ref.orthogonality(r.cpu(), G) <= 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype, gen):
    g, G = well_conditioned(24, 30_001, dtype, gen)
    r = project_orthogonal(*_cuda(g, G))
    assert r.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 8 * UNIT_ROUNDOFF[dtype]
    assert rel_err(r.cpu(), ref.project_svd(g, G, default_rtol(dtype)), g) <= tol


def test_rank_deficient_and_sequences(gen):
    g, G = rank_deficient(64, 20_000, 40, torch.float32, gen)
    r = project_orthogonal(*_cuda(g, G))
    assert rel_err(r.cpu(), ref.project_svd(g, G, default_rtol(torch.float32)), g) <= 1e-5
    gs = [torch.randn(s, generator=gen) for s in [(300, 7), (5,), (1000,)]]
    Gs = [torch.randn(9, *x.shape, generator=gen) for x in gs]
    rs = project_orthogonal([x.cuda() for x in gs], [X.cuda() for X in Gs])
    assert rel_err([x.cpu() for x in rs], ref.project_svd(gs, Gs, 1e-7), gs) <= 1e-5


def test_nan_raises_on_gpu(gen):
    g, G = well_conditioned(5, 1000, torch.float32, gen)
    G[1, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        project_orthogonal(*_cuda(g, G))


@pytest.mark.parametrize("high", [False, True])
def test_poisoned_launchers(high, gen):
    B, P = 37, 10_007
    G, g = torch.randn(B, P, generator=gen).cuda(), torch.randn(P, generator=gen).cuda()
    cfg = kp.gram_config(B, high, G.device)
    n_tiles = -(-P // cfg["BLOCK_P"])
    tps = 3
    n_split = -(-n_tiles // tps)
    K_part = torch.full((n_split, B, B), float("nan"), dtype=torch.float64, device="cuda")
    b_part = torch.full((n_split, B), float("nan"), dtype=torch.float64, device="cuda")
    gg_part = torch.full((n_split,), float("nan"), dtype=torch.float64, device="cuda")
    kp.gram_partials(g, G, K_part, b_part, gg_part, high, tps, cfg)
    upper = torch.triu(torch.ones(B, B, dtype=torch.bool, device="cuda"))
    K = K_part.sum(0)
    assert not K[upper].isnan().any() and not b_part.isnan().any() and not gg_part.isnan().any()
    K_exact = G.double() @ G.double().T
    assert float((K - K_exact)[upper].abs().max() / K_exact.diagonal().max()) <= (1e-13 if high else 1e-6)
    ccfg = kp.combine_config(B, G.device)
    nt = -(-P // ccfg["BLOCK_P"])
    r_out = torch.full((P,), float("nan"), device="cuda")
    Gr_part = torch.full((nt, B), float("nan"), dtype=torch.float64, device="cuda")
    rr_part = torch.full((nt,), float("nan"), dtype=torch.float64, device="cuda")
    c = torch.randn(B, dtype=torch.float64, device="cuda") / B
    kp.combine_into(g, G, c.to(torch.float64 if high else torch.float32), r_out, Gr_part, rr_part, True, high, ccfg)
    assert not r_out.isnan().any() and not Gr_part.isnan().any()
    assert torch.allclose(r_out.double(), g.double() - c @ G.double(), rtol=1e-5, atol=1e-5)
