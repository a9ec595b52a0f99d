"""SampleGram: the fp64 Gram of per-segment gradients from one forward/backward pass.

Usage (DESIGN.md §2, §5)::

    sg = SampleGram(model)                       # trainable parameters, mode="store"
    with sg.record(segments):                    # segments: (N,) ids in [0, S) or -1
        loss_fn(model(x), y).backward()          # the user's own forward + backward
    K = sg.gram()                                # (S, S) fp64: K[s, t] = <g_s, g_t>
    sg.combine(w)                                # p.grad = Σ_s w[s] g_s for every parameter

g_s is the gradient of the part of the backpropagated loss that comes from the rows of
segment s (rows: dim 0 of the batch; every position of a sequence row belongs to its row).
Rows must be independent (no BatchNorm in train mode, no attention across the batch).

How. Hooks on the modules that own the tracked parameters record each call's input and,
in the backward, the gradient of its output; a per-layer rule (``rules/``) turns them into
the Gram of its own parameters without forming per-sample gradients (ghost or tiled
explicit "flash-Gram" for Linear/Conv, explicit for small tensors; nn.MultiheadAttention's
two projections are read from the autograd graph of each call, rules/attention.py).
Everything else is exact through ``torch.func``, reported by ``coverage()``:

* ``fallback:module(path)``: a module without a rule (custom layers, PReLU, attention
  configurations the attention rule does not read) is re-run per row with
  ``vmap(grad(...))`` for just its own parameters (rules/fallback.py);
* ``fallback:traced``: parameters with no module boundary (a bare ``nn.Parameter`` of the
  root module such as a class token or positional embedding, weights tied between
  modules, weights used functionally) are followed op by op while the forward runs and
  differentiated per row through just the ops that use them (rules/traced.py);
* ``fallback:rerun``: when neither applies, the whole model is re-run per row.

Per-tensor Grams are per parameter tensor; the global Gram is their sum.

Safety net. Each step, every tracked parameter gets a random rank-1 probe uᵀ(·)w of its
summed gradient: the rule's Σ over all rows against the gradient autograd delivered to the
parameter (a tensor hook). A parameter whose gradient also came from elsewhere (used
functionally outside its module, tied, a loss term on the weights) fails the probe; it is
moved, with a warning, to the whole-model fallback (that step) and to the tracer (later
steps), which are exact if the model's rows are independent and the loss is a sum over
rows; if even that does not add up, a ValueError explains. A wrong Gram is never returned
silently. For a detached weight (below) the check is exact instead of probabilistic: its
own layer gives autograd nothing, so any gradient autograd delivers to it came from
outside; the layer's own part is then added to the probe's autograd side, so that the
fallback is checked against what autograd's full gradient would have been.

Modes.
* ``store`` (default): the Grams are formed when ``record()`` exits. ``combine(w)`` needs
  no second backward: for a layer whose explicit Gram kept its per-segment gradients
  X (S, numel) ("kept tiles", rules/matrix.py: explicit layers where X is no larger than
  the layer's recorded input + output gradient, i.e. convolutions and sequence layers) it
  is Σ_s w_s X_s, an (S)·(S x numel) contraction, and that layer's recorded tensors are
  dropped right after its Gram; for the others (ghost layers, small tensors) one GEMM per
  layer from the recorded tensors (Σ_rows w_seg(r) D_rᵀ A_r). Accepts per-tensor weights.
  Cost: one backward; memory: the layer inputs (which autograd keeps until the backward
  anyway) plus every layer's output gradient until record() exits, then the kept tiles and
  the ghost layers' tensors until the next step.
* ``stream``: each layer's Gram is formed inside its backward hook and its tensors are
  dropped at once (torch.func-fallback modules and traced parameters keep theirs until the
  context exits), so the peak memory is a plain step's plus the Gram's tiles (measured
  1.0-1.1x plain on the benchmark models). The weighted combination
  then needs a second forward/backward: run it under ``with sg.reweight(w):`` (scales each
  row's gradient at the model output by its segment's weight, so ``.grad`` becomes
  Σ_s w_s g_s), or backpropagate Σ_r ``sg.row_weights(w)[r]``·loss_r yourself. Global
  weights only. It pays when a step's activations dominate memory (long sequences, large
  images) and a second pass is cheaper than running out of memory; otherwise ``store``
  is faster (bench/RESULTS.md, "SampleGram (CPU)").

Detached weights (store mode). A Linear/Conv weight whose Gram comes from per-segment
gradients the engine forms anyway need not also be summed by autograd: a forward
pre-hook swaps the module's ``weight`` for a detached alias for the duration of its
forward (restored by a forward hook that runs first, and on any exception), so the
backward skips that weight-gradient GEMM (1/3 of a Linear layer's step). Which layers:

* ``record_grads=True`` (default, ``.grad`` after ``record()`` is autograd's summed
  gradient, as after a plain backward): layers with kept tiles, when every row is in a
  segment; their ``.grad`` is filled from the tiles, Σ_s X_s (S·numel adds instead of an
  N·T·numel GEMM). Rows with id -1 are not in the tiles, so then nothing is detached.
* ``record_grads=False`` (``OrthoGrad``: combine always follows): every Linear/Conv
  weight, its ``.grad`` left for ``combine()`` to write (for a ghost layer combine is then
  one GEMM over all rows instead of autograd's plus one over the rows off the dominant
  weight).

A convolution also reads its bias detached (Rule.detach_bias: its CPU backward forms the
weight gradient whenever the bias needs one). A layer is detached only if its output
still needs a gradient without the detached parameters (from its input or bias), or if
its rule anchors the output: a convolution whose inputs need no gradient (a first layer)
gets a 0-dim zero leaf of the step that requires grad added to its output in place (same
values), so the rule's hook still sees the output gradient while autograd skips the
layer's backward. The choice is made at its first call of the step and kept for its
other calls. A graph built inside ``record()`` does not carry a detached weight's
gradient after the context (a second backward of it outside ``record()`` skips that
weight).
nn.MultiheadAttention's projections are read from the graph and never detached.
"""
from __future__ import annotations

import contextlib
import warnings
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten

from .rules import GramOptions, ModuleFallback, Probe, Rule, Segments, rule_class_for
from .rules.base import Call, probe_shape
from .rules.fallback import per_row_grads, segment_results
from .rules.norm import batchnorm_problem
from .rules.traced import ParamTracer, traced_row_grads

_MODES = ("store", "stream")
_BACKENDS = ("auto", "torch")
_METHODS = ("auto", "ghost", "explicit")
_PRECISIONS = ("fast", "high")
# rounding allowance multipliers of the probe check (rules.base.Probe)
_RULE_SLACK = 64.0
_FALLBACK_SLACK = 1024.0


class _Step:
    """Everything one ``record()`` keeps: calls, probes, Grams, fallback segment gradients."""

    def __init__(self, seg: Segments, stream: bool):
        self.seg = seg
        self.stream = stream
        self.active = True
        self.finished = False
        self.calls: dict[Rule, list] = {}
        self.done: set[Rule] = set()
        self.handles: list = []
        self.probes: dict[str, Probe] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.seg_grads: dict[str, torch.Tensor] = {}
        self.tiles: dict[str, torch.Tensor] = {}
        self.any_grad = False
        self.tracer: ParamTracer | None = None
        self.grad_was_none: dict[str, bool] = {}
        self.totals: dict[str, tuple] = {}
        self.detach: dict[Rule, tuple[str, ...]] = {}  # per rule: its params read detached this step
        self.swapped: dict[nn.Module, dict[str, nn.Parameter]] = {}  # modules running with detached params
        self.anchored: set[nn.Module] = set()  # modules whose output this call gets anchor added
        self.anchors: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> 0-dim zero leaf


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _versions(obj) -> tuple:
    out = []
    for t in _tensors(obj):
        try:
            out.append(t._version)
        except RuntimeError:  # inference tensors carry no version counter
            out.append(None)
    return tuple(out)


@contextlib.contextmanager
def _no_tf32():
    """fp32 GEMMs at full precision while Grams are formed (TF32 would cost ~1e-3)."""
    old = torch.get_float32_matmul_precision()
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
        torch.backends.cudnn.allow_tf32 = old_cudnn


class SampleGram:
    """Per-segment gradient Gram engine (module docstring).

    Args:
        model: any ``nn.Module``; its batch must be in dim 0 of every layer input.
        params: parameters to serve (default: every parameter with ``requires_grad``, so a
            frozen backbone with trainable adapters needs nothing). Each must require grad.
        mode: "store" or "stream" (module docstring).
        backend: "auto" or "torch" (the CPU production path; no other backend yet).
        method: "auto" (per-layer cost model), "ghost" or "explicit", for Linear/Conv weights.
        precision: "fast" (fp32 products summed in fp64) or "high" (fp64 products).
        record_grads: True: after ``record()`` the served parameters' ``.grad`` hold autograd's
            summed gradient, as after a plain backward. False (store mode): Linear/Conv
            weights are read detached in the forward, so autograd does not form their summed
            gradient and their ``.grad`` is left for ``combine()`` to write: for callers that
            always combine (``OrthoGrad``). Module docstring, "Detached weights".
    """

    def __init__(
        self,
        model: nn.Module,
        params=None,
        *,
        mode: str = "store",
        backend: str = "auto",
        method: str = "auto",
        precision: str = "fast",
        record_grads: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"SampleGram: model must be an nn.Module, got {type(model).__name__}")
        for name, val, allowed in (
            ("mode", mode, _MODES),
            ("backend", backend, _BACKENDS),
            ("method", method, _METHODS),
            ("precision", precision, _PRECISIONS),
        ):
            if val not in allowed:
                raise ValueError(f"SampleGram: {name}={val!r}, expected one of {allowed}")
        self.model = model
        self.mode = mode
        self.backend = backend
        self.record_grads = bool(record_grads)
        # stream mode forms Grams while autograd still holds the activations: smaller tiles
        self._opts = GramOptions(method=method, precision=precision, budget=1 << (20 if mode == "stream" else 22))
        self._tracked = self._resolve_params(params)
        self._build_rules()
        self._bn = [(p, m) for p, m in model.named_modules() if isinstance(m, _BatchNorm)]
        self._step: _Step | None = None
        self._closed = False
        self._probe_vectors = self._make_probe_vectors()

    def _make_probe_vectors(self) -> dict[str, tuple]:
        """One random unit rank-1 probe (u, w, w's factors, casts) per parameter (rules.base.Probe),
        drawn from a private generator (the global RNG is untouched)."""
        gen = torch.Generator().manual_seed(0x5A3)

        def unit(k):
            v = torch.randn(k, generator=gen, dtype=torch.float64)
            return v / v.norm().clamp_min(1e-300)

        sizes = {}
        for rule in self._rule_list():
            for local, g in rule.params.items():
                sizes[g] = rule.probe_factors(local)
        out = {}
        for gname, p in self._tracked.items():
            m, n = probe_shape(p)
            factors = tuple(unit(k) for k in sizes.get(gname, ()))
            if factors:
                w = factors[0]
                for f in factors[1:]:
                    w = torch.kron(w, f)
            else:
                w = unit(n)
            out[gname] = (unit(m), w, factors, {})  # {} : casts of u, w (Probe.cast)
        return out

    # ---------------------------------------------------------------- construction
    def _resolve_params(self, params) -> dict[str, nn.Parameter]:
        named = list(self.model.named_parameters())
        if params is None:
            return {n: p for n, p in named if p.requires_grad}
        if isinstance(params, torch.Tensor):
            params = [params]
        wanted = list(params)
        by_id = {id(p): n for n, p in named}
        out = {}
        for p in wanted:
            if id(p) not in by_id:
                raise ValueError("SampleGram: a tensor in params is not a parameter of model")
            if not p.requires_grad:
                raise ValueError(f"SampleGram: parameter {by_id[id(p)]!r} has requires_grad=False")
            out[by_id[id(p)]] = p
        return {n: p for n, p in named if n in out}

    def _build_rules(self) -> None:
        """Assign every tracked parameter to a rule, a module fallback or the root fallback."""
        model = self.model
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        modules = list(model.named_modules())
        for path, m in modules:
            for local, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((path, m, local))
        claimers = [
            (path, m)
            for path, m in modules
            if (cls := rule_class_for(m)) is not None and cls.claims_subtree
        ]
        self._rules: dict[int, Rule] = {}
        self._root = ModuleFallback(model, "", {})
        self._reasons: dict[str, str] = {}
        self._root_how: dict[str, str] = {}

        def add(module, path, cls, local, gname):
            key = id(module)
            if key not in self._rules:
                self._rules[key] = cls(module, path, {})
            self._rules[key].params[local] = gname

        for gname, p in self._tracked.items():
            own = owners[id(p)]
            if len(own) > 1:
                where = ", ".join(repr(o[0] + "." + o[2] if o[0] else o[2]) for o in own)
                self._to_root(gname, f"tied: shared by {where}")
                continue
            path, m, local = own[0]
            claim = next(
                ((cp, cm) for cp, cm in claimers if cp == "" or path == cp or path.startswith(cp + ".")),
                None,
            )
            if claim is not None:
                cp, cm = claim
                sub = path if cp == "" else path[len(cp) + 1 :]
                add(cm, cp, rule_class_for(cm), f"{sub}.{local}" if sub else local, gname)
                continue
            cls = rule_class_for(m)
            reason = None if cls is None else cls.unsupported(m)
            if cls is not None and reason is None:
                add(m, path, cls, local, gname)
            elif m is model:
                self._to_root(gname, "parameter of the root module, used in its forward")
            else:
                why = reason or f"no rule for {type(m).__name__}"
                add(m, path, ModuleFallback, local, gname)
                self._reasons[gname] = why

    def _to_root(self, gname: str, reason: str) -> None:
        self._root.params[gname] = gname
        self._reasons[gname] = reason

    # ---------------------------------------------------------------- record
    def _segments(self, segments, num_segments) -> Segments:
        if not isinstance(segments, torch.Tensor):
            segments = torch.as_tensor(segments)
        if segments.dim() != 1:
            raise ValueError(f"segments must be 1-D (one id per row), got shape {tuple(segments.shape)}")
        if segments.dtype == torch.bool or segments.is_floating_point() or segments.is_complex():
            raise ValueError(f"segments must be an integer tensor, got {segments.dtype}")
        if segments.numel() == 0:
            raise ValueError("segments is empty: the batch needs at least one row")
        ids = segments.detach().to(torch.long).clone()
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1:
            raise ValueError(f"segment ids must be in [0, S) or -1 (ignored row), got {lo}")
        if num_segments is None:
            S = hi + 1
        else:
            S = int(num_segments)
            if S < 0:
                raise ValueError(f"num_segments must be >= 0, got {num_segments}")
            if hi >= S:
                raise ValueError(
                    f"segment id {hi} is out of range for num_segments={S} (ids must be in [0, {S}) or -1)"
                )
        return Segments(ids, S)

    @contextlib.contextmanager
    def record(self, segments, num_segments: int | None = None):
        """Context manager around the user's forward + backward of one batch.

        segments: (N,) integer ids, one per row (dim 0 of the batch), in [0, S) or -1 to
        ignore the row; S = num_segments, or max id + 1. Drops the previous step's state.
        Hooks are removed on exit, also when the body raises.
        """
        self._check_open()
        if self._step is not None and self._step.active:
            raise RuntimeError("SampleGram.record() is already active (no nesting)")
        seg = self._segments(segments, num_segments)
        self._step = None
        step = _Step(seg, stream=self.mode == "stream")
        self._step = step
        try:
            self._install(step)
            yield self
        except BaseException:
            self._uninstall(step)
            self._step = None
            raise
        self._uninstall(step)
        try:
            with _no_tf32():
                self._finish(step)
        except BaseException:
            self._step = None
            raise

    def _rule_list(self) -> list[Rule]:
        return list(self._rules.values())

    def _install(self, step: _Step) -> None:
        detach = not step.stream and (step.seg.all_kept or not self.record_grads)
        for rule in self._rule_list():
            rule.skipped, rule.forced = set(), set()
            if rule.params:
                if detach and rule.local("weight") is not None and not rule.deferred:
                    m = rule.module  # swap in a detached weight; the restore hook runs first
                    pre = partial(self._on_pre_forward, step, rule)
                    step.handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                    restore = partial(self._restore_weight, step)  # also when the forward raises
                    step.handles.append(m.register_forward_hook(restore, prepend=True, always_call=True))
                h = rule.module.register_forward_hook(partial(self._on_forward, step, rule), with_kwargs=True)
                step.handles.append(h)
                rule.notify = partial(self._on_rule_ready, step, rule) if step.stream and rule.deferred else None
        h = self.model.register_forward_hook(partial(self._on_forward, step, self._root), with_kwargs=True)
        step.handles.append(h)
        for path, m in self._bn:
            step.handles.append(m.register_forward_pre_hook(partial(self._check_bn, step, path)))
        for gname, p in self._tracked.items():
            step.grad_was_none[gname] = p.grad is None
            u, w, factors, cast = self._probe_vectors[gname]
            step.probes[gname] = Probe(u, w, factors, cast=cast)
            step.handles.append(p.register_hook(partial(self._on_param_grad, step, gname)))
        if self._root.params:
            step.tracer = ParamTracer({g: self._tracked[g] for g in self._root.params}, step.seg.N)
            step.tracer.__enter__()

    def _uninstall(self, step: _Step) -> None:
        for m in list(step.swapped):  # a forward interrupted before its hooks ran
            self._restore_weight(step, m, ())
        step.anchored.clear()
        if step.active and step.tracer is not None:
            step.tracer.__exit__(None, None, None)
            step.tracer.close()
        step.active = False
        for h in step.handles:
            h.remove()
        step.handles.clear()
        for rule in self._rule_list():
            rule.notify = None

    def _check_bn(self, step: _Step, path: str, module, args):
        if not step.active:
            return
        problem = batchnorm_problem(module)
        if problem is not None:
            raise ValueError(
                f"SampleGram: BatchNorm {path!r} {problem}; per-sample gradients need independent "
                "rows. Call .eval() on norm layers (e.g. model.eval()) before record()."
            )

    def _on_pre_forward(self, step: _Step, rule: Rule, module, args, kwargs):
        """Store mode: run the layer with its weight detached (Rule.detach_weight: with
        ``record_grads``, only when its Gram will keep the segment gradients; decided at the
        layer's first call of the step, then the same for every call). Module docstring,
        "Detached weights"."""
        if not step.active:
            return
        if rule not in step.detach:
            need_tiles = self.record_grads
            names: tuple[str, ...] = ()
            if rule.detach_weight(args, kwargs, step.seg, self._opts, need_tiles):
                names = ("weight",)
                if rule.local("bias") is not None and rule.detach_bias(args, kwargs):
                    names += ("bias",)
                rule.skipped.update(rule.local(n) for n in names)
                if need_tiles:
                    rule.forced.add(rule.local("weight"))
            step.detach[rule] = names
        if step.detach[rule]:
            swapped = {n: self._tracked[rule.local(n)] for n in step.detach[rule]}
            step.swapped[module] = swapped
            for n, p in swapped.items():
                module._parameters[n] = p.detach()
            if rule.anchors_output and not any(t.requires_grad for t in _tensors((args, kwargs))):
                step.anchored.add(module)

    @staticmethod
    def _restore_weight(step: _Step, module, args, output=None):
        """Put the module's parameters back; an anchored output (Rule.anchors_output) gets
        a 0-dim zero leaf of the step that requires grad added in place (no copy of the
        activation): the same values (-0.0 turns +0.0), now in the graph so its output
        gradient reaches the rule's hook, while the layer itself stays out of the backward."""
        for n, p in step.swapped.pop(module, {}).items():
            module._parameters[n] = p
        if module in step.anchored:
            step.anchored.discard(module)
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                key = (output.dtype, output.device)
                if key not in step.anchors:
                    step.anchors[key] = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                return output.add_(step.anchors[key])
        return None

    def _on_forward(self, step: _Step, rule: Rule, module, args, kwargs, output):
        if not step.active:
            return
        rule.check(module)
        saved = rule.capture(module, args, kwargs, output)
        step.handles.extend(rule.hooks(saved))
        if not rule.deferred:
            n = rule.batch_rows(saved)
            if n != step.seg.N:
                raise ValueError(
                    f"SampleGram: module {rule.path!r} ({type(module).__name__}) got an input with "
                    f"{'no batch dim' if n < 0 else f'{n} rows in dim 0'}, but segments has "
                    f"{step.seg.N} entries; segments needs one id per row of dim 0 of the batch, "
                    "and every layer must see the batch in dim 0 (batch_first=True)"
                )
        leaves = tree_flatten(output)[0]
        live = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not live:
            return
        if step.stream and rule in step.done:
            raise ValueError(
                "SampleGram(mode='stream') needs one forward and one backward per record(): "
                f"module {rule.path!r} was called again after its backward"
            )
        call = Call(saved=saved, grads=[None] * len(leaves), versions=_versions(saved))
        step.calls.setdefault(rule, []).append(call)
        for i in live:
            step.handles.append(leaves[i].register_hook(partial(self._on_out_grad, step, rule, call, i)))

    def _on_out_grad(self, step: _Step, rule: Rule, call, i: int, g: torch.Tensor):
        if not step.active:
            return
        step.any_grad = True
        if step.stream and rule in step.done:
            raise ValueError(
                "SampleGram(mode='stream') needs one backward per record(); use mode='store' "
                "to backpropagate several losses"
            )
        if call.grads[i] is None:
            call.grads[i] = g
        else:
            if step.stream and not rule.deferred:
                raise ValueError(
                    "SampleGram(mode='stream') needs one backward per record(); use mode='store' "
                    "to backpropagate several losses"
                )
            call.grads[i] = call.grads[i] + g
        if step.stream and not rule.deferred:
            calls = step.calls[rule]
            if all(c.grads[0] is not None for c in calls):
                self._stream_process(step, rule)

    def _stream_process(self, step: _Step, rule: Rule) -> None:
        """Stream mode: form the rule's Grams now, then empty its calls (the hooks on the
        graph keep the Call objects until the graph dies, so they must not keep tensors)."""
        calls = step.calls.pop(rule, [])
        self._check_versions(rule, calls)
        with _no_tf32():
            if rule.deferred:
                grams, seg_grads = rule.finish(calls, step.seg, self._opts, step.probes)
                step.seg_grads.update(seg_grads)
            else:
                grams = rule.grams(calls, step.seg, self._opts)
                rule.probe(calls, step.seg, step.probes)
            step.grams.update(grams)
        self._drop_calls(rule, calls)
        step.done.add(rule)

    def _on_rule_ready(self, step: _Step, rule: Rule) -> None:
        """A deferred rule says all it needs arrived (stream mode): process it now."""
        if step.active and rule not in step.done and rule.ready(step.calls.get(rule, [])):
            self._stream_process(step, rule)

    def _on_param_grad(self, step: _Step, gname: str, g: torch.Tensor):
        if not step.active:
            return
        step.any_grad = True
        pr = step.probes[gname]
        pr.autograd += pr.contract(g.to_dense() if g.is_sparse else g)
        pr.seen_autograd = True

    @staticmethod
    def _check_versions(rule: Rule, calls) -> None:
        for c in calls:
            if _versions(c.saved) != c.versions:
                raise ValueError(
                    f"SampleGram: the input of module {rule.path!r} ({type(rule.module).__name__}) was "
                    "modified in place after its forward; SampleGram reads it after the backward"
                )

    # ---------------------------------------------------------------- after the backward
    def _finish(self, step: _Step) -> None:
        seg = step.seg
        if any(step.calls.values()) and not step.any_grad and self._tracked:
            raise RuntimeError(
                "SampleGram.record(): no gradient reached the model inside the context; call "
                "loss.backward() inside `with sg.record(...)`"
            )
        rules = [r for r in self._rule_list() if r.params]
        tiles = None if step.stream else step.tiles
        for rule in rules:
            if rule.deferred:
                continue
            calls = step.calls.get(rule, [])
            if step.stream:
                if rule not in step.done:
                    self._stream_process(step, rule)
            else:
                self._check_versions(rule, calls)
                step.grams.update(rule.grams(calls, seg, self._opts, tiles))
                rule.probe(calls, seg, step.probes, tiles)
                self._finish_detached(step, rule, calls)
                self._drop_if_tiled(step, rule)
        for rule in rules:
            if rule.deferred and rule not in step.done:
                calls = step.calls.get(rule, [])
                self._check_versions(rule, calls)
                grams, seg_grads = rule.finish(calls, seg, self._opts, step.probes, tiles=tiles)
                step.grams.update(grams)
                step.seg_grads.update(seg_grads)
                if not step.stream:
                    self._drop_if_tiled(step, rule)
        skipped = {g for rule in rules for g in rule.skipped}
        moved = []
        for gname, pr in step.probes.items():
            if gname in self._root.params:
                continue
            if gname in skipped:  # any gradient autograd delivered came from outside the layer
                if pr.seen_autograd:
                    moved.append(gname)
                continue
            slack = _FALLBACK_SLACK if gname in step.seg_grads else _RULE_SLACK
            if pr.mismatch(torch.finfo(self._tracked[gname].dtype).eps, slack):
                moved.append(gname)
        traced = [g for g in self._root.params if step.tracer is not None and g in step.tracer.params]
        for gname in moved:
            self._reroute(gname, step)
        if self._root.params:
            self._root_fallback(step, traced)
        if step.stream:
            step.calls.clear()
        else:
            for g, p in self._tracked.items():
                if step.grad_was_none[g] and p.grad is not None and not p.grad.is_sparse:
                    step.totals[g] = (p.grad, p.grad._version)
        step.tracer = None
        step.finished = True

    def _finish_detached(self, step: _Step, rule: Rule, calls) -> None:
        """Weights the rule's calls read detached. With ``record_grads`` add the layer's part
        Σ_s g_s (every row is kept) to ``.grad``, where autograd would have put it. If
        autograd still delivered a gradient (from outside the layer: the parameter will be
        rerouted), add the layer's part to the probe's autograd side too, so that it holds
        what autograd's full gradient would have given (the fallback checks against it)."""
        for gname in rule.skipped:
            pr = step.probes[gname]
            if pr.seen_autograd:
                fresh = {g: Probe(q.u, q.w, q.w_factors) for g in rule.params.values() for q in [step.probes[g]]}
                skipped, rule.skipped = rule.skipped, set()
                try:
                    rule.probe(calls, step.seg, fresh, step.tiles)
                finally:
                    rule.skipped = skipped
                pr.autograd += fresh[gname].engine
            X = step.tiles.get(gname)
            if self.record_grads and X is not None:
                p = self._tracked[gname]
                part = (X.new_ones(X.shape[0]) @ X).view(p.shape).to(p.dtype)  # Σ_s X_s as a GEMV
                if p.grad is None:
                    p.grad = part
                else:
                    p.grad += part

    @staticmethod
    def _drop_calls(rule: Rule, calls) -> None:
        """Release a rule's recorded tensors (hooks on a retained graph may keep the Call
        objects, so the calls are emptied, not just forgotten)."""
        rule.drop(calls)
        for c in calls:
            c.saved = None
            c.grads = [None] * len(c.grads)
            c.cache.clear()

    def _drop_if_tiled(self, step: _Step, rule: Rule) -> None:
        """Store mode: once every parameter of the rule has kept segment gradients (tiles),
        combine needs nothing else from its calls: free their inputs and output gradients."""
        if rule in step.calls and all(g in step.tiles for g in rule.params.values()):
            self._drop_calls(rule, step.calls.pop(rule))

    def _reroute(self, gname: str, step: _Step) -> None:
        """Move a parameter whose probe failed to the whole-model fallback (sticky)."""
        where = "<unknown>"
        for rule in self._rule_list():
            for local, g in list(rule.params.items()):
                if g == gname:
                    del rule.params[local]
                    where = rule.path or "<root>"
        step.grams.pop(gname, None)
        step.seg_grads.pop(gname, None)
        step.tiles.pop(gname, None)
        for rule in self._rule_list():
            rule.skipped.discard(gname)
            rule.forced.discard(gname)
        self._to_root(gname, f"gradient from outside its module {where!r} (used functionally or tied)")
        warnings.warn(
            f"SampleGram: parameter {gname!r} received gradient that the hooks of its module "
            f"{where!r} did not see (used functionally outside it, or tied); it is now served by "
            "the exact fallback (slower).",
            RuntimeWarning,
            stacklevel=4,
        )

    def _fresh_probes(self, step: _Step, names) -> None:
        for g in names:
            pr = step.probes[g]
            step.probes[g] = Probe(
                pr.u, pr.w, pr.w_factors, autograd=pr.autograd, seen_autograd=pr.seen_autograd, cast=pr.cast
            )

    def _bad(self, step: _Step, names) -> list[str]:
        return [
            g for g in names if step.probes[g].mismatch(torch.finfo(self._tracked[g].dtype).eps, _FALLBACK_SLACK)
        ]

    def _root_fallback(self, step: _Step, traced: list[str]) -> None:
        """Root-level parameters: from the op tracer when it could follow them (rules/traced.py),
        else by re-running the model per row; a mismatch after that is an error."""
        names = list(self._root.params)
        rerun = [g for g in names if g not in traced]
        tracer = step.tracer
        if traced and tracer is not None and tracer.problem is None:
            self._fresh_probes(step, traced)
            rows = traced_row_grads(tracer, {g: self._tracked[g] for g in traced})
            grams, seg_grads = segment_results(rows, step.seg, self._opts, step.probes)
            step.grams.update(grams)
            step.seg_grads.update(seg_grads)
            rerun += self._bad(step, traced)
            for g in traced:
                self._root_how[g] = "traced" if g not in rerun else "rerun"
        else:
            rerun = names
        if not rerun:
            return
        for g in rerun:
            self._root_how[g] = "rerun"
        calls = step.calls.get(self._root, [])
        if not calls:
            if not any(step.probes[g].seen_autograd for g in rerun):
                return
            why = "; ".join(sorted({self._reasons[g] for g in rerun}))
            if tracer is not None and tracer.problem:
                why += f"; the op tracer could not follow them: {tracer.problem}"
            raise ValueError(
                f"SampleGram: parameters {sorted(rerun)} need the exact whole-model fallback ({why}), "
                "which re-runs the model per row, but the model given to SampleGram was not called "
                "inside record(); call it (model(x)) inside the context"
            )
        self._check_versions(self._root, calls)
        self._fresh_probes(step, rerun)
        rows = per_row_grads(self.model, {g: g for g in rerun}, calls, step.seg.N)
        grams, seg_grads = segment_results(rows, step.seg, self._opts, step.probes)
        step.grams.update(grams)
        step.seg_grads.update(seg_grads)
        bad = self._bad(step, rerun)
        if bad:
            raise ValueError(
                f"SampleGram: the gradient of {bad} is not the sum of per-row gradients of the "
                "model output: the loss has a term that belongs to no row (e.g. weight decay added "
                "to the loss: put it in the optimizer), rows interact (BatchNorm in train mode, "
                "attention across the batch), or the batch is not in dim 0. No Gram is returned."
            )

    # ---------------------------------------------------------------- results
    def _finished_step(self, what: str) -> _Step:
        self._check_open()
        step = self._step
        if step is None:
            raise RuntimeError(f"SampleGram.{what}() needs a completed record() step first")
        if not step.finished:
            raise RuntimeError(f"SampleGram.{what}() is available after the record() context exits")
        return step

    def gram(self, per_tensor: bool = False):
        """fp64 Gram of the per-segment gradients: (S, S), or {param name: (S, S)}.

        Names are those of ``model.named_parameters()``; the global Gram is the sum of the
        per-tensor ones (the inner product of concatenated vectors).
        """
        step = self._finished_step("gram")
        S = step.seg.S
        out = {}
        for gname, p in self._tracked.items():
            K = step.grams.get(gname)
            out[gname] = (
                torch.zeros((S, S), dtype=torch.float64, device=p.device) if K is None else K.clone()
            )
        if per_tensor:
            return out
        dev = next(iter(self._tracked.values())).device if self._tracked else torch.device("cpu")
        total = torch.zeros((S, S), dtype=torch.float64, device=dev)
        for K in out.values():
            total += K.to(dev)
        return total

    def _weights(self, weights, S: int) -> dict[str, torch.Tensor]:
        def vec(w, what):
            t = torch.as_tensor(w)
            if t.dim() != 1 or t.numel() != S:
                raise ValueError(f"combine weights{what} must have shape ({S},), got {tuple(t.shape)}")
            if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
                raise ValueError(f"combine weights{what} must be real numbers, got {t.dtype}")
            t = t.detach().to(torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"combine weights{what} contain NaN or Inf")
            return t

        if isinstance(weights, dict):
            missing = set(self._tracked) - set(weights)
            extra = set(weights) - set(self._tracked)
            if missing or extra:
                raise ValueError(
                    f"per-tensor combine weights must name every served parameter exactly: "
                    f"missing {sorted(missing)}, unknown {sorted(extra)}"
                )
            return {g: vec(weights[g], f"[{g!r}]") for g in self._tracked}
        w = vec(weights, "")
        return {g: w for g in self._tracked}

    def combine(self, weights) -> None:
        """Write Σ_s weights[s]·g_s into ``p.grad`` of every served parameter.

        weights: (S,) (one vector for all parameters) or {param name: (S,)}. Store mode only,
        no second backward: Σ_s w_s X_s for parameters with kept segment gradients X
        (S, numel), else one GEMM per layer from the recorded inputs and output gradients.
        While ``.grad`` still holds autograd's gradient of the recorded step (or, for a
        detached weight, the one formed from its tiles) its buffer is reused in place, and
        for the GEMM Σ_r w_r g_r = w*·Σ_r g_r + Σ_{w_r != w*} (w_r - w*)·g_r with w* the
        most common row weight (rules.base.dominant_weight). In stream mode use
        :meth:`reweight` (module docstring).
        """
        if self.mode == "stream":
            raise ValueError(
                "SampleGram.combine() needs mode='store': in mode='stream' each layer's input and "
                "output gradient were dropped once its Gram was formed. Run a second forward and "
                "backward inside `with sg.reweight(weights):` (it scales each row's output gradient "
                "by its segment's weight, so .grad becomes Σ_s w_s g_s), or backpropagate "
                "Σ_r sg.row_weights(weights)[r] * loss_r yourself. Per-tensor weights need mode='store'."
            )
        step = self._finished_step("combine")
        W = self._weights(weights, step.seg.S)
        grads: dict[str, torch.Tensor] = {}
        totals = {}
        for g, (t, version) in step.totals.items():  # autograd's summed gradient, if untouched
            if self._tracked[g].grad is t and t._version == version:
                totals[g] = t
        for rule in self._rule_list():
            names = [g for g in rule.params.values() if g not in step.seg_grads and g not in step.tiles]
            if names:
                calls = step.calls.get(rule, [])
                self._check_versions(rule, calls)
                grads.update(
                    rule.combine(calls, step.seg, {g: W[g] for g in names}, {g: totals.get(g) for g in names})
                )
        for gname, X in step.tiles.items():  # (S, numel): Σ_s w_s X_s, into .grad's buffer if free
            w, t = W[gname].to(X.device, X.dtype), totals.get(gname)
            out = t.view(-1) if t is not None and t.dtype == X.dtype and t.is_contiguous() else None
            grads[gname] = torch.mv(X.T, w, out=out) if out is not None else torch.mv(X.T, w)
        for gname, X in step.seg_grads.items():
            grads[gname] = torch.tensordot(W[gname].to(X.device, X.dtype), X, dims=1)
        for gname, p in self._tracked.items():
            g = grads.get(gname)
            p.grad = torch.zeros_like(p) if g is None else g.reshape(p.shape).to(p.dtype)

    def row_weights(self, weights) -> torch.Tensor:
        """(N,) weight of each row of the last record() (0 for ignored rows), from (S,) weights.

        Backpropagating Σ_r row_weights[r]·loss_r over the same rows (with the per-row loss
        terms of the recorded loss, e.g. including a mean's 1/N) gives Σ_s w_s g_s.
        """
        step = self._finished_step("row_weights")
        w = self._weights(weights, step.seg.S)
        vec = next(iter(w.values())) if w else torch.zeros(step.seg.S, dtype=torch.float64)
        dtype = torch.as_tensor(weights).dtype if not isinstance(weights, dict) else torch.float64
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        return step.seg.row_weights(vec, step.seg.ids.device, dtype)

    @contextlib.contextmanager
    def reweight(self, weights):
        """Second pass for mode='stream' (also valid in store mode): inside the context, run
        the same forward + backward on the same rows as the last record(); each row's
        gradient at the model output is scaled by its segment's weight, so afterwards
        ``p.grad`` = Σ_s weights[s]·g_s. ``.grad`` of served parameters is reset on entry.
        """
        step = self._finished_step("reweight")
        seg = step.seg
        w = self._weights(weights, seg.S)
        vec = next(iter(w.values())) if w else torch.zeros(seg.S, dtype=torch.float64)
        for p in self._tracked.values():
            p.grad = None
        handles: list = []
        state = {"called": False}

        def on_forward(module, args, kwargs, output):
            for t in _tensors(output):
                if not t.requires_grad:
                    continue
                if t.dim() == 0 or t.shape[0] != seg.N:
                    raise ValueError(
                        f"SampleGram.reweight(): a model output has shape {tuple(t.shape)}, not the "
                        f"{seg.N} rows of the recorded batch in dim 0"
                    )
                wr = seg.row_weights(vec, t.device, t.dtype).view((-1,) + (1,) * (t.dim() - 1))
                handles.append(t.register_hook(lambda g, wr=wr: g * wr))
            state["called"] = True

        handles.append(self.model.register_forward_hook(on_forward, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
        if not state["called"]:
            raise ValueError("SampleGram.reweight(): the model was not called inside the context")

    def coverage(self) -> dict[str, str]:
        """{param name: which rule serves it}, e.g. "linear:ghost", "conv2d:explicit",
        "fallback:module(layers.0.self_attn)", "fallback:root (tied: ...)". The ghost/explicit
        choice is shown once a step has formed the Gram ("linear" before)."""
        out = {}
        for rule in self._rule_list():
            for gname, desc in rule.describe().items():
                out[gname] = desc + (f" ({self._reasons[gname]})" if gname in self._reasons else "")
        for gname in self._root.params:
            how = self._root_how.get(gname, "traced")
            out[gname] = f"fallback:{how} ({self._reasons.get(gname, 'forced')})"
        return {g: out[g] for g in self._tracked}

    # ---------------------------------------------------------------- lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SampleGram is closed")

    def release(self) -> None:
        """Drop the last step's recorded tensors and Grams (memory back until next record())."""
        if self._step is not None and not self._step.active:
            self._step = None

    def close(self) -> None:
        """Remove every hook and drop all recorded state. Idempotent."""
        if self._step is not None:
            self._uninstall(self._step)
        self._step = None
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
