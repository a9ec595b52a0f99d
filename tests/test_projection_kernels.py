"""The Triton launchers on their own, with NaN-poisoned output buffers: an element a
kernel fails to write stays NaN and fails the comparison (TRITON_INTERPRET=1 on CPU)."""
import pytest
import torch

from orthograd_fast import _torch_projection as torch_ops
from orthograd_fast.kernels import projection as kp


@pytest.mark.parametrize("high", [False, True])
@pytest.mark.parametrize("B,P,tiles_per_split", [(5, 1000, 2), (33, 777, 1), (70, 300, 3)])
def test_gram_partials_poisoned(high, B, P, tiles_per_split, gen):
    G = torch.randn(B, P, generator=gen)
    g = torch.randn(P, generator=gen)
    cfg = kp.gram_config(B, high, G.device)
    n_tiles = -(-P // cfg["BLOCK_P"])
    n_split = -(-n_tiles // tiles_per_split)
    K_part = torch.full((n_split, B, B), float("nan"), dtype=torch.float64)
    b_part = torch.full((n_split, B), float("nan"), dtype=torch.float64)
    gg_part = torch.full((n_split,), float("nan"), dtype=torch.float64)
    kp.gram_partials(g, G, K_part, b_part, gg_part, high, tiles_per_split, cfg)
    upper = torch.triu(torch.ones(B, B, dtype=torch.bool))
    K = K_part.sum(0)
    assert not K[upper].isnan().any() and not b_part.isnan().any() and not gg_part.isnan().any()
    Gd, gd = G.double(), g.double()
    K_exact = Gd @ Gd.T
    scale = K_exact.diagonal().max()
    # fp64 products ("high") are exact up to fp64 summation; fp32 tiles of BLOCK_P terms
    tol = 1e-13 if high else 1e-6
    assert float((K - K_exact)[upper].abs().max() / scale) <= tol
    assert float((b_part.sum(0) - Gd @ gd).abs().max() / (scale.sqrt() * gd.norm())) <= tol
    assert float(abs(gg_part.sum() - gd @ gd) / (gd @ gd)) <= tol


@pytest.mark.parametrize("high", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,P", [(3, 1500), (40, 999)])
def test_combine_poisoned(high, out_dtype, B, P, gen):
    G = torch.randn(B, P, generator=gen)
    r_in = torch.randn(P, generator=gen)
    c = torch.randn(B, generator=gen, dtype=torch.float64) / B
    work = torch.float64 if high else torch.float32
    cfg = kp.combine_config(B, G.device)
    n_tiles = -(-P // cfg["BLOCK_P"])
    r_out = torch.full((P,), float("nan"), dtype=out_dtype)
    Gr_part = torch.full((n_tiles, B), float("nan"), dtype=torch.float64)
    rr_part = torch.full((n_tiles,), float("nan"), dtype=torch.float64)
    kp.combine_into(r_in, G, c.to(work), r_out, Gr_part, rr_part, True, high, cfg)
    assert not r_out.isnan().any() and not Gr_part.isnan().any() and not rr_part.isnan().any()
    exact = r_in.double() - c @ G.double()
    # per element: one rounding to the output dtype, plus the work-dtype sum of B+1 terms.
    # Below the smallest normal the output spacing is absolute (fp16: 2^-24 under 2^-14),
    # so rounding there errs by up to half of it, smallest_normal * u_out.
    u_out = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[out_dtype]
    u_work = 2**-53 if high else 2**-24
    subnormal_half_spacing = torch.finfo(out_dtype).smallest_normal * u_out
    bound = (u_out * exact.abs() + subnormal_half_spacing
             + (B + 1) * u_work * (r_in.double().abs() + c.abs() @ G.double().abs()))
    assert bool(((r_out.double() - exact).abs() <= 1.01 * bound + 1e-300).all())
    # G r and ‖r‖² are of the stored r
    rs = r_out.double()
    assert torch.allclose(Gr_part.sum(0), G.double() @ rs, rtol=1e-5, atol=1e-5 * float(rs.norm()))
    assert float(rr_part.sum()) == pytest.approx(float(rs @ rs), rel=1e-6)


def test_triton_and_torch_passes_agree(gen):
    G = torch.randn(17, 4099, generator=gen)
    g = torch.randn(4099, generator=gen)
    for work in (torch.float32, torch.float64):
        Kt, bt, ggt = kp.gram([g], [G], work)
        Kr, br, ggr = torch_ops.gram([g], [G], work)
        scale = float(Kr.diagonal().max())  # entry errors scale with ‖G_i‖‖G_j‖
        assert float((Kt - Kr).abs().max()) <= 1e-6 * scale
        assert float((bt - br).abs().max()) <= 1e-6 * (scale * float(ggr)) ** 0.5
        assert torch.allclose(ggt, ggr, rtol=1e-6)
