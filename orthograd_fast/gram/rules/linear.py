"""nn.Linear: y = x Wᵀ + b on rows x: (N, *, d), any number of leading dims.

Row r holds T = prod(*) positions; per-row gradients (matrix.py for the Gram):

    dW_r = Σ_t D_{r,t}ᵀ x_{r,t}     (p x d)        db_r = Σ_t D_{r,t}     (p,)

The weight's Gram is ghost or explicit by the cost model; the bias is small, so its
per-row gradients (N, p) are formed and summed into segments. Per-tensor Grams are per
parameter tensor: no weight-bias cross term exists in <g_s, g_t> (a sum over parameters).

combine: Σ_s w_s g_s = Σ_rows w_seg(r) D_rᵀ x_r, one GEMM of the row-scaled D with x, over
only the rows whose weight differs from the most common one when autograd's summed
gradient of the step is still in ``.grad`` (base.dominant_weight); or, when the explicit
Gram kept the segment gradients (matrix.py, "Kept tiles"), Σ_s w_s X_s in the engine.
On every backend combine is this torch GEMM (cuBLAS on CUDA): the row-scaled matmul
measured faster than the Triton combination kernel (kernels/gram_combine.py) on every
benchmark layer of an H200, 1.04-3x (matrix_triton.py); the Grams alone take the kernels.
"""
from __future__ import annotations

import torch
from torch import nn

from . import matrix
from .base import (
    Call,
    GramOptions,
    Probe,
    Segments,
    compute_dtype,
    dominant_weight,
    probe_tiles,
    register_rule,
    sq_norm,
)


class LinearRows:
    """matrix.MatrixRows of one Linear call: A (n, 1, d, T), D (n, 1, p, T) as views."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor, cache: dict):
        self.cache = cache
        self.N = x.shape[0]
        self.d = x.shape[-1]
        self.p = g.shape[-1]
        self.G = 1
        self.x = x.reshape(self.N, -1, self.d)  # [N, T, d]
        self.g = g.reshape(self.N, -1, self.p)  # [N, T, p]
        self.T = self.x.shape[1]
        self.device = x.device
        self.dtype = compute_dtype(x, g)

    def held(self) -> int:
        return self.x.numel() + self.g.numel()

    def bias_rows(self) -> torch.Tensor:
        """(N, p) per-row bias gradients Σ_t D_{r,t} (cached on the call)."""
        if "bias_rows" not in self.cache:
            self.cache["bias_rows"] = self.g.to(self.dtype).sum(1)
        return self.cache["bias_rows"]

    def segment_tile(self, idx, p0, p1, d0, d1):
        x = matrix.take(self.x, idx).reshape(-1, self.d)[:, d0:d1].to(self.dtype)  # [n·T, td]
        g = matrix.take(self.g, idx).reshape(-1, self.p)[:, p0:p1].to(self.dtype)  # [n·T, tp]
        return (g.T @ x).unsqueeze(0)  # [1, tp, td]

    def row_tiles(self, idx, p0, p1, d0, d1, out=None):
        return matrix.row_tiles_from_chunk(self, idx, p0, p1, d0, d1, out)

    def chunk(self, idx):
        A = matrix.take(self.x, idx).transpose(1, 2).unsqueeze(1)  # [n, 1, d, T]
        D = matrix.take(self.g, idx).transpose(1, 2).unsqueeze(1)  # [n, 1, p, T]
        return A, D


@register_rule(nn.Linear)
class LinearRule(matrix.MatrixRule):
    kind = "linear"

    def capture(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        return x.detach()

    def detach_weight(self, args, kwargs, seg: Segments, opts: GramOptions, need_tiles: bool) -> bool:
        x = args[0] if args else kwargs["input"]
        m = self.module
        # the output must still need a gradient (so its hook sees D): from x or the bias
        if x.dim() < 2 or not (x.requires_grad or (m.bias is not None and m.bias.requires_grad)):
            return False
        if not need_tiles:
            return True
        N, d, p = seg.N, m.in_features, m.out_features
        T = x.numel() // max(1, N * d)
        return matrix.keeps_tiles(N, T, 1, d, p, seg.S, x.numel() + N * T * p, opts)

    def _rows(self, calls: list[Call]) -> list[LinearRows]:
        return [LinearRows(c.saved, c.grad, c.cache) for c in calls if c.grad is not None]

    def combine(self, calls, seg: Segments, weights, totals):
        rows = self._rows(calls)
        out = {}
        gw = self.local("weight")
        if gw in weights and rows:
            r0 = rows[0]
            wr = seg.row_weights(weights[gw], r0.device, r0.dtype)
            dom = dominant_weight(wr) if totals.get(gw) is not None else None
            if dom is not None:  # w*·G + Σ over the other rows (base.dominant_weight)
                w_star, idx = dom
                # accumulate in place in autograd's .grad, which combine overwrites anyway: no
                # new (p, d) buffer (fresh pages cost as much as the GEMM on a small VM); the
                # first GEMM scales it by w* (beta)
                total, beta = totals[gw], float(w_star)
                if total.dtype != r0.dtype:
                    total, beta = beta * total.to(r0.dtype), 1.0
                wr = wr[idx] - w_star
                idx = matrix.as_slice(idx)
            else:
                total, beta, idx = None, 0.0, slice(None)
            for r in rows:
                x = matrix.take(r.x, idx).reshape(-1, r.d).to(r.dtype)
                Dw = (matrix.take(r.g, idx).to(r.dtype) * wr[:, None, None]).reshape(-1, r.p)
                if total is None:
                    total, beta = Dw.T @ x, 1.0  # [p, d]
                else:
                    total.addmm_(Dw.T, x, beta=beta)
                    beta = 1.0
            if beta != 1.0:  # no row outside the dominant weight
                total.mul_(beta)
            out[gw] = total
        self._combine_bias(rows, seg, weights, out)
        return out

    def probe(self, calls, seg: Segments, probes: dict[str, Probe], tiles=None) -> None:
        """Weight: Σ_f (D_f·u)(x_f·w) over all positions f, or uᵀ(Σ_s X_s)w from the kept
        tiles plus that sum over the ignored rows; bias: Σ_f D_f·w (Probe docstring). The
        noise term Σ_f |x_f|²|D_f|² is reduced on the (N, T, ·) views (no row copies)."""
        rows = self._rows(calls)
        if not rows:
            return
        tiles = tiles or {}
        gw = self.local("weight")
        g_sq = []  # Σ_f |D_f|² per call, for the bias's noise term
        if gw is not None and gw not in self.skipped:  # a detached weight needs no probe
            pr = probes[gw]
            if gw in tiles:
                pr.add(probe_tiles(pr, tiles[gw]), 0.0, 0)
                ign = seg.ignored_rows(rows[0].device)
            for r in rows:
                x, g = _flat(r.x, r.g)
                gg = sq_norm(g, -1)  # [N, T] or [N·T]
                noise2 = float((sq_norm(x, -1) * gg).sum())
                g_sq.append(float(gg.sum()))
                if gw not in tiles:
                    value = _probe_value(x, g, pr)
                elif ign.numel():
                    value = _probe_value(r.x.index_select(0, ign), r.g.index_select(0, ign), pr)
                else:
                    value = 0.0
                pr.add(value, noise2, r.N * r.T)
        self._probe_bias(rows, seg, probes, tiles, sum(g_sq) if g_sq else None)


def _flat(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T, ·) rows x, g as (n·T, ·) when both reshapes are views, else as they are
    (attention's rows are (L, N)-ordered: a reshape would copy them)."""
    if x.is_contiguous() and g.is_contiguous():
        return x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return x, g


def _probe_value(x: torch.Tensor, g: torch.Tensor, pr: Probe) -> float:
    """Σ_f (g_f·u)(x_f·w) over the positions f of rows x: (..., d), g: (..., p)."""
    dt = compute_dtype(x, g)
    Aw = (x.to(dt) @ pr.w.to(x.device, dt)).double()  # [...]
    Du = (g.to(dt) @ pr.u.to(g.device, dt)).double()  # [...]
    return float((Aw * Du).sum())
