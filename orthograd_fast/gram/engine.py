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

Files. This module is the public API (arguments, ``record``, results, lifetime) and the
outline of a step. The rest, one concern per file:

* assign.py: which rule, module fallback or root fallback serves each parameter;
* capture.py: the step's hooks, recorded calls and output gradients, stream-mode
  processing, and detached weights;
* safety.py: the safety net (probes, their check, rerouting, the BatchNorm check);
* fallbacks.py: the root fallback after the backward (traced or whole-model rerun).

A wrong Gram is never returned silently: every parameter's summed gradient is checked
against autograd's each step (safety.py), and a parameter that does not add up is moved
to an exact fallback, or the step is refused with a ValueError.

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

Detached weights (store mode, capture.py): Linear/Conv weights whose summed gradient the
engine forms itself are read detached in the forward, so autograd skips their
weight-gradient GEMM. nn.MultiheadAttention's projections are never detached.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .assign import Assignment
from .capture import Capture, _no_tf32, _Step, _tensors, compiled_problem
from .fallbacks import Fallbacks
from .rules import GramOptions, Segments
from .rules.matrix_triton import check_backend
from .safety import SafetyNet

_MODES = ("store", "stream")
_BACKENDS = ("auto", "torch", "triton")
_METHODS = ("auto", "ghost", "explicit")
_PRECISIONS = ("fast", "high")


class NonFiniteGramError(FloatingPointError):
    """NaN/Inf in a per-sample Gram (``SampleGram.gram``)."""


class _WeightCasts:
    """combine()'s weights in a tile's device and dtype, each cast made once: per-tensor
    weights stacked as one (L, S) tensor are cast together (one op, not one per parameter),
    and one weight vector shared by every parameter (global weights) once per (device,
    dtype). Elementwise the same values as casting each vector on its own."""

    def __init__(self, W: dict[str, torch.Tensor], stacked: torch.Tensor | None):
        self.W, self.stacked, self.memo = W, stacked, {}

    def __call__(self, name: str, device, dtype) -> torch.Tensor:
        w = self.W[name]
        if w.device == torch.device(device) and w.dtype == dtype:
            return w
        if self.stacked is not None:
            key = ("stack", torch.device(device), dtype)
            if key not in self.memo:
                self.memo[key] = dict(zip(self.W, self.stacked.to(device, dtype).unbind(0)))
            return self.memo[key][name]
        key = (id(w), torch.device(device), dtype)
        if key not in self.memo:
            self.memo[key] = w.to(device, dtype)
        return self.memo[key]


class SampleGram(Assignment, Capture, SafetyNet, Fallbacks):
    """Per-segment gradient Gram engine (module docstring).

    Args:
        model: any ``nn.Module``; its batch must be in dim 0 of every layer input. Not a
            compiled one (``torch.compile``: ValueError, capture.py); gradient checkpointing
            with ``use_reentrant=False`` only.
        params: parameters to serve (default: every parameter with ``requires_grad``, so a
            frozen backbone with trainable adapters needs nothing). Each must require grad.
        mode: "store" or "stream" (module docstring).
        backend: "auto", "torch" or "triton", for the Linear/Conv Grams (the other rules and
            every combination run as torch ops). "triton": the Triton kernels
            (rules/matrix_triton.py), on CUDA tensors or, with TRITON_INTERPRET=1, CPU ones;
            a ValueError here when neither is possible or with precision="high", and at
            record() for a layer they cannot serve (fp64 rows). "auto": the kernels for
            CUDA tensors where they can serve, the torch path otherwise (the CPU's).
        method: "auto" (per-layer cost model), "ghost" or "explicit", for Linear/Conv weights.
        precision: "fast" (fp32 products summed in fp64) or "high" (fp64 products).
        record_grads: True: after ``record()`` the served parameters' ``.grad`` hold autograd's
            summed gradient, as after a plain backward. False (store mode): Linear/Conv
            weights are read detached in the forward, so autograd does not form their summed
            gradient and their ``.grad`` is left for ``combine()`` to write: for callers that
            always combine (``OrthoGrad``). capture.py, "Detached weights".
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
        check_backend(backend, precision)
        compiled = compiled_problem(model)
        if compiled is not None:
            raise ValueError(f"SampleGram: {compiled}")
        self.model = model
        self.mode = mode
        self.backend = backend
        self.record_grads = bool(record_grads)
        # stream mode forms Grams while autograd still holds the activations: smaller tiles
        self._opts = GramOptions(method=method, precision=precision, budget=1 << (20 if mode == "stream" else 22),
                                 backend=backend)
        self._tracked = self._resolve_params(params)
        self._build_rules()
        self._bn = [(p, m) for p, m in model.named_modules() if isinstance(m, _BatchNorm)]
        self._step: _Step | None = None
        self._row_models: dict = {}  # input signature -> rows.RowModel (capture.py, rows.py)
        self._last_segments: tuple | None = None  # (num_segments, Segments) of the last record()
        self._weights_stack: torch.Tensor | None = None  # per-tensor combine weights as one (L, S)
        self._closed = False
        self._probe_vectors = self._make_probe_vectors()

    # ---------------------------------------------------------------- record
    def _segments(self, segments, num_segments) -> Segments:
        """Checked ``Segments`` of a record() call. The same ids as the previous call's (an
        OrthoGrad step's every time) give the previous object back, so that the row plans
        it memoises (Segments.memo) are made once, not every step."""
        last = self._last_segments
        if (last is not None and isinstance(segments, torch.Tensor) and segments.dtype == torch.long
                and (num_segments is None or type(num_segments) is int) and num_segments == last[0]
                and segments.shape == last[1].ids.shape and segments.device == last[1].ids.device
                and torch.equal(segments, last[1].ids)):
            return last[1]
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
        seg = Segments(ids, S)
        if num_segments is None or type(num_segments) is int:
            self._last_segments = (num_segments, seg)
        return seg

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
        compiled = compiled_problem(self.model)  # compiled in place after construction
        if compiled is not None:
            raise ValueError(f"SampleGram: {compiled}")
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

    def _finish(self, step: _Step) -> None:
        """After the backward: the rules' Grams (capture.py), the probe check and reroutes
        (safety.py), the root fallback (fallbacks.py)."""
        if any(step.calls.values()) and not step.any_grad and self._tracked:
            raise RuntimeError(
                "SampleGram.record(): no gradient reached the model inside the context; call "
                "loss.backward() inside `with sg.record(...)`"
            )
        rules = [r for r in self._rule_list() if r.params]
        self._form_grams(step, rules)
        moved = self._failed_probes(step, rules)
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
        per-tensor ones (the inner product of concatenated vectors). Raises
        ``NonFiniteGramError`` (a FloatingPointError) naming the parameters whose Gram has
        NaN/Inf (the model's activations or gradients overflowed; NaN/Inf in the model's
        inputs is refused by ``record()`` already).
        """
        step = self._finished_step("gram")
        S = step.seg.S
        out = self._stacked_grams(step)
        if out is None:
            out = {}
            for gname, p in self._tracked.items():
                K = step.grams.get(gname)
                out[gname] = (
                    torch.zeros((S, S), dtype=torch.float64, device=p.device) if K is None else K.clone()
                )
            bad = [g for g, K in out.items() if not bool(torch.isfinite(K).all())]
        else:
            out, finite = out
            bad = [] if finite else [g for g, K in out.items() if not bool(torch.isfinite(K).all())]
        if bad:
            raise NonFiniteGramError(
                f"SampleGram.gram(): the per-sample Gram of {bad[:5]}{' ...' if len(bad) > 5 else ''} has "
                "NaN/Inf: the model's activations or gradients overflowed in this step"
            )
        if per_tensor:
            return out
        dev = next(iter(self._tracked.values())).device if self._tracked else torch.device("cpu")
        total = torch.zeros((S, S), dtype=torch.float64, device=dev)
        for K in out.values():
            total += K.to(dev)
        return total

    def _stacked_grams(self, step: _Step):
        """({name: (S, S)} as views of one fresh (L, S, S) copy of the step's Grams, whether
        all are finite), checked by one isfinite over the copy; None when some parameter
        has no Gram or they sit on several devices (``gram`` then copies them one by one)."""
        Ks = [step.grams.get(g) for g in self._tracked]
        if not Ks or any(K is None for K in Ks) or len({K.device for K in Ks}) > 1:
            return None
        stacked = torch.stack(Ks)  # [L, S, S]
        return dict(zip(self._tracked, stacked.unbind(0))), bool(torch.isfinite(stacked).all())

    def segment_grads(self, names=None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The per-segment gradients themselves, exact, for the served parameters ``names``
        (default: all): {name: (X, index)}, X (S, k) in the compute dtype (fp32 at least),
        index None (X covers the whole flattened parameter, k = numel) or a LongTensor (k,)
        of the flat entries X covers (every other entry is zero in every segment: an
        embedding's absent rows). Store mode only.

        Cost: what the Gram avoids — S·k memory per parameter (formed one rule at a time
        from the recorded inputs and output gradients, or the kept tiles). For the
        optimizer-aware OrthoGrad step (a preconditioned Gram G·P·Gᵀ, Gᵀ-products with the
        optimizer's state) and for measuring an update's orthogonality exactly.
        """
        step = self._finished_step("segment_grads")
        if self.mode == "stream":
            raise ValueError("SampleGram.segment_grads() needs mode='store' (stream mode drops the recorded tensors)")
        names = list(self._tracked) if names is None else list(names)
        unknown = [g for g in names if g not in self._tracked]
        if unknown:
            raise ValueError(f"SampleGram.segment_grads(): not served parameters {unknown}")
        S = step.seg.S
        out: dict[str, tuple] = {}
        with _no_tf32():
            for g in names:
                if g in out:
                    continue
                if g in step.tiles:
                    out[g] = (step.tiles[g], None)
                elif g in step.seg_grads:
                    out[g] = (step.seg_grads[g].reshape(S, -1), None)
                else:
                    rule = next((r for r in self._rule_list() if g in r.params.values()), None)
                    calls = step.calls.get(rule, []) if rule is not None else []
                    if rule is None or not calls:  # no call reached it: zero in every segment
                        p = self._tracked[g]
                        out[g] = (torch.zeros((S, p.numel()), dtype=torch.float32 if p.dtype != torch.float64
                                              else p.dtype, device=p.device), None)
                        continue
                    self._check_versions(rule, calls)
                    got = rule.segment_grads(calls, step.seg, self._opts)
                    out.update({k: v for k, v in got.items() if k in self._tracked})
        return {g: out[g] for g in names}

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
            fast = self._checked_weights_at_once(weights, S)
            if fast is not None:
                return fast
            return {g: vec(weights[g], f"[{g!r}]") for g in self._tracked}
        w = vec(weights, "")
        return {g: w for g in self._tracked}

    def _checked_weights_at_once(self, weights: dict, S: int) -> dict[str, torch.Tensor] | None:
        """Per-tensor weights that are all fp64 (S,) tensors on one device and all finite
        (what OrthoGrad passes), as views of one (L, S) copy: checked by one isfinite instead
        of one per parameter. None otherwise: ``_weights`` then checks them one by one and
        names the first bad one."""
        ws = [weights[g] for g in self._tracked]
        if not ws or not all(isinstance(w, torch.Tensor) and w.dtype == torch.float64 and w.dim() == 1
                             and w.shape[0] == S for w in ws) or len({w.device for w in ws}) > 1:
            return None
        stacked = torch.stack([w.detach() for w in ws])  # [L, S]
        if not bool(torch.isfinite(stacked).all()):
            return None
        self._weights_stack = stacked  # combine casts it once, not once per parameter
        return dict(zip(self._tracked, stacked.unbind(0)))

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
        self._weights_stack = None
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
        cast = _WeightCasts(W, self._weights_stack)
        for gname, X in step.tiles.items():  # (S, numel): Σ_s w_s X_s, into .grad's buffer if free
            w, t = cast(gname, X.device, X.dtype), totals.get(gname)
            out = t.view(-1) if t is not None and t.dtype == X.dtype and t.is_contiguous() else None
            grads[gname] = torch.mv(X.T, w, out=out) if out is not None else torch.mv(X.T, w)
        for gname, X in step.seg_grads.items():
            grads[gname] = torch.tensordot(cast(gname, X.device, X.dtype), X, dims=1)
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
