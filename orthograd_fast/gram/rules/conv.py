"""nn.Conv1d / nn.Conv2d: a matrix layer on unfolded patches.

The module pads its input (``_reversed_padding_repeated_twice``: this covers integer
padding, 'same' with its asymmetric split, and every ``padding_mode``), then runs a
padding-free convolution. So with xp = pad(x):

    patches A = unfold(xp, kernel, dilation, stride)        (N, C_in·prod(k), L)
    group g:  A_g = A[:, g·d:(g+1)·d]  (d = C_in/G·prod(k)),  D_g = grad_out[:, g·p:(g+1)·p]
    dW_g,r = Σ_l D_g[r, :, l] ⊗ A_g[r, :, l]                 (p x d) = W_g's per-row gradient

i.e. a matrix layer with T = L output positions and G groups (matrix.py); the weight
(C_out, C_in/G, *k) viewed as (C_out, d) stacks the W_g. Conv1d runs as a 2-D conv of
height 1. Patches are unfolded in row chunks inside the Gram, never for the whole batch.

combine uses the convolution's own weight-gradient kernel on row-scaled output gradients
(``aten.convolution_backward``, output_mask (False, True, False)): no patches at all; like
Linear, only over the rows whose weight differs from the most common one when autograd's
summed gradient is known (base.dominant_weight); or Σ_s w_s X_s in the engine when the
explicit Gram kept the segment gradients (matrix.py, "Kept tiles"). On every backend
(backend="triton" included: its kernels form the Grams from the unfolded patches,
matrix_triton.py) combine is this weight-gradient convolution: on an H200 it beat the
Triton combination kernel on every convolution of bench/gpu_gram_bench.py, as the scaled
GEMM did on every Linear (kernels/gram_combine.py). The
probe uᵀ(ΣdW)w = Σ_{r,l,g} (D_g·u_g)(A_g·w) is a depthwise conv of a channel
contraction of xp (the probe's w is v ⊗ k, rules.base.Probe).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import matrix
from .base import (
    GramOptions,
    Probe,
    Segments,
    compute_dtype,
    dominant_weight,
    probe_tiles,
    register_rule,
)


def _pad(module, x: torch.Tensor) -> torch.Tensor:
    pad = list(module._reversed_padding_repeated_twice)
    if not any(pad):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pad, mode=mode)



def _row_major(t: torch.Tensor) -> torch.Tensor:
    """t with exactly row-major strides. A tensor can be "contiguous" with odd strides on its
    size-1 dims ((1, 4, 1) with strides (4, 1, 2)); CPU's slow_conv2d weight-gradient kernel
    then allocates a grad_weight in that layout and raises "grad_weight must be contiguous"
    (found by the property test: Conv1d, kernel 2, padding 1 on a length-1 input, fp64)."""
    want, acc = [], 1
    for size in reversed(t.shape):
        want.append(acc)
        acc *= size
    return t if list(t.stride()) == want[::-1] else t.clone(memory_format=torch.contiguous_format)

class ConvRows:
    """matrix.MatrixRows of one conv call; unfolds patches per row chunk."""

    def __init__(self, module, x: torch.Tensor, g: torch.Tensor, cache: dict):
        self.cache = cache
        self.m = module
        self.nd = x.dim() - 2
        self.x = x
        self.N = x.shape[0]
        self.G = module.groups
        k = math.prod(module.kernel_size)
        self.d = (module.in_channels // self.G) * k
        self.p = module.out_channels // self.G
        self.L = math.prod(g.shape[2:])
        self.out_shape = tuple(g.shape[2:])
        self.out_hw = self.out_shape if g.dim() == 4 else (1, g.shape[2])
        self.T = self.L
        self.g = g.reshape(self.N, self.G, self.p, self.L)  # [N, G, p, L]
        self.device = x.device
        self.dtype = compute_dtype(x, g)
        if self.nd == 1:
            self.kernel = (1, module.kernel_size[0])
            self.dilation = (1, module.dilation[0])
            self.stride = (1, module.stride[0])
        else:
            self.kernel, self.dilation, self.stride = module.kernel_size, module.dilation, module.stride

    def held(self) -> int:
        return self.x.numel() + self.g.numel()

    def xp(self, idx) -> torch.Tensor:
        """Padded input of rows idx (the whole batch is padded once per call and cached)."""
        if "xp" not in self.cache:
            self.cache["xp"] = _pad(self.m, self.x)
        return matrix.take(self.cache["xp"], idx)

    def conv_input(self, idx) -> tuple[torch.Tensor, list[int]]:
        """(input rows idx, padding) for the convolution's weight-gradient kernel, in the
        compute dtype: with zero padding, equal on both sides, the unpadded rows and the
        module's padding (the kernel pads implicitly: no padded copy of the activation),
        else the padded rows and no padding."""
        pads = self.m._reversed_padding_repeated_twice  # F.pad order: last spatial dim first
        if self.m.padding_mode == "zeros" and all(pads[2 * j] == pads[2 * j + 1] for j in range(self.nd)):
            x, padding = matrix.take(self.x, idx), [pads[2 * (self.nd - 1 - i)] for i in range(self.nd)]
        else:
            x, padding = self.xp(idx), [0] * self.nd
        return x.to(self.dtype), padding

    def bias_rows(self) -> torch.Tensor:
        """(N, C_out) per-row bias gradients Σ_l D[r, :, l] (cached on the call)."""
        if "bias_rows" not in self.cache:
            self.cache["bias_rows"] = self.g.to(self.dtype).sum(-1).reshape(self.N, -1)
        return self.cache["bias_rows"]

    def segment_tile(self, idx, p0, p1, d0, d1):
        """The whole weight's tile is the convolution's own weight gradient over those rows
        (no patches); a partial tile goes through the generic patch GEMM."""
        if (p0, p1, d0, d1) != (0, self.p, 0, self.d):
            return matrix.segment_tile_from_chunk(self, idx, p0, p1, d0, d1)
        m = self.m
        x, padding = self.conv_input(idx)
        g = matrix.take(self.g, idx).reshape(x.shape[0], -1, *self.out_shape).to(self.dtype)
        gW = torch.ops.aten.convolution_backward(
            g, x, m.weight.detach().to(self.dtype), None, m.stride, padding, m.dilation, False,
            [0] * self.nd, self.G, (False, True, False),
        )[1]
        return gW.reshape(self.G, self.p, self.d)

    def row_tiles(self, idx, p0, p1, d0, d1, out=None):
        """Whole-weight tiles: the weight gradient of one grouped convolution with the rows
        as n·G groups (input (1, n·C_in, ...), output gradient (1, n·C_out, ...)): as fast
        as unfold + batched GEMM within a step on CPU (measured), without the (n, d, L)
        patch copy; a partial tile unfolds patches (matrix.row_tiles_from_chunk)."""
        if (p0, p1, d0, d1) != (0, self.p, 0, self.d):
            return matrix.row_tiles_from_chunk(self, idx, p0, p1, d0, d1, out)
        m = self.m
        x, padding = self.conv_input(idx)
        n = x.shape[0]
        g = matrix.take(self.g, idx).to(self.dtype)  # [n, G, p, L]
        kernel = m.kernel_size
        gW = torch.ops.aten.convolution_backward(
            _row_major(g.reshape(1, n * m.out_channels, *self.out_shape)),
            _row_major(x.reshape(1, n * m.in_channels, *x.shape[2:])),
            x.new_empty((1,) * (2 + self.nd)).expand(n * m.out_channels, m.in_channels // self.G, *kernel), None,
            m.stride, padding, m.dilation, False, [0] * self.nd, n * self.G, (False, True, False),
        )[1]
        R = gW.reshape(n, self.G, self.p, self.d)
        return R if out is None else out.copy_(R)

    def chunk(self, idx):
        xp = self.xp(idx)
        if self.nd == 1:
            xp = xp.unsqueeze(2)
        n, C, _, _ = xp.shape
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        Ho, Wo = self.out_hw
        sN, sC, sH, sW = xp.stride()
        # patches as a strided view [n, C, kh, kw, Ho, Wo], then one copy: F.unfold's im2col
        # is several times slower on CPU
        A = xp.as_strided((n, C, kh, kw, Ho, Wo), (sN, sC, dh * sH, dw * sW, sh * sH, sw * sW))
        A = A.reshape(n, self.G, self.d, self.L)  # [n, G, d, L]
        return A, matrix.take(self.g, idx)


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(matrix.MatrixRule):
    kind = "conv"

    def __init__(self, module, path, params):
        super().__init__(module, path, params)
        self.kind = type(module).__name__.lower()

    def capture(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        return x.detach()

    rows_at = "dim0"

    def batched(self, t) -> bool:
        return t.dim() == (3 if isinstance(self.module, nn.Conv1d) else 4)

    def detach_weight(self, args, kwargs, seg: Segments, opts: GramOptions, need_tiles: bool) -> bool:
        x = args[0] if args else kwargs["input"]
        m = self.module
        nd = 1 if isinstance(m, nn.Conv1d) else 2
        # (an output that would need no gradient is anchored by the engine: anchors_output)
        if x.dim() != nd + 2:
            return False
        if not need_tiles:
            return True
        pads = m._reversed_padding_repeated_twice  # F.pad order: last spatial dim first
        L = 1
        for i, size in enumerate(x.shape[2:]):
            j = nd - 1 - i
            span = size + pads[2 * j] + pads[2 * j + 1] - m.dilation[i] * (m.kernel_size[i] - 1) - 1
            L *= max(0, span // m.stride[i] + 1)
        G, N = m.groups, x.shape[0]
        d, p = (m.in_channels // G) * math.prod(m.kernel_size), m.out_channels // G
        return matrix.keeps_tiles(N, L, G, d, p, seg.S, x.numel() + N * m.out_channels * L, opts)

    #: a first layer (input without gradient) runs fully detached, its output anchored
    anchors_output = True

    def detach_bias(self, args, kwargs) -> bool:
        """With the weight detached, detach the bias too: the CPU convolution backward forms
        the weight gradient whenever the bias needs one (32→64 channels, stride 2, 28x28,
        128 rows, one thread: 64.5 ms forward + backward with or without the weight
        gradient, 51.4 ms with neither; a first layer 1→32, whose input needs no gradient:
        44 ms with the bias's gradient only, 16 ms for the forward alone). The bias's Gram,
        ``.grad`` and combination come from the output gradients the rule records anyway
        (ConvRows.bias_rows); a layer whose input needs no gradient has its output anchored
        by the engine (Rule.anchors_output)."""
        return True

    def _rows(self, calls) -> list[ConvRows]:
        return [ConvRows(self.module, c.saved, c.grad, c.cache) for c in calls if c.grad is not None]

    def combine(self, calls, seg: Segments, weights, totals):
        m = self.module
        out = {}
        gw = self.local("weight")
        rows = self._rows(calls)
        if gw in weights and rows:
            r0 = rows[0]
            wr = seg.row_weights(weights[gw], r0.device, r0.dtype)
            dom = dominant_weight(wr) if totals.get(gw) is not None else None
            if dom is not None:  # w*·G + Σ over the other rows (base.dominant_weight)
                w_star, idx = dom
                total = totals[gw]
                out[gw] = total.mul_(w_star) if total.dtype == r0.dtype else w_star * total.to(r0.dtype)
                wr = wr[idx] - w_star
                idx = matrix.as_slice(idx)
            else:
                idx = slice(None)
            for r in rows:
                x, padding = r.conv_input(idx)
                if x.shape[0] == 0:
                    continue
                g = matrix.take(r.g, idx).reshape(x.shape[0], -1, *r.out_shape).to(r.dtype)
                Dw = g * wr.view((-1,) + (1,) * (g.dim() - 1))
                gW = torch.ops.aten.convolution_backward(
                    Dw, x, m.weight.detach().to(r.dtype), None, m.stride, padding,
                    m.dilation, False, [0] * r.nd, m.groups, (False, True, False),
                )[1]
                out[gw] = out[gw] + gW if gw in out else gW
        self._combine_bias(rows, seg, weights, out)
        return out

    def probe_factors(self, local_name: str) -> tuple[int, ...]:
        if local_name == "weight":
            return (self.module.in_channels // self.module.groups, math.prod(self.module.kernel_size))
        return ()

    def probe(self, calls, seg: Segments, probes: dict[str, Probe], tiles=None) -> None:
        """Weight probe u ⊗ (v ⊗ k): Σ_{r,l,g} (D_g·u_g)(A_g·(v ⊗ k)), where A_g·(v ⊗ k) is the
        depthwise conv, kernel k, of the channel contraction Σ_c v_c xp[:, g, c]; or, with
        the kept tiles, uᵀ(Σ_s X_s)w plus that sum over the ignored rows only. The noise term
        Σ_{r,l,g} |D_g|²|A_g|² uses the depthwise conv of Σ_c xp² with ones (Probe docstring)."""
        rows = self._rows(calls)
        if not rows:
            return
        tiles = tiles or {}
        gw = self.local("weight")
        if gw is not None and gw not in self.skipped:  # a detached weight needs no probe
            pr = probes[gw]
            ign = None
            if gw in tiles:
                pr.add(probe_tiles(pr, tiles[gw]), 0.0, 0)
                ign = seg.ignored_rows(rows[0].device)
            for r in rows:
                value, noise2 = self._probe_rows(r, pr, ign)
                pr.add(value, noise2, r.N * r.L)
        self._probe_bias(rows, seg, probes, tiles)

    def _probe_rows(self, r: ConvRows, pr: Probe, value_rows) -> tuple[float, float]:
        """(Σ over rows of (D_g·u_g)(A_g·w), noise2 over all rows) for one call; the value
        only over ``value_rows`` (index tensor) when given."""
        m = self.module
        v, k = pr.w_factors
        conv = F.conv1d if r.nd == 1 else F.conv2d
        G = m.groups
        xp = r.xp(slice(None)).to(r.dtype)
        spatial = xp.shape[2:]
        xg = xp.reshape(r.N, G, -1, math.prod(spatial))  # [N, G, C/G, HW]
        kern = k.to(xp.device, r.dtype).view(1, 1, *m.kernel_size).expand(G, 1, *m.kernel_size)
        # channel contractions as matmuls: middle-dim reductions are ~10x slower on CPU
        x2 = torch.matmul(xg.new_ones((1, 1, 1, xg.shape[2])), xg.square()).view(r.N, G, *spatial)
        A2 = conv(x2, torch.ones_like(kern), None, m.stride, 0, m.dilation, G).reshape(r.N, G, -1)
        D = r.g.to(r.dtype)  # [N, G, p, L]
        D2 = torch.matmul(D.new_ones((1, 1, 1, r.p)), D.square()).squeeze(2)  # [N, G, L]
        noise2 = float((D2.double() * A2.double()).sum())
        if value_rows is not None:
            if value_rows.numel() == 0:
                return 0.0, noise2
            xg, D = xg.index_select(0, value_rows), D.index_select(0, value_rows)
        n = xg.shape[0]
        xv = torch.matmul(v.to(xp.device, r.dtype).view(1, 1, 1, -1), xg).view(n, G, *spatial)
        Aw = conv(xv, kern, None, m.stride, 0, m.dilation, G).reshape(n, G, -1)  # [n, G, L]
        Du = torch.matmul(pr.u.to(D.device, r.dtype).view(1, G, 1, r.p), D).squeeze(2)  # [n, G, L]
        return float((Du.double() * Aw.double()).sum()), noise2
