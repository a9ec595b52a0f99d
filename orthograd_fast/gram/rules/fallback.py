"""The exact fallback: per-row gradients of just the uncovered parameters via ``torch.func``.

For a module M (a layer without a rule, an attention block, or the root model itself) and
the parameters θ it must serve, each recorded call y = M(args) with output gradient D
(captured at M's output) gives, for every row r of the batch,

    g_r(θ) = ∂/∂θ < M_θ(args_r), D_r >        (args_r, D_r: row r, batch dim kept as 1)

computed by ``vmap(grad(...))`` over rows with ``functional_call`` (every other parameter
fixed at its current value, detached; buffers as copies, "Side effects" below). Rows
independent ⇒ Σ_r g_r is the gradient autograd delivered, and g_s = Σ_{r in s} g_r exactly. Cost: one vmapped
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

Side effects. The recorded forward already did whatever M does to its state; the re-runs
(one vmapped call, or N row passes) must add nothing, or a step with the fallback leaves
the model elsewhere than a plain step (InstanceNorm1d(track_running_stats=True) in train
mode, looped over 6 rows: running_mean 4.1x off, eval logits moved 25%). So:

* buffers: ``functional_call`` runs M on the tensors it is given, and an in-place update
  (running statistics, counters, caches) lands in the tensor passed, not in M's own: M
  gets copies (one clone of each buffer per ``per_row_grads``), so its buffers keep their
  values and version counters (autograd may have saved them);
* the global RNG state (CPU, and every CUDA device M's tensors are on) is restored, also
  when a draw made the re-run refuse;
* plain attributes a forward sets (``self.last_shape = x.shape``, the computed ``weight``
  of an old-style weight_norm hook) are put back as the recorded forward left them:
  every submodule's ``__dict__`` entries are restored and new ones removed;
* parameters are passed as aliases (a copy of every weight per step would cost a model's
  memory): a module that writes into its own parameters during forward has them written
  again by the re-runs, which cannot be undone; that is detected (their version counters
  moved) and refused.

What a re-run reads of M's state is its value after the recorded forward: a module whose
output depends on a buffer it updates in the same forward gets a different output in the
re-run; its per-row gradients then no longer sum to autograd's and the engine's probe
refuses the step (base.Probe).
"""
from __future__ import annotations

import itertools
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..rows import flat, module_state, restore_module_state
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
    global, local relative to ``module``) summed over the recorded calls of ``module``; the
    module's state is left as the recorded forward left it (module docstring, "Side
    effects")."""
    # fp16/bf16 modules re-run in fp32 (an fp16 per-row gradient underflows: a Gram of zeros at
    # a loss scale of 1e-3, measured): the same maths at least at fp32 products, as the rules do
    fixed = {k: _up(v.detach()) for k, v in module.named_parameters()}
    # copies: in-place buffer updates of the re-runs land there (module docstring)
    fixed.update({k: _up(b.detach()).clone() for k, b in module.named_buffers()})
    theta = {loc: fixed[loc] for loc in names}
    with _no_side_effects(module, calls):
        return _per_row_grads(module, names, calls, N, fixed, theta)


def _per_row_grads(module, names, calls, N, fixed, theta) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    name = type(module).__name__
    for call in calls:
        if not any(g is not None for g in call.grads):
            continue
        leaves = tree_flatten(call.saved)[0]
        lays = list(call.rows.args) if call.rows is not None and call.rows.args is not None else []
        extra = leaves[len(lays):]  # flags a rule appended (attention's need_weights=True)
        if len(lays) > len(leaves) or any(isinstance(x, torch.Tensor) for x in extra):
            raise ValueError(f"SampleGram fallback: the rows of the inputs of {name} are unknown")
        lays += [None] * len(extra)
        errors = []
        for attempt in _assignments(lays, call.rows.flexible if call.rows is not None else {}):
            try:
                g = _call_row_grads(module, call, attempt, N, fixed, theta)
                break
            except _RandomDraw:
                raise _random_error(module) from None
            except _ScalarOutput as e:  # no layout of the inputs changes that: said as it is
                raise ValueError(str(e)) from None
            except (ValueError, RuntimeError, AssertionError, IndexError) as e:
                errors.append(e)
        else:
            first = errors[0]
            raise ValueError(
                f"SampleGram fallback: {name} run on one row failed ({type(first).__name__}: "
                f"{str(first).splitlines()[0] if str(first) else ''}); its per-row gradients cannot be formed"
            ) from first
        for loc, gname in names.items():
            out[gname] = out[gname] + g[loc] if gname in out else g[loc]
    return out


def _up(t):
    """Half-precision floating tensors as fp32 (everything else as is)."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


class _RandomDraw(Exception):
    """The module drew random numbers during a per-row re-run."""


class _ScalarOutput(ValueError):
    """An output the gradient reaches is a scalar reduced over the rows (e.g. a model's own loss)."""


def _assignments(lays: list, flexible: dict, limit: int = 8):
    """The inputs' row layouts to try: the row model's first guess, then the other choices
    for its ``flexible`` inputs (unchanged by the row check: shared, or per row along one of
    their candidate layouts), at most ``limit`` in all. A wrong choice that still runs is
    caught by the safety net (the per-row gradients must sum to the recorded gradient)."""
    keys = sorted(flexible)[:3]
    options = [[lays[k]] + [o for o in [None, *flexible[k]] if o != lays[k]] for k in keys]
    for n, choice in enumerate(itertools.product(*options)):
        if n == limit:
            return
        alt = list(lays)
        for k, o in zip(keys, choice):
            alt[k] = o
        yield alt


def _call_row_grads(module, call, lays, N, fixed, theta) -> dict[str, torch.Tensor]:
    """{local name: (N, *shape)} for one recorded call with the inputs' rows at ``lays``; the
    module run on one row must give exactly that row's output shapes (else ValueError)."""
    from torch.func import functional_call, grad, vmap

    name = type(module).__name__
    cots = [(i, g) for i, g in enumerate(call.grads) if g is not None]
    leaves, spec = tree_flatten(call.saved)
    batched: list[torch.Tensor] = []  # per-row inputs, rows in dim 0 (rows.Layout.rows)
    where: dict[int, int] = {}
    slots = []
    for leaf, lay in zip(leaves, lays):
        if isinstance(leaf, torch.Tensor) and lay is not None:
            if id(leaf) not in where:  # one object passed twice (q = k = v) stays one per row
                where[id(leaf)] = len(batched)
                batched.append(lay.rows(_up(leaf.detach()), N))
            slots.append((lay, where[id(leaf)]))
        else:  # shared by all rows (masks, tables, flags): passed whole
            slots.append((None, _up(leaf.detach()) if isinstance(leaf, torch.Tensor) else leaf))
    out_lays, cot_vals = [], []
    for i, g in cots:
        lay = call.rows.outs[i].layout if i < len(call.rows.outs) else None
        if lay is None and g.dim() == 0 and N > 1:
            raise _ScalarOutput(
                f"SampleGram fallback: output {i} of {name} is a scalar that receives the gradient: a loss "
                f"{name} reduced over the whole batch (a Hugging Face model called with labels= returns its "
                f"loss so), which holds no per-row outputs, so re-running {name} on one row cannot give that "
                "row's gradient (this re-run serves parameters no layer rule and no op trace could split into "
                "rows). Compute the loss outside the model from its per-row outputs: call it without labels= "
                "and take per-row losses from the logits, e.g. F.cross_entropy(out.logits.transpose(1, 2), "
                "labels, reduction='none').sum(1)"
            )
        if lay is None:
            raise ValueError(
                f"SampleGram fallback: output {i} of module {name} ({tuple(g.shape)}) "
                "receives a gradient but holds no rows the row check could find"
            )
        out_lays.append(lay)
        cot_vals.append(lay.rows(_up(g), N))
    if not batched and N != 1:
        raise ValueError(
            f"SampleGram fallback: no input of module {name} holds the rows of the batch, so its "
            "per-row gradients cannot be formed"
        )
    out_idx = [i for i, _ in cots]

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

    if not batched:  # one row (N = 1) and no input tensor: the call is that row
        g = grad(row_loss)(theta, [], [c[0] for c in cot_vals])
        return {k: v.unsqueeze(0) for k, v in g.items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return vmap(grad(row_loss), in_dims=(None, 0, 0), randomness="error")(theta, batched, cot_vals)
    except RuntimeError as e:
        if "random" in str(e):
            raise _RandomDraw() from e
        # not vmappable (nn.LSTM/GRU write into unbatched state, .item(), data-dependent
        # control flow, ...): the same row losses, one autograd pass per row
        g = _loop_row_grads(row_loss, theta, batched, cot_vals, module)
        warnings.warn(
            f"SampleGram fallback: torch.func cannot vmap {name} ({str(e).splitlines()[0]}); "
            f"its per-row gradients come from a loop of {N} backward passes (exact, slower)",
            stacklevel=4,
        )
        return g


@contextmanager
def _no_side_effects(module: nn.Module, calls: list[Call]):
    """Around the re-runs of ``module``: the global RNG state (CPU and the CUDA devices of its
    tensors and of the calls' inputs) and every submodule's plain attributes restored on
    exit, and a ValueError if a parameter was written in place (module docstring, "Side
    effects")."""
    tensors = [t for t in module.parameters()] + [t for t in module.buffers()]
    for call in calls:
        tensors += [t for t in tree_flatten(call.saved)[0] if isinstance(t, torch.Tensor)]
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    state = module_state(module)
    versions = [(name, p, p._version) for name, p in module.named_parameters()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        restore_module_state(state)
    written = [name for name, p, v in versions if p._version != v]
    if written:
        raise ValueError(
            f"SampleGram fallback: {type(module).__name__} writes into its parameters {written} during "
            "forward, and the per-row re-runs of its forward wrote into them again (this cannot be "
            "undone: re-load them). Serve this module with a rule, or move the update out of forward."
        )


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
                raise _RandomDraw()
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
