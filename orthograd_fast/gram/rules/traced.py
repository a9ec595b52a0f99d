"""Exact per-row gradients of parameters used outside any rule, from the ops that use them.

Bare parameters of the root module (a class token, a positional embedding), tied weights
and parameters used functionally have no module boundary to hook. Re-running the whole
model per row (``fallback.per_row_grads`` on the root) is exact but costs about another
forward + backward. Instead, during ``record()`` a ``TorchFunctionMode`` watches every torch
call that consumes such a parameter θ (or a tensor computed from θ alone):

* "derived": no input and no output has the batch (dim 0 = N) — e.g. ``pos[:, :T]``,
  ``w.t()``. The op is kept as a recipe, replayed later from θ.
* "use", rows: some input is an activation with the batch in dim 0 and every output has it
  too — e.g. ``h + pos``, ``F.linear(h, W)``, ``F.embedding(idx, W)``. Output row r depends
  on θ and row r of the batched inputs only, so with D the gradient at the op's output

      g_r = ∂/∂θ < op(θ, inputs_r), D_r >

  is one ``vmap(grad(...))`` over rows of just this op (recipes replayed inside).
* "use", broadcast: ``expand`` / ``expand_as`` / ``broadcast_to`` of a θ-tensor q with a
  size-1 (or absent) dim 0 to N rows: every output row is q, so g_r = ∂/∂θ <q, D_r>.

Anything else (an op that mixes rows, a non-broadcast op making the batch from θ alone)
marks the trace as failed and the engine falls back to re-running the model per row. The
probe check (rules.base.Probe) still compares Σ_r g_r with autograd's gradient.

Cost: one vmapped replay of each using op (cheap elementwise/expand ops for tokens and
embeddings) and an (N, numel) buffer per traced parameter.
"""
from __future__ import annotations

import warnings
from functools import partial

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

_BROADCASTS = {torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.broadcast_to, torch.broadcast_to}


class _Node:
    """A tensor computed from traced parameters only: a parameter, or an op on nodes."""

    __slots__ = ("gname", "func", "spec", "slots", "index")

    def __init__(self, gname=None, func=None, spec=None, slots=None, index=0):
        self.gname, self.func, self.spec, self.slots, self.index = gname, func, spec, slots, index

    def params(self, acc: set) -> set:
        if self.gname is not None:
            acc.add(self.gname)
        else:
            for kind, v in self.slots:
                if kind == "node":
                    v.params(acc)
        return acc

    def value(self, theta: dict, cache: dict):
        key = id(self)
        if key not in cache:
            if self.gname is not None:
                cache[key] = theta[self.gname]
            else:
                vals = [v.value(theta, cache) if kind == "node" else v for kind, v in self.slots]
                a, kw = tree_unflatten(vals, self.spec)
                cache[key] = tree_flatten(self.func(*a, **kw))[0][self.index]
        return cache[key]


class _Use:
    """An op whose output rows carry θ's influence into the batch."""

    def __init__(self, func, spec, slots, rows, outs, kind):
        self.func, self.spec, self.slots, self.rows, self.outs, self.kind = func, spec, slots, rows, outs, kind
        self.grads: dict[int, torch.Tensor] = {}
        self.versions = tuple(r._version for r in rows)

    def params(self) -> set:
        acc: set = set()
        for kind, v in self.slots:
            if kind == "node":
                v.params(acc)
        return acc


class ParamTracer(TorchFunctionMode):
    """Records how the traced parameters enter the batch (module docstring)."""

    def __init__(self, params: dict[str, torch.Tensor], N: int):
        super().__init__()
        self.N = N
        self.params = set(params)
        self.nodes: dict[int, _Node] = {id(p): _Node(gname=g) for g, p in params.items()}
        self.keep: list[torch.Tensor] = list(params.values())  # ids stay unique while alive
        self.uses: list[_Use] = []
        self.handles: list = []
        self.problem: str | None = None
        self.active = True

    def add(self, params: dict[str, torch.Tensor]) -> None:
        """Follow more parameters from now on (before the forward that uses them)."""
        for g, p in params.items():
            self.params.add(g)
            self.nodes[id(p)] = _Node(gname=g)
            self.keep.append(p)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.active or self.problem is not None or not torch.is_grad_enabled():
            return out
        leaves, spec = tree_flatten((args, kwargs))
        hit = {
            i: self.nodes[id(x)] for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and id(x) in self.nodes
        }
        if not hit:
            return out
        outs = tree_flatten(out)[0]
        live = [j for j, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
        if not live:
            return out
        N = self.N
        slots, rows = [], []
        for i, x in enumerate(leaves):
            if i in hit:
                slots.append(("node", hit[i]))
            elif isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == N:
                slots.append(("row", len(rows)))
                rows.append(x.detach())
            else:
                slots.append(("const", x.detach() if isinstance(x, torch.Tensor) else x))
        out_rows = [outs[j].dim() > 0 and outs[j].shape[0] == N for j in live]
        name = getattr(func, "__name__", str(func))
        if not rows and not any(out_rows):
            for j in live:
                self.nodes[id(outs[j])] = _Node(func=func, spec=spec, slots=slots, index=j)
                self.keep.append(outs[j])
            return out
        if not all(out_rows):
            self.problem = f"{name} mixes the rows of the batch (an output lacks the batch in dim 0)"
            return out
        kind = "rows"
        if not rows:
            q = leaves[0]
            if func not in _BROADCASTS or 0 not in hit or not (q.dim() < outs[live[0]].dim() or q.shape[0] == 1):
                self.problem = f"{name} makes the batch dim from parameters alone"
                return out
            kind = "broadcast"
        use = _Use(func, spec, slots, rows, live, kind)
        self.uses.append(use)
        for j in live:
            self.handles.append(outs[j].register_hook(partial(self._on_grad, use, j)))
        return out

    def _on_grad(self, use: _Use, j: int, g: torch.Tensor):
        if self.active:
            use.grads[j] = g if j not in use.grads else use.grads[j] + g

    def clear_grads(self) -> None:
        """Forget the output gradients seen so far (the row check's second backward)."""
        for use in self.uses:
            use.grads.clear()

    def reset(self) -> None:
        """Forget every recorded use (a fresh trace of the next forward)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.uses.clear()
        self.problem = None
        self.active = True

    def close(self) -> None:
        self.active = False
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _up(t: torch.Tensor) -> torch.Tensor:
    """Half precision as fp32 (per-row gradients at fp32 products at least)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def traced_row_grads(tracer: ParamTracer, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: (N, *shape)} per-row gradients of the traced parameters (module docstring)."""
    from torch.func import grad, vmap

    N = tracer.N
    up = {torch.float16: torch.float32, torch.bfloat16: torch.float32}  # half: replayed in fp32
    out = {g: torch.zeros((N, *p.shape), dtype=up.get(p.dtype, p.dtype), device=p.device) for g, p in params.items()}
    for use in tracer.uses:
        if tuple(r._version for r in use.rows) != use.versions:
            raise ValueError("SampleGram: an input of an op using a traced parameter was modified in place")
        cots = [(j, use.grads[j]) for j in use.outs if j in use.grads]
        if not cots:
            continue
        names = use.params()
        theta = {g: _up(params[g].detach()) for g in names}
        idx = [j for j, _ in cots]
        ds = [d for _, d in cots]
        if use.kind == "rows":

            def f(th, rows, ds, use=use, idx=idx):
                cache: dict = {}
                vals = []
                for kind, v in use.slots:
                    if kind == "node":
                        vals.append(v.value(th, cache))
                    elif kind == "row":
                        vals.append(rows[v].unsqueeze(0))
                    else:
                        vals.append(v)
                a, kw = tree_unflatten(vals, use.spec)
                y = tree_flatten(use.func(*a, **kw))[0]
                return sum((y[j] * d.unsqueeze(0).to(y[j].dtype)).sum() for j, d in zip(idx, ds))

            args, dims = (theta, [_up(r) for r in use.rows], [_up(d) for d in ds]), (None, 0, 0)
        else:
            node = use.slots[0][1]

            def f(th, ds, node=node):
                q = node.value(th, {})
                return sum((q.expand((1,) + tuple(d.shape)) * d.unsqueeze(0).to(q.dtype)).sum() for d in ds)

            args, dims = (theta, [_up(d) for d in ds]), (None, 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            g = vmap(grad(f), in_dims=dims, randomness="error")(*args)
        for name in names:
            out[name] += g[name]
    return out
