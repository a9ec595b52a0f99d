"""Capture of one ``record()`` step: the hooks, the recorded calls and output gradients.

Per step (``_Step``): a forward hook on every module that owns tracked parameters (and
on the root module, for the whole-model fallback) records each call's input
(``Rule.capture``) and registers a tensor hook on its outputs; in the backward that hook
receives the gradient of the output (``Call.grads``). After the backward (store mode) or
as soon as a layer's output gradients are all in (stream mode, ``_stream_process``) the
rule turns the calls into its Grams; the recorded tensors are then dropped. Recorded
inputs are checked for in-place changes (``_check_versions``) before they are read.
Grams are formed without TF32 (``_no_tf32``).

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
The probe of a detached weight is in safety.py (``_probe_detached``).

What capture cannot follow, refused up front with the way out:

* compiled modules (``torch.compile(model)``, ``model.compile()``, or the model called
  through a compiled wrapper inside ``record()``): dynamo traces the hooks instead of
  running them per call, and the row check then saw values change where rows do not
  interact (GPT-2: "rows interact", after minutes of compiling). Detected by the wrapper
  class (``OptimizedModule``, ``_orig_mod``), a module's compiled call, and, per model
  call, dynamo's eval-frame callback being set (``compiled_problem``, ``under_dynamo``);
* gradient checkpointing with ``use_reentrant=True``: its backward cannot run under
  ``torch.autograd.grad``, which the row check uses; ``use_reentrant=False`` (torch's
  recommended mode) gives the same gradients and is served exactly.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .rows import DIM0, LAYOUT, WHOLE, SHARED, CallRows, OutputRows, RowCheckError, RowModel, alias_leaves
from .rows import check_rows, flat
from .rows import per_row_inputs, signature
from .rules import Probe, Rule, Segments
from .rules.base import Call, all_finite
from .rules.traced import ParamTracer, traced_row_grads

try:  # set while a torch.compile'd callable runs (None/False otherwise)
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
except ImportError:  # pragma: no cover - torch builds without dynamo
    _eval_frame_callback = None

_COMPILED = (
    "compiled modules are not supported by SampleGram (its hooks and row check run the model "
    "eagerly, call by call); pass the uncompiled module (a compiled wrapper's ._orig_mod) and call it "
    "uncompiled inside record()"
)
_REENTRANT = "use_reentrant=True"


def compiled_problem(model: nn.Module) -> str | None:
    """Where ``model`` is compiled (capture docstring), None if nowhere."""
    for path, m in model.named_modules():
        where = f"module {path!r}" if path else "the model"
        if hasattr(m, "_orig_mod") and type(m).__module__.startswith("torch._dynamo"):
            return f"{where} is a torch.compile wrapper ({type(m).__name__}): {_COMPILED}"
        if getattr(m, "_compiled_call_impl", None) is not None:
            return f"{where} was compiled in place ({type(m).__name__}.compile()): {_COMPILED}"
    return None


def under_dynamo() -> bool:
    """True while torch.compile traces or runs the current call (capture docstring)."""
    if torch.compiler.is_compiling():
        return True
    return _eval_frame_callback is not None and _eval_frame_callback() not in (None, False)


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
        self.rows: RowModel | None = None  # the row model of the model call in progress (rows.py)
        self.root_rows: CallRows | None = None  # the same, for the model's own inputs and outputs
        self.call_k: dict[int, int] = {}  # id(module) -> its calls so far in that model call
        self.outputs: list = []  # row layouts of the model's output leaves (its last call)


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


class Capture:
    """Mixin of ``SampleGram`` (engine.py): installs the step's hooks, records calls and
    output gradients, forms the rules' Grams from them and releases them.

    Uses ``self.model``, ``self._tracked``, ``self._opts``, ``self.record_grads`` and the
    rule table (assign.py); ``_install`` also installs the safety net (safety.py).
    """

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
        pre = partial(self._on_model_call, step)  # before every other pre-hook of the model
        step.handles.append(self.model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        self._install_safety(step)
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

    # ------------------------------------------------------------------ the row model
    def _on_model_call(self, step: _Step, module, args, kwargs):
        """Before each call of the model inside record(): the row model of this call
        (rows.py), from the cache by the call's signature, or measured now by the row check
        (which runs the model itself, with the step's hooks asleep)."""
        if not step.active:
            return
        if under_dynamo():
            raise ValueError(f"SampleGram: the model is called through torch.compile inside record(): {_COMPILED}")
        N = step.seg.N
        step.call_k = {}
        for path, m in self._bn:  # the clearest message first (safety.py)
            self._check_bn(step, path, m, args)
        for i, x in enumerate(tree_flatten((args, kwargs))[0]):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not all_finite(x):
                rows = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten()[:5].tolist() if x.dim() else []
                raise ValueError(
                    f"SampleGram: input {i} of the model {tuple(x.shape)} has NaN/Inf (rows {rows} of dim 0): "
                    "the data, not the model; per-sample gradients of such rows are not defined"
                )
        if N == 1:  # one row: every position of every tensor is row 0
            step.rows = RowModel(N=1, r0=0, outputs=[], single=True)
        else:
            # the traced set is part of the signature: a parameter rerouted to the tracer
            # (safety.py) gets its split checked by the next step's row check
            sig = (signature(self.model, args, kwargs, N), tuple(sorted(self._root.params)))
            rm = self._row_models.get(sig)
            if rm is None:
                rm = self._row_check(step, args, kwargs)
                sig = (sig[0], tuple(sorted(self._root.params)))
                self._row_models[sig] = rm
            step.rows = rm
            if step.tracer is not None and rm.trace_problem is not None:
                step.tracer.problem = rm.trace_problem  # the root fallback re-runs the model per row
        batched = set(per_row_inputs(args, kwargs, N))
        n_in = len(tree_flatten((args, kwargs))[0])
        lay = WHOLE if N == 1 else DIM0
        step.root_rows = CallRows(outs=[], args=[lay if i in batched else None for i in range(n_in)])

    def _row_check(self, step: _Step, args, kwargs) -> RowModel:
        """Run the row check with the step's hooks and tracer asleep; act on its verdicts:
        refuse modules whose rows interact, move the parameters of modules whose output is
        shared by all rows to the op tracer (rules/traced.py)."""
        for _ in range(2):  # again when modules were found shared: their tracing gets checked too
            rm = self._run_row_check(step, args, kwargs)
            if not self._row_verdicts(step, rm):
                return rm
        return rm

    def _run_row_check(self, step: _Step, args, kwargs) -> RowModel:
        watched = {r.module: r.path for r in self._rule_list() if r.params and r is not self._root}
        tracer = step.tracer
        traced = {g: self._tracked[g] for g in self._root.params}
        N = step.seg.N
        check_tracer = ParamTracer(traced, N) if traced else None

        def verify(r0, grads):
            return self._verify_trace(check_tracer, traced, r0, grads)

        step.active = False
        if tracer is not None:
            tracer.active = False
        try:
            return check_rows(self.model, watched, args, kwargs, N, seed=len(self._row_models),
                              tracer=check_tracer, verify=verify if traced else None)
        except RowCheckError as e:
            raise ValueError(f"SampleGram: {e}") from None
        except RuntimeError as e:
            if _REENTRANT not in str(e):
                raise
            raise ValueError(
                "SampleGram: the model uses gradient checkpointing with use_reentrant=True, whose backward "
                "cannot run under torch.autograd.grad (the row check differentiates the model with it); use "
                "use_reentrant=False: torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or for a "
                "Hugging Face model gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}). Same gradients, served exactly."
            ) from e
        finally:
            step.active = True
            if tracer is not None:
                tracer.active = True

    @staticmethod
    def _verify_trace(tracer: ParamTracer, traced: dict, r0: int, grads: dict) -> str | None:
        """The tracer's per-row gradients of the check's run, where only row r0 has an output
        gradient: row r0's must be autograd's whole gradient and every other row's zero, to
        rounding (1000·eps relative: a wrong split is off by O(1))."""
        if tracer.problem is not None:
            return tracer.problem
        try:
            rows = traced_row_grads(tracer, traced)
        except Exception as e:  # noqa: BLE001 - any failure means: do not trust the trace
            return f"replaying its ops per row failed ({type(e).__name__}: {e})"
        for g, R in rows.items():
            p = traced[g]
            want = grads.get(id(p))
            want = torch.zeros_like(p) if want is None else want
            tol = 1000 * torch.finfo(R.dtype).eps * max(float(want.norm()), float(R.norm()), 1e-300)
            others = torch.cat([R[:r0], R[r0 + 1:]])
            if float(others.norm()) > tol or float((R[r0] - want).norm()) > tol:
                return (f"its split of {g!r} into rows is wrong (the row check's row {r0} was not the only "
                        "one with a gradient)")
        return None

    def _row_verdicts(self, step: _Step, rm: RowModel) -> bool:
        """Refuse interacting rows; move shared modules to the tracer. True if any moved."""
        moved = False
        for (mid, k), cr in rm.calls.items():
            rule = self._rules.get(mid)
            if rule is None or not rule.params:
                continue
            what = f"module {rule.path!r} ({type(rule.module).__name__})"
            problems = [o.problem for o in cr.outs if o.problem] + ([cr.arg_problem] if cr.arg_problem else [])
            if problems:
                raise ValueError(
                    f"SampleGram: {what}: {problems[0]}. Per-sample gradients do not exist where the rows "
                    "of a batch interact; use eval-mode statistics (model.eval() on norm layers) or "
                    "a row-wise computation. No Gram is returned."
                )
            live = [o for o in cr.outs if o.kind != "unknown"]
            if live and all(o.kind == SHARED for o in live):
                self._share(step, rule)
                moved = True
        return moved

    def _share(self, step: _Step, rule: Rule) -> None:
        """Parameters of a module whose output is the same for every row (rows.SHARED): their
        per-row gradients are not at the module's boundary but where the shared output
        meets the rows; the op tracer follows them there (sticky)."""
        for local, gname in list(rule.params.items()):
            del rule.params[local]
            self._to_root(gname, f"output of {rule.path!r} shared by all rows, e.g. position embeddings of "
                                 "(1, T) position ids")
            if step.tracer is None:
                step.tracer = ParamTracer({}, step.seg.N)
                step.tracer.__enter__()
            step.tracer.add({gname: self._tracked[gname]})

    def _call_rows(self, step: _Step, rule: Rule, module, args, kwargs, output) -> CallRows:
        """The row model's CallRows of this call of ``module`` (its k-th in the model call)."""
        if rule is self._root:
            rows = step.root_rows or CallRows(outs=[], args=[])
            lays = step.rows.outputs if step.rows is not None and not step.rows.single else None
            n = len(flat(output))
            outs = [OutputRows(layout=WHOLE if lays is None else lays[i], kind=LAYOUT) for i in range(n)]
            step.outputs = [o.layout for o in outs]
            return CallRows(outs=outs, args=rows.args)
        k = step.call_k.get(id(module), 0)
        step.call_k[id(module)] = k + 1
        rm = step.rows
        if rm is None:
            raise ValueError(
                f"SampleGram: module {rule.path!r} ({type(module).__name__}) was called outside a call of "
                "the model given to SampleGram; call that model inside record() (or build the "
                "SampleGram on the module you call)"
            )
        if rm.single:
            ins = tree_flatten((args, kwargs))[0]
            return CallRows(outs=[OutputRows(layout=WHOLE, kind=LAYOUT) for _ in range(max(1, len(flat(output))))],
                            args=[WHOLE if isinstance(x, torch.Tensor) else None for x in ins])
        cr = rm.call(module, k)
        if cr is None:
            raise ValueError(
                f"SampleGram: module {rule.path!r} ({type(module).__name__}) was called {k + 1} times in "
                "this call of the model, more than in the row check of calls with these input shapes "
                "(control flow that depends on the values of the batch?); its rows are unknown"
            )
        return cr

    def _on_pre_forward(self, step: _Step, rule: Rule, module, args, kwargs):
        """Store mode: run the layer with its weight detached (Rule.detach_weight: with
        ``record_grads``, only when its Gram will keep the segment gradients; decided at the
        layer's first call of the step, then the same for every call). Module docstring,
        "Detached weights"."""
        if not step.active or not rule.params:
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
        if not step.active or not (rule.params or rule is self._root):
            return
        rule.check(module)
        leaves = flat(output)
        cr = self._call_rows(step, rule, module, args, kwargs, output)
        saved = rule.capture(module, args, kwargs, output)
        step.handles.extend(rule.hooks(saved))
        layouts: list = []
        if rule is not self._root and (not rule.deferred or rule.rows_at == "custom"):
            lay = cr.outs[0].layout if cr.outs else None
            out0 = leaves[0] if leaves and isinstance(leaves[0], torch.Tensor) else None
            problem = rule.layout_problem(lay, out0) if lay is not None and out0 is not None else None
            if problem is not None:
                raise ValueError(
                    f"SampleGram: module {rule.path!r} ({type(module).__name__}): {problem}; "
                    "its per-row gradients cannot be read there"
                )
            if not rule.deferred:
                if lay is not None:
                    saved = rule.to_rows(saved, lay, step.seg.N)
                layouts = [lay]
        live = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not live:
            return
        if step.stream and rule in step.done:
            raise ValueError(
                "SampleGram(mode='stream') needs one forward and one backward per record(): "
                f"module {rule.path!r} was called again after its backward"
            )
        new_output = None
        if len(live) > 1:  # each output's own gradient, not what flows in through the others
            new_output = alias_leaves(output)
            leaves = flat(new_output)
        call = Call(saved=saved, grads=[None] * len(leaves), versions=_versions(saved), rows=cr, layouts=layouts)
        step.calls.setdefault(rule, []).append(call)
        for i in live:
            step.handles.append(leaves[i].register_hook(partial(self._on_out_grad, step, rule, call, i)))
        return new_output

    def _on_out_grad(self, step: _Step, rule: Rule, call, i: int, g: torch.Tensor):
        if not step.active:
            return
        step.any_grad = True
        if step.stream and rule in step.done:
            raise ValueError(
                "SampleGram(mode='stream') needs one backward per record(); use mode='store' "
                "to backpropagate several losses"
            )
        if i < len(call.layouts):
            lay = call.layouts[i]
            if lay is None:
                if bool((g != 0).any()):
                    raise ValueError(
                        f"SampleGram: module {rule.path!r} ({type(rule.module).__name__}) receives a "
                        "gradient, but the row check saw none reach it from a single row, so its rows "
                        "are unknown"
                    )
            else:
                g = rule.to_rows(g, lay, step.seg.N)
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

    @staticmethod
    def _check_versions(rule: Rule, calls) -> None:
        for c in calls:
            if _versions(c.saved) != c.versions:
                raise ValueError(
                    f"SampleGram: the input of module {rule.path!r} ({type(rule.module).__name__}) was "
                    "modified in place after its forward; SampleGram reads it after the backward"
                )

    def _form_grams(self, step: _Step, rules: list[Rule]) -> None:
        """After the backward: every rule's Grams (and probes) from its recorded calls; in
        stream mode only the rules not yet processed in the backward."""
        seg = step.seg
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
                self._probe_detached(step, rule, calls)
                self._fill_detached_grads(step, rule)
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

    def _fill_detached_grads(self, step: _Step, rule: Rule) -> None:
        """Weights the rule's calls read detached: with ``record_grads`` add the layer's part
        Σ_s g_s (every row is kept) to ``.grad``, where autograd would have put it."""
        for gname in rule.skipped:
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
