"""``project_orthogonal``: remove from g its component in the span of the rows of G.

Algorithm (DESIGN.md §2-3), never forming an orthonormal basis:

    pass 1   K = G Gᵀ (B, B), b = G g (B,), ‖g‖²       one fused pass over G, fp64 result
    solve    c = K⁺ b, K⁺ the pseudo-inverse on the numerical rank (``linalg.gram_pinv``)
    pass 2   r = g - Gᵀ c, and G r in the same pass     (G r feeds the refinement / info)
    refine   c' = K⁺ (G r);  r ← r - Gᵀ c'              one more pass each (``refine`` times)

NaN/Inf in g or G shows up in K, b or ‖g‖² and raises there: no extra pass. The backends
differ only in how the passes run: ``torch`` (chunked GEMMs, the CPU production path) or
``triton`` (``orthograd_fast.kernels.projection``; CUDA, or the CPU interpreter in tests).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .linalg import FAST_SIGMA_FLOOR, check_finite, default_rtol, gram_pinv

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "torch", "triton", "cuda")
_PRECISIONS = ("fast", "high")


@dataclass
class ProjectionInfo:
    """What ``project_orthogonal(..., return_info=True)`` reports.

    coefficients: (B,) fp64 c with r = g - Gᵀc; rank: numerical rank used; orthogonality:
    ‖G r‖ / (‖G‖₂ ‖r‖) of the returned r (0 when r = 0), measured during the last pass in
    the work precision (fp32 tile sums for "fast": absolute accuracy ~1e-7); sigma: (B,) singular values of the
    row-normalised G; rtol: the tolerance applied; backend: the backend that ran;
    gram_dtype: the accumulation the solve used (precision="fast" escalates from fp32
    tiles to fp64 when σ_min/σ_max < ``FAST_SIGMA_FLOOR``).
    """

    coefficients: torch.Tensor
    rank: int
    orthogonality: float
    sigma: torch.Tensor
    rtol: float
    backend: str
    gram_dtype: torch.dtype


# --------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------
def _prepare(g, G):
    """Validate and flatten. Returns (gs [P_i], Gs [(B, P_i)], shapes, single, B, device)."""
    if isinstance(g, torch.Tensor) != isinstance(G, torch.Tensor):
        raise ValueError(
            "g and G must both be tensors or both be sequences of tensors, got "
            f"{type(g).__name__} and {type(G).__name__}"
        )
    single = isinstance(g, torch.Tensor)
    if single:
        gs, Gs = [g], [G]
    else:
        if not isinstance(g, Sequence) or not isinstance(G, Sequence):
            raise ValueError("g and G must be tensors or sequences (list/tuple) of tensors")
        gs, Gs = list(g), list(G)
        if len(gs) != len(Gs):
            raise ValueError(f"g has {len(gs)} tensors but G has {len(Gs)}: they must match one to one")
        if len(gs) == 0:
            raise ValueError("g and G are empty sequences: nothing to project")
        for i, (x, X) in enumerate(zip(gs, Gs)):
            if not isinstance(x, torch.Tensor) or not isinstance(X, torch.Tensor):
                raise ValueError(f"element {i} of g or G is not a tensor")
    device = gs[0].device
    B = None
    for i, (x, X) in enumerate(zip(gs, Gs)):
        where = "" if single else f" (element {i})"
        for name, t in (("g", x), ("G", X)):
            if t.dtype not in _FLOAT_DTYPES:
                raise ValueError(
                    f"{name}{where} has dtype {t.dtype}; expected a floating dtype "
                    "(float16, bfloat16, float32 or float64)"
                )
            if t.device != device:
                raise ValueError(f"all tensors must be on one device: {name}{where} is on {t.device}, g on {device}")
        if X.dim() != x.dim() + 1 or tuple(X.shape[1:]) != tuple(x.shape):
            raise ValueError(
                f"G{where} must have shape (B, *g.shape) = (B, {', '.join(map(str, x.shape))}); "
                f"got G {tuple(X.shape)} for g {tuple(x.shape)}"
            )
        if B is None:
            B = X.shape[0]
        elif X.shape[0] != B:
            raise ValueError(f"every G must have the same leading dim B: element 0 has {B}, element {i} has {X.shape[0]}")
    flat_g = [x.reshape(-1) for x in gs]
    flat_G = [X.reshape(B, x.numel()) for x, X in zip(gs, Gs)]
    return flat_g, flat_G, [x.shape for x in gs], single, B, device


def _triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(
            f"backend='triton' cannot run on {device}: it needs Triton and CUDA tensors "
            "(or TRITON_INTERPRET=1 with CPU tensors, the interpreter used by the tests)"
        )
    if backend == "cuda":
        raise ValueError(
            "backend='cuda' is not available: the CUDA C++ extension (csrc/) is not built in "
            "this release; use backend='triton' or 'torch'"
        )
    return backend


def _ops(backend: str):
    if backend == "triton":
        from .kernels import projection as ops
    else:
        from . import _torch_projection as ops
    return ops


# --------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------
def project_orthogonal(
    g,
    G,
    *,
    rtol: float | None = None,
    refine: int = 1,
    precision: str = "fast",
    backend: str = "auto",
    return_info: bool = False,
):
    """Return g minus its orthogonal projection onto the span of the rows of G.

    g: tensor of any shape S; G: (B, *S), one row per vector to project against. Or g a
    sequence of tensors and G a matching sequence (same B each): projected jointly, as one
    concatenated vector. Returns g's structure, dtype and device; inputs are never modified.

    rtol: rank tolerance on σ_k/σ_max of the row-normalised G (None: ``default_rtol`` of
    G's dtype). refine: at most this many refinement passes, each one more read of G; a
    pass is skipped when the previous one measured orthogonality at the work precision's
    floor (2·u).
    precision: "fast" (Gram from fp32 tiles summed in fp64, escalated to an fp64 Gram when
    σ_min/σ_max < 3e-3; combination in fp32) or "high" (K, b and the combination exact in
    fp64). fp64 inputs are always handled in fp64. backend: "auto" | "torch" | "triton" | "cuda". return_info: also return
    a :class:`ProjectionInfo`.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be a non-negative int, got {refine!r}")
    gs, Gs, shapes, single, B, device = _prepare(g, G)
    if rtol is None:
        narrowest = min((X.dtype for X in Gs), key=lambda d: torch.finfo(d).bits)
        rtol = default_rtol(narrowest)
    elif not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be a float in [0, 1), got {rtol!r}")
    name = _pick_backend(backend, device)
    ops = _ops(name)
    out_dtypes = [x.dtype for x in gs]
    work = torch.float64 if precision == "high" or any(
        t.dtype == torch.float64 for t in (*gs, *Gs)
    ) else torch.float32

    if B == 0:
        for x in gs:
            if not bool(torch.isfinite(x).all()):
                raise ValueError("non-finite values (NaN or Inf) in g")
        rs = [x.clone() for x in gs]
        coef = torch.zeros(0, dtype=torch.float64, device=device)
        info = ProjectionInfo(coef, 0, 0.0, coef.clone(), float(rtol), name, work)
        return _finish(rs, shapes, single, info if return_info else None)

    K, b, gg = ops.gram(gs, Gs, work)
    check_finite(K, torch.cat([b, gg.reshape(1)]))
    solve = gram_pinv(K, rtol)
    gram_dtype = work
    if work != torch.float64 and solve.sigma_ratio < FAST_SIGMA_FLOOR:
        # the fp32-tile Gram cannot resolve this spectrum: accumulate it again in fp64
        K, b, gg = ops.gram(gs, Gs, torch.float64)
        solve = gram_pinv(K, rtol)
        gram_dtype = torch.float64
    c = solve.coefficients(b)
    norm_G = float(torch.linalg.eigvalsh(0.5 * (K + K.T).cpu())[-1].clamp_min(0).sqrt())
    # A refinement pass is skipped when the pass before it already measured orthogonality
    # at the work precision's floor and wrote the output dtype (nothing left to gain).
    skip_below = 2 * torch.finfo(work).eps / 2
    passes = refine + 1
    rs = gs
    coef = torch.zeros_like(c)
    Gr = rr = None
    for i in range(passes):
        last = i == passes - 1
        dtypes = out_dtypes if last or all(d == work for d in out_dtypes) else [work] * len(gs)
        rs, Gr, rr = ops.combine(rs, Gs, c, work, dtypes, want_Gr=(not last) or return_info)
        coef += c
        if last or (dtypes == out_dtypes and _orthogonality(Gr, rr, norm_G) <= skip_below):
            break
        c = solve.coefficients(Gr)
    info = None
    if return_info:
        orth = _orthogonality(Gr, rr, norm_G)
        info = ProjectionInfo(coef, solve.rank, orth, solve.sigma, float(rtol), name, gram_dtype)
    return _finish(rs, shapes, single, info)


def _orthogonality(Gr: torch.Tensor, rr: torch.Tensor, norm_G: float) -> float:
    """‖G r‖ / (‖G‖₂ ‖r‖) from a combine pass's G r and ‖r‖² (0 when r = 0)."""
    denom = norm_G * float(rr.sqrt())
    return float(Gr.norm()) / denom if denom > 0 else 0.0


def _finish(rs, shapes, single, info):
    out = [r.reshape(s) for r, s in zip(rs, shapes)]
    result = out[0] if single else out
    return (result, info) if info is not None else result
