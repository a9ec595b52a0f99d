"""nn.Linear: y = x Wᵀ + b on rows x: (N, *, d), any number of leading dims.

Row r holds T = prod(*) positions; per-row gradients (matrix.py for the Gram):

    dW_r = Σ_t D_{r,t}ᵀ x_{r,t}     (p x d)        db_r = Σ_t D_{r,t}     (p,)

The weight's Gram is ghost or explicit by the cost model; the bias is small, so its
per-row gradients (N, p) are formed and summed into segments. Per-tensor Grams are per
parameter tensor: no weight-bias cross term exists in <g_s, g_t> (a sum over parameters).

combine: Σ_s w_s g_s = Σ_rows w_seg(r) D_rᵀ x_r, one GEMM of the row-scaled D with x, over
only the rows whose weight differs from the most common one when autograd's summed
gradient of the step is still in ``.grad`` (base.dominant_weight).
"""
from __future__ import annotations

import torch
from torch import nn

from . import matrix
from .base import (
    Call,
    GramOptions,
    Probe,
    Rule,
    Segments,
    compute_dtype,
    dominant_weight,
    gram_from_row_grads,
    probe_row_grads,
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

    def bias_rows(self) -> torch.Tensor:
        """(N, p) per-row bias gradients Σ_t D_{r,t} (cached on the call)."""
        if "bias_rows" not in self.cache:
            self.cache["bias_rows"] = self.g.to(self.dtype).sum(1)
        return self.cache["bias_rows"]

    def segment_tile(self, idx, p0, p1, d0, d1):
        x = matrix.take(self.x, idx).reshape(-1, self.d)[:, d0:d1].to(self.dtype)  # [n·T, td]
        g = matrix.take(self.g, idx).reshape(-1, self.p)[:, p0:p1].to(self.dtype)  # [n·T, tp]
        return (g.T @ x).unsqueeze(0)  # [1, tp, td]

    def chunk(self, idx):
        A = matrix.take(self.x, idx).transpose(1, 2).unsqueeze(1)  # [n, 1, d, T]
        D = matrix.take(self.g, idx).transpose(1, 2).unsqueeze(1)  # [n, 1, p, T]
        return A, D


@register_rule(nn.Linear)
class LinearRule(Rule):
    kind = "linear"

    def capture(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        return x.detach()

    def batch_rows(self, saved) -> int:
        return saved.shape[0] if saved.dim() >= 2 else -1

    def _rows(self, calls: list[Call]) -> list[LinearRows]:
        return [LinearRows(c.saved, c.grad, c.cache) for c in calls if c.grad is not None]

    def grams(self, calls, seg: Segments, opts: GramOptions):
        rows = self._rows(calls)
        out = {}
        gw, gb = self.local("weight"), self.local("bias")
        if gw is not None:
            if rows:
                method = matrix.choose_method(rows, seg, opts)
                out[gw] = matrix.gram(rows, seg, opts, method)
                self.methods[gw] = f"linear:{method}"
        if gb is not None and rows:
            out[gb] = gram_from_row_grads(self._bias_rows(rows), seg, opts.precision)
            self.methods[gb] = "linear:bias"
        return out

    @staticmethod
    def _bias_rows(rows: list[LinearRows]) -> torch.Tensor:
        return sum(r.bias_rows() for r in rows)  # [N, p]

    def combine(self, calls, seg: Segments, weights, totals):
        rows = self._rows(calls)
        out = {}
        gw, gb = self.local("weight"), self.local("bias")
        if gw is not None and rows:
            r0 = rows[0]
            wr = seg.row_weights(weights[gw], r0.device, r0.dtype)
            dom = dominant_weight(wr) if totals.get(gw) is not None else None
            if dom is not None:  # w*·G + Σ over the other rows (base.dominant_weight)
                w_star, idx = dom
                total = totals[gw]
                # in place in autograd's .grad, which combine overwrites anyway: no new
                # (p, d) buffer (fresh pages cost as much as the GEMM on a small VM)
                out[gw] = total.mul_(w_star) if total.dtype == r0.dtype else w_star * total.to(r0.dtype)
                wr = wr[idx] - w_star
            else:
                idx = slice(None)
            for r in rows:
                x = matrix.take(r.x, idx).reshape(-1, r.d).to(r.dtype)
                Dw = (matrix.take(r.g, idx).to(r.dtype) * wr[:, None, None]).reshape(-1, r.p)
                if gw in out:
                    out[gw].addmm_(Dw.T, x)
                else:
                    out[gw] = Dw.T @ x  # [p, d]
        if gb is not None:
            for r in rows:
                gB = seg.row_weights(weights[gb], r.device, r.dtype) @ r.bias_rows()
                out[gb] = out[gb] + gB if gb in out else gB
        return out

    def probe(self, calls, seg: Segments, probes: dict[str, Probe]) -> None:
        """Weight: Σ_f (D_f·u)(x_f·w) over all positions f; bias: Σ_f D_f·w (Probe docstring)."""
        rows = self._rows(calls)
        if not rows:
            return
        gw, gb = self.local("weight"), self.local("bias")
        if gw is not None:
            pr = probes[gw]
            for r in rows:
                x = r.x.reshape(-1, r.d).to(r.dtype)
                g = r.g.reshape(-1, r.p).to(r.dtype)
                Aw = (x @ pr.w.to(x.device, r.dtype)).double()  # [F]
                Du = (g @ pr.u.to(g.device, r.dtype)).double()  # [F]
                pr.add(float(Aw @ Du), float(sq_norm(x, 1) @ sq_norm(g, 1)), x.shape[0])
        if gb is not None:
            noise2 = sum(float(sq_norm(r.g)) for r in rows)
            count = sum(r.N * r.T for r in rows)
            probe_row_grads(probes[gb], self._bias_rows(rows), noise2, count)
