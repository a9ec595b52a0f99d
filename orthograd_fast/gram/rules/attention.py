"""nn.MultiheadAttention: its projections, read from the autograd graph of each call.

The module calls ``F.multi_head_attention_forward`` with its own weights, so neither
module hooks nor a TorchFunctionMode see the two projections inside (the wrapper handles
torch-function overrides for the whole call). Both are plain matrix products in the
autograd graph, though. Right after each forward this rule walks the graph back from the
attention output (stopping at the inputs) to the nodes that consume ``in_proj_weight`` and
``out_proj.weight`` through a transpose (``mm`` / ``addmm``), reads the input those nodes
saved, and hooks them for the gradient of their output:

    in-projection:  A = query rows (L·N, E),  D = grad of q|k|v (L·N, 3E)
    out-projection: A = attention output (L·N, E),  D = grad of the output (L·N, E)

Rows are in the attention's internal (L, N) order; viewed as (N, L, ·) they are Linear
calls on sequences, served by the Linear rule (ghost / explicit Gram, bias rows, combine
with one GEMM, probes). No extra compute, and dropout inside attention is fine (the real
pass is read). The in-projection input is checked against the module's query.

Anything else (cross-attention, separate q/k/v weights, bias_k/bias_v, add_zero_attn, an
unexpected graph) falls back, for the whole step, to re-running the module per row with
``torch.func`` (fallback.per_row_grads), asking for ``need_weights=True``: that path computes
attention with batched matmul + softmax, which vmap batches, while the fused
scaled-dot-product kernel has no CPU batching rule and would run row by row (~5x slower).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .base import Call, GramOptions, Probe, Rule, Segments, register_rule
from .fallback import per_row_grads, segment_results
from .linear import LinearRule

_PROJ = {"in": ("in_proj_weight", "in_proj_bias"), "out": ("out_proj.weight", "out_proj.bias")}


def _acc_node(p: torch.Tensor):
    """The AccumulateGrad node of leaf p."""
    return p.view_as(p).grad_fn.next_functions[0][0]


def _find_consumers(out: torch.Tensor, targets: dict, stop: set) -> dict[str, list]:
    """{key: [nodes]} of graph nodes reached from ``out`` that take a transpose of a target
    leaf (targets: AccumulateGrad node -> key), not walking past ``stop`` nodes."""
    found: dict[str, list] = {}
    seen = set()
    todo = [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if type(nxt).__name__ == "TBackward0" and nxt.next_functions[0][0] in targets:
                found.setdefault(targets[nxt.next_functions[0][0]], []).append(node)
            elif nxt not in targets:
                todo.append(nxt)
    return found


class _Slot:
    """One projection of one call: its input A ((L·N, in) as the graph saved it, or the
    in-projection's (N, L, E) query) and output gradient D (L·N, out)."""

    __slots__ = ("A", "D")

    def __init__(self, A):
        self.A, self.D = A, None


def _saved_input(node):
    for name in ("_saved_mat1", "_saved_self"):
        if hasattr(node, name):
            return getattr(node, name)
    return None


@register_rule(nn.MultiheadAttention)
class AttentionRule(Rule):
    kind = "attention"
    claims_subtree = True
    deferred = True

    rows_at = "custom"

    def __init__(self, module, path, params):
        super().__init__(module, path, params)
        m = module
        self.graph_ok = m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None and not m.add_zero_attn
        self.fallen_back = False

    def layout_problem(self, layout, out):
        """The rows must be where the module keeps its batch: dim 0 with batch_first, else
        dim 1 (or a one-row call)."""
        want = 0 if self.module.batch_first else 1
        if layout.dim is None or (layout.dim == want and layout.k == 1 and out.dim() == 3):
            return None
        return (f"the rows are in {layout.describe()} of its output {tuple(out.shape)}, but with "
                f"batch_first={self.module.batch_first} nn.MultiheadAttention keeps its batch in dim {want}")

    def _sub(self, which: str) -> LinearRule:
        w, b = _PROJ[which]
        params = {k: self.params[n] for k, n in (("weight", w), ("bias", b)) if n in self.params}
        mod = self.module.out_proj if which == "out" else self.module
        return LinearRule(mod, f"{self.path}.{which}_proj", params)

    def capture(self, module, args, kwargs, output):
        need = {"need_weights": True}
        fb_args, fb_kwargs = (args[:4] + (True,) + args[5:], kwargs) if len(args) > 4 else (args, {**kwargs, **need})
        saved = {"fallback": (fb_args, fb_kwargs), "graph": None, "handles": []}
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        value = args[2] if len(args) > 2 else kwargs.get("value")
        out = output[0] if isinstance(output, tuple) else output
        if not (self.graph_ok and query is key and key is value and query.dim() == 3 and out.grad_fn is not None):
            return saved
        targets = {_acc_node(module.in_proj_weight): "in", _acc_node(module.out_proj.weight): "out"}
        stop = {query.grad_fn} if query.grad_fn is not None else set()
        found = _find_consumers(out, targets, stop)
        if sorted(found) != ["in", "out"] or any(len(v) != 1 for v in found.values()):
            return saved
        if module.batch_first:
            N, L, E = query.shape
        else:
            L, N, E = query.shape
        graph = {}
        for which, (node,) in found.items():
            A = _saved_input(node)
            if A is None or A.dim() != 2 or A.shape[0] != L * N:
                return saved
            graph[which] = _Slot(A.detach())
            saved["handles"].append(node.register_prehook(partial(self._on_grad, graph[which])))
        q_LN = query.detach().transpose(0, 1) if module.batch_first else query.detach()  # [L, N, E]
        if not torch.equal(graph["in"].A.view(L, N, E), q_LN):
            return saved
        if module.batch_first and query.is_contiguous():  # the same rows, already (N, L, E): no copy later
            graph["in"].A = query.detach()
        saved["graph"] = graph
        saved["NL"] = (N, L)
        return saved

    def _on_grad(self, slot: _Slot, grad_outputs):
        g = grad_outputs[0]
        slot.D = g if slot.D is None else slot.D + g
        if self.notify is not None:
            self.notify()

    def ready(self, calls: list[Call]) -> bool:
        """Every call read from the graph and both projections' gradients in."""
        return bool(calls) and all(
            c.saved["graph"] is not None and all(s.D is not None for s in c.saved["graph"].values()) for c in calls
        )

    def drop(self, calls: list[Call]) -> None:
        for c in calls:
            for slot in (c.saved["graph"] or {}).values():
                slot.A = slot.D = None

    def hooks(self, saved) -> list:
        return saved["handles"]

    def _linear_calls(self, calls: list[Call]) -> dict[str, list[Call]] | None:
        """Per projection, the recorded calls as Linear calls on (N, L, ·) rows, or None when
        some call was not read from the graph."""
        out: dict[str, list[Call]] = {"in": [], "out": []}
        for c in calls:
            graph = c.saved["graph"]
            if graph is None:
                return None
            N, L = c.saved["NL"]
            for which, slot in graph.items():
                if slot.D is None:
                    continue
                key = f"linear_{which}"
                if key not in c.cache:
                    # one copy into (N, L, ·) order: the Linear rule's batched tile GEMMs and
                    # reductions over (L, N)-ordered views run ~2x slower than the copy costs
                    # (the in-projection's A is the query itself when that was contiguous)
                    A = slot.A if slot.A.dim() == 3 else slot.A.view(L, N, -1).transpose(0, 1).contiguous()
                    D = slot.D.view(L, N, -1).transpose(0, 1).contiguous()
                    c.cache[key] = Call(saved=A, grads=[D])
                out[which].append(c.cache[key])
        return out

    def finish(self, calls: list[Call], seg: Segments, opts: GramOptions, probes: dict[str, Probe], tiles=None):
        """Grams from the graph-read projections (with ``tiles``, the Linear rule's kept
        segment gradients go there, Rule.grams), or from the per-row fallback (then also
        segment gradients for combine)."""
        lin = self._linear_calls(calls)
        self.fallen_back = lin is None
        if lin is None:
            fb = [Call(saved=c.saved["fallback"], grads=c.grads, rows=c.rows) for c in calls]
            names = {loc: g for loc, g in self.params.items()}
            return segment_results(per_row_grads(self.module, names, fb, seg.N), seg, opts, probes)
        grams = {}
        for which in ("in", "out"):
            sub = self._sub(which)
            if sub.params:
                grams.update(sub.grams(lin[which], seg, opts, tiles))
                sub.probe(lin[which], seg, probes, tiles)
                self.methods.update(sub.methods)
        return grams, {}

    def segment_grads(self, calls, seg: Segments, opts: GramOptions):
        """The projections' per-segment gradients from the graph-read calls (the per-row
        fallback's are kept by the engine)."""
        lin = self._linear_calls(calls)
        out = {}
        for which in ("in", "out"):
            sub = self._sub(which)
            if sub.params and lin is not None:
                out.update(sub.segment_grads(lin[which], seg, opts))
        return out

    def combine(self, calls, seg: Segments, weights, totals):
        lin = self._linear_calls(calls)
        out = {}
        for which in ("in", "out"):
            sub = self._sub(which)
            if any(g in weights for g in sub.params.values()):
                out.update(sub.combine(lin[which], seg, weights, totals))
        return out

    def describe(self) -> dict[str, str]:
        if self.fallen_back:
            return {g: f"fallback:module({self.path})" for g in self.params.values()}
        return {g: self.methods.get(g, "attention").replace("linear", "attention") for g in self.params.values()}
