"""Normalisation layers: LayerNorm, RMSNorm, GroupNorm, BatchNorm (eval mode only).

All are y = x̂ ⊙ γ + β with x̂ the normalised input, which depends on its own row only
(BatchNorm: only with running statistics, i.e. in eval mode). Per-row gradients:

    dγ_r = Σ_{positions of r} D ⊙ x̂        dβ_r = Σ_{positions of r} D

reduced to the parameter's shape: LayerNorm/RMSNorm sum the dims between the batch and
``normalized_shape``; GroupNorm/BatchNorm sum every dim after the channel dim 1. These are
tiny, so the per-row gradients (N, numel) are formed explicitly, summed into segments and
turned into Grams; combine is one (N,) x (N, numel) product. x̂ is recomputed after the
backward from the saved input with the affine parameters switched off.

BatchNorm in train mode (or without running statistics) mixes the rows of the batch:
per-sample gradients are not defined there, and the engine refuses it before its forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    GramOptions,
    Probe,
    Rule,
    Segments,
    compute_dtype,
    gram_from_row_grads,
    kept_segment_sum,
    probe_row_grads,
    probe_tiles,
    register_rule,
    sq_norm,
)


def batchnorm_problem(module: nn.Module) -> str | None:
    """Why a BatchNorm would couple the rows of a batch, or None in eval mode with stats."""
    if module.training:
        return "is in training mode (batch statistics couple the rows)"
    if module.running_mean is None:
        return "has track_running_stats=False (it always uses batch statistics)"
    return None


class _NormRule(Rule):
    """Shared per-row-gradient machinery; subclasses define ``normalise`` and ``reduce_dims``."""

    def capture(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        return x.detach()


    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """x̂, the normalised input without the affine parameters: a new tensor (the rule
        multiplies it by D in place, to save a fresh buffer of the activation's size)."""
        raise NotImplementedError

    def reduce_dims(self, x: torch.Tensor) -> list[int]:
        """Dims (besides 0) summed to bring D ⊙ x̂ to the parameter's shape."""
        raise NotImplementedError

    def _call_rows(self, c) -> dict[str, tuple[torch.Tensor, float, int]]:
        """{local name: (rows (N, numel), noise2, count)} of one call (cached on the call)."""
        if "norm" in c.cache:
            return c.cache["norm"]
        x, g = c.saved, c.grad
        dtype = compute_dtype(x, g)
        g = g.to(dtype)
        dims = self.reduce_dims(x)
        N = x.shape[0]
        positions = 1
        for dd in dims:
            positions *= x.shape[dd]
        parts = {}
        if self.local("weight") is not None:
            parts["weight"] = self.normalise(x.to(dtype)).mul_(g)  # D ⊙ x̂
        if self.local("bias") is not None:
            parts["bias"] = g
        out = {}
        for name, contrib in parts.items():
            rows = (contrib.sum(dims) if dims else contrib).reshape(N, -1)
            out[name] = (rows, float(sq_norm(contrib)), N * positions)
        c.cache["norm"] = out
        return out

    def _row_grads(self, calls):
        """{local name: (rows (N, numel), noise2, count)} summed over calls."""
        out: dict[str, list] = {}
        for c in calls:
            if c.grad is None:
                continue
            for name, (rows, noise2, count) in self._call_rows(c).items():
                if name in out:
                    out[name] = [out[name][0] + rows, out[name][1] + noise2, out[name][2] + count]
                else:
                    out[name] = [rows, noise2, count]
        return out

    def grams(self, calls, seg: Segments, opts: GramOptions, tiles=None):
        out = {}
        for local, (rows, _, _) in self._row_grads(calls).items():
            g = self.local(local)
            out[g] = gram_from_row_grads(rows, seg, opts.precision, tiles, g)
            self.methods[g] = f"{self.kind}:explicit"
        return out

    def segment_grads(self, calls, seg: Segments, opts: GramOptions):
        return {self.local(local): (kept_segment_sum(rows, seg), None)
                for local, (rows, _, _) in self._row_grads(calls).items()}

    def combine(self, calls, seg: Segments, weights, totals):
        out = {}
        for local, (rows, _, _) in self._row_grads(calls).items():
            g = self.local(local)
            if g in weights:
                wr = seg.row_weights(weights[g], rows.device, rows.dtype)
                out[g] = (wr @ rows).reshape(self.param(local).shape)
        return out

    def probe(self, calls, seg: Segments, probes: dict[str, Probe], tiles=None) -> None:
        tiles = tiles or {}
        for local, (rows, noise2, count) in self._row_grads(calls).items():
            g = self.local(local)
            if g in tiles and seg.all_kept:
                probes[g].add(probe_tiles(probes[g], tiles[g]), noise2, count)
            else:
                probe_row_grads(probes[g], rows, noise2, count)


@register_rule(nn.LayerNorm)
class LayerNormRule(_NormRule):
    kind = "layer_norm"

    def out_features(self):
        return len(self.module.normalized_shape)

    def normalise(self, x):
        return F.layer_norm(x, self.module.normalized_shape, None, None, self.module.eps)

    def reduce_dims(self, x):
        return list(range(1, x.dim() - len(self.module.normalized_shape)))


@register_rule(nn.RMSNorm)
class RMSNormRule(_NormRule):
    kind = "rms_norm"

    def out_features(self):
        return len(self.module.normalized_shape)

    def normalise(self, x):
        return F.rms_norm(x, self.module.normalized_shape, None, self.module.eps)

    def reduce_dims(self, x):
        return list(range(1, x.dim() - len(self.module.normalized_shape)))


@register_rule(nn.GroupNorm)
class GroupNormRule(_NormRule):
    kind = "group_norm"
    rows_at = "dim0"

    def normalise(self, x):
        return F.group_norm(x, self.module.num_groups, None, None, self.module.eps)

    def reduce_dims(self, x):
        return list(range(2, x.dim()))


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(_NormRule):
    kind = "batch_norm"
    rows_at = "dim0"

    def check(self, module):
        problem = batchnorm_problem(module)
        if problem is not None:
            raise ValueError(
                f"SampleGram: BatchNorm {self.path!r} {problem}; per-sample gradients need "
                "independent rows. Call .eval() on norm layers (e.g. model.eval()) before record()."
            )

    def normalise(self, x):
        m = self.module
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)

    def reduce_dims(self, x):
        return list(range(2, x.dim()))
