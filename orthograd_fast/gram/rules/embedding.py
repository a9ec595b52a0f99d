"""nn.Embedding: out[r, t] = W[idx[r, t]] for indices idx: (N, *).

Per-row gradient: dW_r = Σ_t e_{idx[r,t]} ⊗ D_{r,t} (positions with idx == padding_idx get
none). Only the vocabulary rows present in the batch are non-zero, so the per-segment
gradients are formed explicitly on the present rows only:

    Z[s, v] = Σ_{(r,t): r in s, idx[r,t] = v} D_{r,t}        (S, V_present, E)
    K = Z Zᵀ  (flattened over V_present·E)

The sums run once over the distinct (segment, token) pairs; Z is then filled in chunks of
the present vocabulary so that one (S, chunk, E) slab exists at a time. combine sums the
row-scaled D per present token and writes those rows. ``max_norm`` (renormalises W in place in the
forward), ``scale_grad_by_freq`` (couples rows through batch counts) and ``sparse`` are refused.
nn.EmbeddingBag (modes sum and mean, 2-D input or 1-D input with offsets) is the same sum
over its bags' entries (``EmbeddingBagRule``).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import (
    GramOptions,
    Probe,
    Rule,
    Segments,
    compute_dtype,
    gram_of_segment_tiles,
    register_rule,
    segment_sum,
    sq_norm,
)


def _refuse_options(module, path) -> None:
    bad = []
    if module.max_norm is not None:
        bad.append("max_norm (renormalises the weight in place during forward)")
    if module.scale_grad_by_freq:
        bad.append("scale_grad_by_freq (couples the rows through batch counts)")
    if module.sparse:
        bad.append("sparse=True")
    if bad:
        raise ValueError(f"SampleGram: {type(module).__name__} {path!r} uses {', '.join(bad)}, which is not supported")


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    kind = "embedding"

    def __init__(self, module, path, params):
        _refuse_options(module, path)
        super().__init__(module, path, params)

    def capture(self, module, args, kwargs, output):
        return args[0] if args else kwargs["input"]

    def _flat(self, calls, seg: Segments | None, kept_only: bool):
        """Valid positions of all calls: vocab ids (F,), row ids (F,), D (F, E)."""
        pad = self.module.padding_idx
        vs, rs, ds = [], [], []
        for c in calls:
            if c.grad is None:
                continue
            idx, g = c.saved, c.grad
            N = idx.shape[0]
            E = g.shape[-1]
            v = idx.reshape(-1)
            T = v.numel() // max(N, 1)
            r = torch.arange(N, device=v.device).repeat_interleave(T)
            D = g.reshape(-1, E)
            if pad is None and (not kept_only or seg.all_kept):  # every position: no mask, no copy
                vs.append(v)
                rs.append(r)
                ds.append(D)
                continue
            mask = torch.ones_like(v, dtype=torch.bool) if pad is None else v != pad
            if kept_only:
                mask &= seg.ids_on(v.device)[r] >= 0
            vs.append(v[mask])
            rs.append(r[mask])
            ds.append(D[mask])
        if not vs:
            return None
        if len(vs) == 1:
            return vs[0], rs[0], ds[0]
        return torch.cat(vs), torch.cat(rs), torch.cat(ds)

    def _step_flat(self, calls, seg: Segments, kept_only: bool):
        """``_flat``, formed once per step and kept in the first call's cache (grams, probe
        and combine read the same positions; with every row kept, the kept positions are
        all of them). The calls' inputs are version-checked by the engine before each use."""
        if not calls:
            return None
        kept_only = kept_only and not seg.all_kept
        key = ("embedding_flat", kept_only, len(calls))
        cache = calls[0].cache
        if key not in cache:
            cache[key] = self._flat(calls, seg, kept_only)
        return cache[key]

    def _step_vocab(self, calls, seg: Segments, v: torch.Tensor):
        """(present vocabulary ids (U,), each kept position's index in them (F,)) of the kept
        positions v, once per step (first call's cache)."""
        key = ("embedding_vocab", len(calls))
        cache = calls[0].cache
        if key not in cache:
            cache[key] = torch.unique(v, return_inverse=True)
        return cache[key]

    def grams(self, calls, seg: Segments, opts: GramOptions, tiles=None):
        gw = self.local("weight")
        flat = self._step_flat(calls, seg, kept_only=True)
        if gw is None or flat is None:
            return {}
        v, r, D = flat
        dtype = compute_dtype(D)
        D = D.to(dtype)
        S, E = seg.S, D.shape[1]
        s = seg.ids_on(v.device)[r]
        K = torch.zeros((S, S), dtype=torch.float64, device=D.device)
        self.methods[gw] = "embedding:explicit"
        if S == 0 or v.numel() == 0:
            return {gw: K}
        uniq, inv = self._step_vocab(calls, seg, v)
        U = uniq.numel()
        keys, kinv = torch.unique(s * U + inv, return_inverse=True)  # (segment, vocab) pairs
        Zc = segment_sum(D, kinv, keys.numel())  # [pairs, E]
        ks, kv = keys // U, keys % U
        chunk = max(1, opts.budget // max(1, S * E))
        for c0 in range(0, U, chunk):
            c1 = min(U, c0 + chunk)
            Z = D.new_zeros((S * (c1 - c0), E))
            if c1 - c0 == U:  # one chunk: every pair, no selection
                Z[ks * U + kv] = Zc
            else:
                sel = (kv >= c0) & (kv < c1)
                Z[ks[sel] * (c1 - c0) + kv[sel] - c0] = Zc[sel]
            K += gram_of_segment_tiles(Z.view(S, -1), opts.precision)
        return {gw: K}

    def segment_grads(self, calls, seg: Segments, opts: GramOptions):
        """The present vocabulary rows only: X (S, U·E) over the U rows that occur, with
        their flat entries as the index (the other rows are zero in every segment)."""
        gw = self.local("weight")
        flat = self._step_flat(calls, seg, kept_only=True)
        if gw is None:
            return {}
        E = self.module.weight.shape[1]
        if flat is None or flat[0].numel() == 0:
            dev = self.module.weight.device
            return {gw: (torch.zeros((seg.S, 0), device=dev), torch.zeros(0, dtype=torch.long, device=dev))}
        v, r, D = flat
        D = D.to(compute_dtype(D))
        uniq, inv = self._step_vocab(calls, seg, v)
        U = uniq.numel()
        s = seg.ids_on(v.device)[r]
        X = segment_sum(D, s * U + inv, seg.S * U).view(seg.S, U * E)
        index = (uniq[:, None] * E + torch.arange(E, device=v.device)).flatten()
        return {gw: (X, index)}

    def combine(self, calls, seg: Segments, weights, totals):
        gw = self.local("weight")
        W = self.module.weight
        flat = self._step_flat(calls, seg, kept_only=True)
        if gw is None or flat is None:
            return {}
        v, r, D = flat
        dtype = compute_dtype(D)
        wr = seg.row_weights(weights[gw], D.device, dtype)[r]
        uniq, inv = self._step_vocab(calls, seg, v)
        out = torch.zeros(W.shape, dtype=dtype, device=D.device)
        out[uniq] = segment_sum(D.to(dtype) * wr[:, None], inv, uniq.numel())
        return {gw: out}

    def probe(self, calls, seg: Segments, probes: dict[str, Probe], tiles=None) -> None:
        gw = self.local("weight")
        flat = self._step_flat(calls, seg, kept_only=False)
        if gw is None or flat is None:
            return
        v, _, D = flat
        pr = probes[gw]
        dt = compute_dtype(D)
        Dw = (D.to(dt) @ pr.w.to(D.device, dt)).double()
        pr.add(float(pr.u.to(D.device)[v] @ Dw), float(sq_norm(D)), v.numel())


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(EmbeddingRule):
    """nn.EmbeddingBag, modes "sum" and "mean" (``mode="max"`` selects one entry per feature:
    the torch.func fallback serves it on 2-D input).

    Bag b (output row b) holds entries j with vocabulary ids v_j: a row of a 2-D input, or
    input[offsets[b]:offsets[b+1]] of a 1-D input. out_b = Σ_j c_j W[v_j], c_j = the
    per-sample weight (sum) or 1/(entries of b that are not padding_idx) (mean), so

        dW_b = Σ_j c_j e_{v_j} ⊗ D_b        (padding_idx entries excluded)

    i.e. the Embedding rule's flat positions (v_j, row of bag b_j, c_j·D_{b_j}). Which row a
    bag belongs to is the row model's layout of the output (bags in dim 0, one or k per row).
    """

    kind = "embedding_bag"
    rows_at = "custom"

    @classmethod
    def unsupported(cls, module):
        return "mode='max' (selects one entry per feature)" if module.mode == "max" else None

    def layout_problem(self, layout, out):
        if layout.dim is None or layout.dim == 0:
            return None
        return f"the rows are in {layout.describe()} of its output {tuple(out.shape)}, not in its bags (dim 0)"

    def to_rows(self, t, layout, N):
        return t  # bags are mapped to rows in _flat, from the output's layout

    def capture(self, module, args, kwargs, output):
        names = ("input", "offsets", "per_sample_weights")
        vals = dict(zip(names, args))
        vals.update({k: v for k, v in kwargs.items() if k in names})
        psw = vals.get("per_sample_weights")
        return vals["input"], vals.get("offsets"), None if psw is None else psw.detach()

    def _flat(self, calls, seg: Segments | None, kept_only: bool):
        m = self.module
        vs, rs, ds = [], [], []
        for c in calls:
            if c.grad is None:
                continue
            inp, offsets, psw = c.saved
            g = c.grad  # [bags, E]
            B, dev = g.shape[0], g.device
            if inp.dim() == 2:
                v = inp.reshape(-1)
                bag = torch.arange(B, device=dev).repeat_interleave(inp.shape[1])
            else:
                v = inp
                starts = offsets[:-1] if m.include_last_offset else offsets
                ends = torch.cat([starts[1:], starts.new_tensor([inp.numel() if not m.include_last_offset
                                                                  else int(offsets[-1])])])
                bag = torch.arange(B, device=dev).repeat_interleave(ends - starts)
                v = v[: bag.numel()]
            coef = torch.ones(v.shape, dtype=g.dtype, device=dev) if psw is None else psw.reshape(-1)[: v.numel()].to(g.dtype)
            keep = torch.ones_like(v, dtype=torch.bool) if m.padding_idx is None else v != m.padding_idx
            if m.mode == "mean":
                count = torch.zeros(B, dtype=g.dtype, device=dev).index_add_(0, bag[keep], coef.new_ones(int(keep.sum())))
                coef = coef / count.clamp_min(1)[bag]
            lay = c.layouts[0] if c.layouts else None  # (None: no gradient reached it, engine-checked)
            bags = torch.arange(B, device=dev)
            row_of_bag = torch.zeros_like(bags) if lay is None or lay.dim is None else lay.rows_of(bags, seg.N)
            r = row_of_bag[bag]
            if kept_only:
                keep &= seg.ids_on(dev)[r] >= 0
            vs.append(v[keep])
            rs.append(r[keep])
            ds.append(g[bag[keep]] * coef[keep, None])
        if not vs:
            return None
        return torch.cat(vs), torch.cat(rs), torch.cat(ds)
