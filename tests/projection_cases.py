"""Input generators shared by the projection tests (fresh random data on every call)."""
from __future__ import annotations

import torch

# Unit roundoff u per dtype; tolerances below are multiples of it.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def rel_err(r, r0, scale) -> float:
    """‖r - r0‖ / ‖scale‖ in fp64 (scale: usually g, so that r0 ≈ 0 is handled)."""
    r = torch.cat([x.reshape(-1).double() for x in (r if isinstance(r, list) else [r])])
    r0 = torch.cat([x.reshape(-1).double() for x in (r0 if isinstance(r0, list) else [r0])])
    s = torch.cat([x.reshape(-1).double() for x in (scale if isinstance(scale, list) else [scale])])
    return float((r - r0).norm() / s.norm())


def well_conditioned(B, P, dtype, gen):
    """Gaussian rows (cond ≈ (1+sqrt(B/P))/(1-sqrt(B/P)) for B < P) and a Gaussian g."""
    G = torch.randn(B, P, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(P, generator=gen, dtype=torch.float64).to(dtype)
    return g, G


def with_spectrum(B, P, cond, n_null, dtype, gen, null_level=1e-13):
    """G = U diag(s) Vᵀ: B - n_null singular values log-spaced in [1/cond, 1], then a gap
    to n_null values at ``null_level`` (far below any rtol): the rank is unambiguous.
    g has a component in the span and one orthogonal to it."""
    U, _ = torch.linalg.qr(torch.randn(B, B, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(P, B, generator=gen, dtype=torch.float64))
    k = B - n_null
    s = torch.cat([torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), k, dtype=torch.float64),
                   torch.full((n_null,), null_level, dtype=torch.float64)])
    G = (U * s) @ V.T
    g = torch.randn(P, generator=gen, dtype=torch.float64)
    return g.to(dtype), G.to(dtype)


def rank_deficient(B, P, rank, dtype, gen, in_span=0.5):
    """Rows are combinations of ``rank`` base vectors; g is mostly in their span."""
    A = torch.randn(B, rank, generator=gen, dtype=torch.float64)
    W = torch.randn(rank, P, generator=gen, dtype=torch.float64)
    G = A @ W
    g = in_span * (torch.randn(rank, generator=gen, dtype=torch.float64) @ W) / rank**0.5
    g = g + torch.randn(P, generator=gen, dtype=torch.float64)
    return g.to(dtype), G.to(dtype)
