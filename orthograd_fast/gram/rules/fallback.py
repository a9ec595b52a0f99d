"""The exact fallback: per-row gradients of just the uncovered parameters via ``torch.func``.

For a module M (a layer without a rule, an attention block, or the root model itself) and
the parameters θ it must serve, each recorded call y = M(args) with output gradient D
(captured at M's output) gives, for every row r of the batch,

    g_r(θ) = ∂/∂θ < M_θ(args_r), D_r >        (args_r, D_r: row r, batch dim kept as 1)

computed by ``vmap(grad(...))`` over rows with ``functional_call`` (every other parameter
and buffer fixed at its current value, detached). Rows independent ⇒ Σ_r g_r is the
gradient autograd delivered, and g_s = Σ_{r in s} g_r exactly. Cost: one vmapped
forward + backward of M, and an (N, numel) buffer per served parameter. A module that
torch.func cannot vmap (nn.LSTM/GRU, which write into unbatched hidden state) gets the
same row losses through one autograd pass per row, with a warning.

Which inputs are per row, and where their rows are: the row model of the call
(gram/rows.py, ``Call.rows``) — never the sizes. Per-row inputs are vmapped over their row
dim (one object passed twice, as attention's q = k = v, stays one object per row);
everything else (masks, tables, flags, a shared (L, L) attention mask even when L = N) is
passed whole; output gradients are read at their measured rows, and each row's output
must have exactly the shape of its gradient (no silent broadcast). Randomness inside M (dropout in train mode)
cannot be replayed per row and is refused with a clear error.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..rows import flat
from .base import (
    Call,
    GramOptions,
    Probe,
    Rule,
    Segments,
    contract_probe,
    gram_of_segment_tiles,
    kept_segment_sum,
    sq_norm,
)


def per_row_grads(module: nn.Module, names: dict[str, str], calls: list[Call], N: int) -> dict[str, torch.Tensor]:
    """{global name: (N, *shape)} per-row gradients of the parameters ``names`` (local ->
    global, local relative to ``module``) summed over the recorded calls of ``module``."""
    from torch.func import functional_call, grad, vmap

    fixed = {k: v.detach() for k, v in module.named_parameters()}
    fixed.update({k: b.detach() for k, b in module.named_buffers()})
    theta = {loc: fixed[loc] for loc in names}
    out: dict[str, torch.Tensor] = {}
    for call in calls:
        cots = [(i, g) for i, g in enumerate(call.grads) if g is not None]
        if not cots:
            continue
        args, kwargs = call.saved
        leaves, spec = tree_flatten((args, kwargs))
        lays = list(call.rows.args) if call.rows is not None and call.rows.args is not None else []
        extra = leaves[len(lays):]  # flags a rule appended (attention's need_weights=True)
        if len(lays) > len(leaves) or any(isinstance(x, torch.Tensor) for x in extra):
            raise ValueError(f"SampleGram fallback: the rows of the inputs of {type(module).__name__} are unknown")
        lays += [None] * len(extra)
        batched: list[torch.Tensor] = []  # per-row inputs, rows in dim 0 (rows.Layout.rows)
        where: dict[int, int] = {}
        slots = []
        for leaf, lay in zip(leaves, lays):
            if isinstance(leaf, torch.Tensor) and lay is not None:
                if id(leaf) not in where:  # one object passed twice (q = k = v) stays one per row
                    where[id(leaf)] = len(batched)
                    batched.append(lay.rows(leaf.detach(), N))
                slots.append((lay, where[id(leaf)]))
            else:  # shared by all rows (masks, tables, flags): passed whole
                slots.append((None, leaf.detach() if isinstance(leaf, torch.Tensor) else leaf))
        out_lays, cot_vals = [], []
        for i, g in cots:
            lay = call.rows.outs[i].layout if i < len(call.rows.outs) else None
            if lay is None:
                raise ValueError(
                    f"SampleGram fallback: output {i} of module {type(module).__name__} ({tuple(g.shape)}) "
                    "receives a gradient but holds no rows the row check could find"
                )
            out_lays.append(lay)
            cot_vals.append(lay.rows(g, N))
        if not batched:
            raise ValueError(
                f"SampleGram fallback: no input of module {type(module).__name__} holds the rows of the "
                "batch, so its per-row gradients cannot be formed"
            )
        out_idx = [i for i, _ in cots]
        name = type(module).__name__

        def row_loss(th, rows_in, rows_cot, slots=slots, spec=spec, out_idx=out_idx, out_lays=out_lays):
            vals = [lay.unrow(rows_in[v]) if lay is not None else v for lay, v in slots]
            a, kw = tree_unflatten(vals, spec)
            y = flat(functional_call(module, {**fixed, **th}, tuple(a), kw))
            total = None
            for i, lay, c in zip(out_idx, out_lays, rows_cot):
                c = lay.unrow(c)
                if y[i].shape != c.shape:
                    raise ValueError(
                        f"SampleGram fallback: run on one row, output {i} of {name} has shape "
                        f"{tuple(y[i].shape)}, not that row's {tuple(c.shape)} (an input taken as shared "
                        "by all rows is per row?)"
                    )
                term = (y[i] * c.to(y[i].dtype)).sum()
                total = term if total is None else total + term
            return total

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                g = vmap(grad(row_loss), in_dims=(None, 0, 0), randomness="error")(theta, batched, cot_vals)
        except RuntimeError as e:
            if "random" in str(e):
                raise _random_error(module) from e
            # not vmappable (nn.LSTM/GRU write into unbatched state, .item(), data-dependent
            # control flow, ...): the same row losses, one autograd pass per row
            warnings.warn(
                f"SampleGram fallback: torch.func cannot vmap {type(module).__name__} ({str(e).splitlines()[0]}); "
                f"its per-row gradients come from a loop of {N} backward passes (exact, slower)",
                stacklevel=2,
            )
            g = _loop_row_grads(row_loss, theta, batched, cot_vals, module)
        for loc, gname in names.items():
            out[gname] = out[gname] + g[loc] if gname in out else g[loc]
    return out


def _random_error(module: nn.Module) -> ValueError:
    return ValueError(
        f"SampleGram fallback: module {type(module).__name__} draws random numbers "
        "(dropout in train mode?); its per-row gradients are recomputed after the backward and "
        "cannot replay them. Use eval mode or dropout p=0 for modules served by the fallback."
    )


def _rng_states(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _loop_row_grads(row_loss, theta: dict[str, torch.Tensor], batched: list[torch.Tensor],
                    cots: list[torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """{local name: (N, *shape)}: the per-row gradients ``vmap(grad(row_loss))`` would give,
    by one ``torch.autograd.grad`` per row. A module that draws random numbers would draw
    different ones than the recorded forward did: detected by the generator state moving
    during the first row, and refused like the vmap path refuses it."""
    N = batched[0].shape[0]
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    out = {k: torch.empty((N, *v.shape), dtype=v.dtype, device=v.device) for k, v in theta.items()}
    before = _rng_states(batched[0].device)
    with torch.enable_grad():
        for r in range(N):
            loss = row_loss(leaves, [b[r] for b in batched], [c[r] for c in cots])
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for (k, v), gr in zip(leaves.items(), grads):
                out[k][r] = 0 if gr is None else gr
            if r == 0 and any(
                a is not None and not torch.equal(a, b) for a, b in zip(before, _rng_states(batched[0].device))
            ):
                raise _random_error(module)
    return out


def segment_results(rows: dict[str, torch.Tensor], seg: Segments, opts: GramOptions, probes: dict[str, Probe]):
    """From per-row gradients {name: (N, *shape)}: Grams {name: (S, S)}, segment gradients
    {name: (S, *shape)}, and the probe sums over all rows (ignored ones included)."""
    grams, seg_grads = {}, {}
    for gname, r in rows.items():
        flat = r.reshape(seg.N, -1)
        X = kept_segment_sum(flat, seg)
        grams[gname] = gram_of_segment_tiles(X, opts.precision)
        seg_grads[gname] = X.reshape(seg.S, *r.shape[1:])
        probes[gname].add(contract_probe(flat.sum(0), probes[gname].u, probes[gname].w), float(sq_norm(flat)), seg.N)
    return grams, seg_grads


class ModuleFallback(Rule):
    """Serves the parameters of a module without a rule (and, with ``claims_subtree``,
    of its whole subtree) through :func:`per_row_grads` after the backward."""

    kind = "fallback"
    deferred = True

    def capture(self, module, args, kwargs, output):
        return (args, kwargs)

    def finish(self, calls: list[Call], seg: Segments, opts: GramOptions, probes: dict[str, Probe], tiles=None):
        """Grams {name: (S, S)} and segment gradients {name: (S, *shape)}; adds to probes."""
        return segment_results(per_row_grads(self.module, self.params, calls, seg.N), seg, opts, probes)

    def combine(self, calls, seg, weights, totals):
        """Nothing here: the engine combines the segment gradients ``finish`` returned."""
        return {}

    def describe(self) -> dict[str, str]:
        return {g: f"fallback:module({self.path or '<root>'})" for g in self.params.values()}
