"""The tiny fp64 linear algebra every projection shares (DESIGN.md §3).

Given the Gram K = G Gᵀ of B vectors (fp64, (B, B)), build the pseudo-inverse of K on its
numerical rank, decided scale-free on the cosine matrix:

    d = diag(K);  rows with d == 0 are dropped (a zero gradient spans nothing)
    C = D^-1/2 K D^-1/2            (D = diag(d) on the kept rows; C = Ĝ Ĝᵀ, Ĝ row-normalised)
    C = V diag(λ) Vᵀ               (eigh, fp64)
    keep k with σ_k = sqrt(λ_k) > rtol · σ_max      (σ: singular values of Ĝ)
    K⁺ = D^-1/2 V_k diag(1/λ_k) V_kᵀ D^-1/2

Then c = K⁺ b solves K c = b on that subspace, and g - Gᵀc is g with its component in the
kept span of G removed. A row with a tiny norm still counts as a direction (cosines do not
see scale), unlike a threshold on K itself.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Default rank tolerances on σ/σ_max of the row-normalised G (DESIGN.md §3), by the
# narrowest dtype of G. Two floors set them (measured, README "Numerics"): the data's own
# rounding (σ_noise/σ_max ≈ 0.2·u: 1.3e-8 fp32, 1e-4 fp16, 8e-4 bf16) and the fp64
# Gram's (≈ 2e-8). A kept direction at the Gram floor can have its eigenvalue
# *under*-estimated, which blows up its coefficient (measured: ‖r‖ = 1e3·‖g‖ at rtol
# 1e-10), so every threshold sits at least 5x above both floors.
_DEFAULT_RTOL = {
    torch.float64: 1e-7,
    torch.float32: 1e-7,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}

# precision="fast" accumulates fp32 tiles, whose Gram resolves σ/σ_max only down to
# ~3e-4. When the cosine spectrum reaches below FAST_SIGMA_FLOOR (10x that), the fp32
# Gram cannot be trusted and the Gram is accumulated again in fp64 ("escalation").
FAST_SIGMA_FLOOR = 3e-3


def default_rtol(dtype: torch.dtype, precision: str = "fast") -> float:
    """Rank tolerance used when ``rtol=None``: a function of G's dtype (table above).

    The same for both precisions: the rank is always decided on a Gram that resolves it
    (precision="fast" escalates to fp64 accumulation below ``FAST_SIGMA_FLOOR``).
    """
    if precision not in ("fast", "high"):
        raise ValueError(f"precision must be 'fast' or 'high', got {precision!r}")
    try:
        return _DEFAULT_RTOL[dtype]
    except KeyError:
        raise ValueError(f"no default rtol for dtype={dtype}") from None


@dataclass
class GramSolve:
    """Pseudo-inverse of a Gram matrix on its numerical rank.

    pinv: (B, B) fp64 K⁺; rank: number of kept directions; sigma: (B,) singular values of
    the row-normalised G, descending (zeros for dropped zero rows); kept: (B,) bool rows
    with non-zero norm.
    """

    pinv: torch.Tensor
    rank: int
    sigma: torch.Tensor
    kept: torch.Tensor

    @property
    def sigma_ratio(self) -> float:
        """σ_min/σ_max over the non-zero rows (1.0 when there are none): how close the
        row-normalised G is to rank deficiency, whatever the threshold kept."""
        n = int(self.kept.sum())
        if n == 0 or self.sigma[0] <= 0:
            return 1.0
        return float(self.sigma[n - 1] / self.sigma[0])

    def coefficients(self, b: torch.Tensor) -> torch.Tensor:
        """c = K⁺ b, fp64 (B,)."""
        return self.pinv @ b.to(self.pinv.dtype)


@contextmanager
def _single_thread():
    """Run tiny LAPACK calls on one thread: with 2 threads on busy cores, eigh of a 65x65
    matrix took 17-80 ms instead of 0.7 ms (measured). Restores the thread count."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def gram_pinv(K: torch.Tensor, rtol: float) -> GramSolve:
    """Pseudo-inverse of the fp64 Gram K (B, B) on the rank decided by ``rtol`` (module doc).

    The B x B work runs on the CPU (one thread); ``pinv`` is returned on K's device.
    """
    if K.dtype != torch.float64:
        raise ValueError(f"gram_pinv expects an fp64 Gram, got {K.dtype}")
    device = K.device
    with _single_thread():
        solve = _gram_pinv_cpu(K.detach().cpu(), rtol)
    if device.type != "cpu":
        solve.pinv = solve.pinv.to(device)
    return solve


def _gram_pinv_cpu(K: torch.Tensor, rtol: float) -> GramSolve:
    B = K.shape[0]
    K = 0.5 * (K + K.T)
    d = torch.diagonal(K).clone()
    kept = d > 0
    pinv = torch.zeros_like(K)
    sigma = torch.zeros(B, dtype=K.dtype, device=K.device)
    idx = kept.nonzero().flatten()
    if idx.numel() == 0:
        return GramSolve(pinv, 0, sigma, kept)
    inv_sqrt_d = d[idx].rsqrt()
    C = K[idx][:, idx] * inv_sqrt_d[:, None] * inv_sqrt_d[None, :]
    lam, V = torch.linalg.eigh(C)  # ascending
    lam, V = lam.flip(0), V.flip(1)
    lam_max = lam[0].clamp_min(0)
    keep = lam > (rtol * rtol) * lam_max
    if lam_max <= 0:
        keep = torch.zeros_like(keep)
    rank = int(keep.sum())
    Vk = V[:, keep] * inv_sqrt_d[:, None]  # D^-1/2 V_k
    sub = (Vk / lam[keep]) @ Vk.T
    pinv[idx[:, None], idx[None, :]] = sub
    sigma[: lam.numel()] = lam.clamp_min(0).sqrt()
    return GramSolve(pinv, rank, sigma, kept)


def check_finite(K: torch.Tensor, b: torch.Tensor | None = None, what: str = "G or g") -> None:
    """Raise a clear ValueError when NaN/Inf reached the Gram (it shows up there for free)."""
    bad = not bool(torch.isfinite(K).all())
    if b is not None:
        bad = bad or not bool(torch.isfinite(b).all())
    if bad:
        raise ValueError(f"non-finite values (NaN or Inf) in {what}: the Gram/inner products are not finite")
