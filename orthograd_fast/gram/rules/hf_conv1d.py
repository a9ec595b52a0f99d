"""transformers' Conv1D (GPT-2, OpenAI GPT): y = x W + b, W (in, out) the transpose of
nn.Linear's, on rows x: (N, *, in), any number of leading dims.

Row r holds T = prod(*) positions; with D (N, *, out) the output gradient:

    dW_r = Σ_t x_{r,t}ᵀ D_{r,t}     (in x out)        db_r = Σ_t D_{r,t}     (out,)

dW_r is nn.Linear's formula Σ_t D'ᵀ x' (linear.py) with the two sides exchanged: x' = D,
D' = x. So the Linear rule's machinery gets each call's rows exchanged (``Conv1DRows``):
its input side is Conv1D's output gradient (d = out features), its gradient side Conv1D's
input (p = in features). What it forms from them is bilinear in the two sides, and comes
out in W's own (in, out) layout, without a transpose:

* the weight's Gram (matrix.py): the ghost's Σ (A_f·A_q)(D_f·D_q) is symmetric in the two
  sides; the explicit tiles X_s = Σ D'ᵀA' = Σ xᵀD are (in, out) like W;
* kept tiles and ``segment_grads``: X (S, in·out), flattened as W.view(-1);
* combine (LinearRule.combine): Σ_r w_r D'_rᵀA'_r = Σ_r w_r x_rᵀD_r, (in, out) like
  ``.grad`` and autograd's summed gradient that it accumulates into;
* the probe: the engine views W as (m, n) = (in, out) (base.probe_shape), u over input
  features and w over output features; LinearRule's Σ_f (D'_f·u)(A'_f·w) is
  Σ_f (x_f·u)(D_f·w) = uᵀ(Σ_f x_fᵀD_f)w, its noise term Σ_f |x_f|²|D_f|² symmetric.

The bias is not bilinear in the two sides: its per-row gradient is Σ_t D_{r,t} of the
output gradient (``Conv1DRows.bias_rows``; the bias probe's noise term Σ_f |D_f|²). The
ghost path's bias Gram, Pᵀ[D'D'ᵀ]P of its gradient side (matrix.gram_ghost), would be the
input's here, so the bias's Gram always comes from its per-row gradients (N·T·out adds
and an (S, out) GEMM; the explicit path, which GPT-2's sequence layers take, does so
anyway).

Detached weights (capture.py): Conv1D.forward reads ``self.weight``
(torch.addmm(self.bias, x.view(-1, in), self.weight)), so the engine's swap of
``module._parameters['weight']`` for a detached alias takes effect. ``unsupported`` runs
the class's forward once on a small fp64 stand-in and refuses (exact fallback) a Conv1D
whose forward is not x W + b with those attributes (another transformers version).

Matching: the exact class ``transformers.pytorch_utils.Conv1D``, by module path and name
(base.register_rule_by_name), so transformers is never imported here; a subclass, which
may override forward, goes to the exact fallback.
"""
from __future__ import annotations

import functools
import types

import torch

from . import matrix
from .base import GramOptions, Segments, gram_from_row_grads, register_rule_by_name, sq_norm
from .linear import LinearRows, LinearRule


class Conv1DRows(LinearRows):
    """matrix.MatrixRows of one Conv1D call: LinearRows with the sides exchanged (module
    docstring). ``x`` (N, T, out) holds Conv1D's output gradient and ``g`` (N, T, in) its
    input, so d = out, p = in and every tile is (in, out); ``dy`` is the output gradient
    under its own name (the bias reads it)."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor, cache: dict):
        super().__init__(g, x, cache)
        self.dy = self.x  # [N, T, out]

    def bias_rows(self) -> torch.Tensor:
        """(N, out) per-row bias gradients Σ_t D_{r,t} (cached on the call)."""
        if "bias_rows" not in self.cache:
            self.cache["bias_rows"] = self.dy.to(self.dtype).sum(1)
        return self.cache["bias_rows"]


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["x"]


@functools.lru_cache(maxsize=8)
def _forward_problem(forward) -> str | None:
    """Why ``forward`` (the class's function) is not y = x W + b, reading ``weight``
    (nx, nf), ``bias`` (nf,) and ``nf`` from the module, or None. Run once per function on
    an fp64 stand-in with nx = 3, nf = 2 and rows x (2, 2, 3): a different formula (another
    layout, a scale) is off by O(1), far above the 1e-12 allowed for rounding."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(2, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64)
    stand_in = types.SimpleNamespace(weight=W, bias=b, nf=2, nx=3)
    try:
        with torch.no_grad():
            y = forward(stand_in, x)
    except Exception as e:  # noqa: BLE001 - any failure: the forward is not the one this rule reads
        return f"its forward is not the x W + b this rule reads ({type(e).__name__}: {e})"
    want = x @ W + b  # [2, 2, 2]
    if not isinstance(y, torch.Tensor) or y.shape != want.shape or not bool(
        ((y - want).abs() <= 1e-12 * (x.abs() @ W.abs() + b.abs())).all()
    ):
        return "its forward does not compute x @ weight + bias (another transformers version?)"
    return None


@register_rule_by_name("transformers.pytorch_utils", "Conv1D")
class HFConv1DRule(LinearRule):
    """transformers.pytorch_utils.Conv1D (module docstring): LinearRule on exchanged rows;
    the bias's Gram from its per-row gradients."""

    kind = "hf_conv1d"

    @classmethod
    def unsupported(cls, module) -> str | None:
        W, b = getattr(module, "weight", None), getattr(module, "bias", None)
        nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != (nx, nf):
            return f"weight is not a (nx, nf) = ({nx}, {nf}) matrix"
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (nf,):
            return f"bias is not a ({nf},) vector"
        return _forward_problem(type(module).forward)

    def capture(self, module, args, kwargs, output):
        return _input(args, kwargs).detach()

    def detach_weight(self, args, kwargs, seg: Segments, opts: GramOptions, need_tiles: bool) -> bool:
        x = _input(args, kwargs)
        m = self.module
        # the output must still need a gradient (so its hook sees D): from x or the bias
        if x.dim() < 2 or not (x.requires_grad or m.bias.requires_grad):
            return False
        if not need_tiles:
            return True
        N, (d_in, d_out) = seg.N, m.weight.shape
        T = x.numel() // max(1, N * d_in)
        return matrix.keeps_tiles(N, T, 1, d_out, d_in, seg.S, x.numel() + N * T * d_out, opts)

    def _rows(self, calls) -> list[Conv1DRows]:
        return [Conv1DRows(c.saved, c.grad, c.cache) for c in calls if c.grad is not None]

    def grams(self, calls, seg: Segments, opts: GramOptions, tiles=None):
        """MatrixRule.grams for the weight, with the bias out of ``params`` meanwhile (so
        that the ghost path forms no bias Gram: it would be the input's, module docstring);
        the bias's Gram from its per-row gradients."""
        gb = self.params.pop("bias", None)
        try:
            out = super().grams(calls, seg, opts, tiles)
        finally:
            if gb is not None:
                self.params["bias"] = gb
        rows = self._rows(calls) if gb is not None else []
        if rows:
            out[gb] = gram_from_row_grads(self._bias_rows(rows), seg, opts.precision, tiles, gb)
            self.methods[gb] = f"{self.kind}:bias"
        return out

    def _probe_bias(self, rows, seg: Segments, probes, tiles, noise2=None) -> None:
        """MatrixRule._probe_bias with the noise term Σ_f |D_f|² of the output gradient (the
        caller's is of the exchanged gradient side, Conv1D's input)."""
        if self.local("bias") is not None and self.local("bias") not in self.skipped:
            noise2 = sum(float(sq_norm(r.dy)) for r in rows)
            super()._probe_bias(rows, seg, probes, tiles, noise2)
