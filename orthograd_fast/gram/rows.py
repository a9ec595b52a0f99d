"""The row model: which slice of every tensor the engine records belongs to which row.

A per-sample Gram is exact only if every position of a layer's input A and output
gradient D is assigned to the row (sample) it came from. Guessing "the batch is dim 0",
or "the dim whose size is N", is silently wrong whenever sizes coincide (a time-major
(T, N, d) activation with T == N) and refuses common models (Hugging Face position
embeddings receive (1, T) ids shared by all rows). So the engine does not guess: on the
first ``record()`` step (and again whenever the call's signature changes: shapes, dtypes,
module modes) it *measures* the layout of every tensor it will read, with one extra
forward pair and one backward of the model, before the real forward runs.

The check. Rows of the batch are dim 0 of the model's inputs and outputs (the one
contract: every tensor argument of the model with N = len(segments) entries in dim 0 is
per row). Pick a row r0 and another row r1:

* run B: forward with row r0 of every per-row input replaced by row r1's values;
* run A: forward with the real inputs, then a backward of a cotangent E that is random on
  row r0's slice of every per-row output and zero elsewhere.

Both runs start from the same RNG state (so dropout draws the same masks) and the same
buffers (restored after each run, so running statistics, RNG and buffers end exactly as
one plain forward leaves them). With independent rows:

* ΔY (a module's output, run A against run B) is zero outside row r0's slice, and
* D_E (the gradient at the module's output under E) is zero outside row r0's slice
  (exactly: every other row's cotangent is 0, and 0 times anything is 0).

For a tensor of shape s, the candidate layouts are: any dim b with s[b] = N·k, the rows
one index each (k = 1) or k consecutive (``outer``, index n·k + j) or interleaved
(``inner``, index j·N + n) entries each (a batch folded with another dim). A layout is
*consistent* with a change mask if every changed position lies in row r0's slice of it.
A random full-row perturbation changes a whole row slice, so one candidate remains: a
(T, N, d) tensor with T == N changes at [:, r0, :], which the dim-0 layout cannot hold.

Classification of a module's output (``classify_output``), from D_E first:
* D_E within one layout L (and ΔY empty or within L): the rows are L;
* D_E spread over several rows while ΔY is empty: the output does not depend on the
  rows but every row's gradient reaches it (position embeddings of shared (1, T) ids, a
  constant table): SHARED — its parameters' per-row gradients do not exist at this
  module's boundary (the engine follows them op by op instead, rules/traced.py);
* D_E spread while ΔY is localised: rows interact after the module (BatchNorm in train
  mode, a batch statistic, attention across the batch): refused;
* ΔY spread: rows interact before or inside the module: refused;
* D_E zero (row r0 sends no gradient there: a ReLU closed for it): the rows are where ΔY
  puts them, else unknown (the engine refuses if a gradient arrives there later).

Inputs of a module are classified the same way from their gradient under E (if they
require one) and their change between the runs; an input that changes in no row is
shared (masks, tables, position ids) and is never sliced per row, unless every row of it
is equal along the dim where the module's output holds the rows (position ids repeated per
row): then each row gets its own copy, and the module run on one row must return exactly
that row's output shape (rules/fallback.py), so a wrong choice cannot pass silently.

Tolerances: values of unaffected rows are recomputed by the same operations on the same
numbers, so they agree to the last bit on deterministic kernels; a change is counted
above 2·eps·max|x| (so non-deterministic reductions do not read as coupling). Gradients
of other rows are exact zeros, counted above eps·max|g|/1024.

Cost: two forwards and one backward of the model, once per signature (cached), before
the first real forward of that signature; run B's module inputs and outputs are copied
(a later in-place op must not change them) and compared as run A goes, so the peak memory
is about that of two plain forwards.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

#: classification of one tensor
EMPTY, LAYOUT, AMBIGUOUS, SPREAD = "empty", "layout", "ambiguous", "spread"
#: an output that does not depend on the rows while every row's gradient reaches it
SHARED = "shared"


@dataclass(frozen=True)
class Layout:
    """Where the N rows of a batch sit in one tensor.

    dim: the dim holding them; k: entries per row along it (dim has N·k entries, row n
    owning index n·k + j, or j·N + n when ``inner``). ``dim=None``: the whole tensor is
    row 0 (N = 1, or an unbatched call).
    """

    dim: int | None
    k: int = 1
    inner: bool = False

    def rows_of(self, index: torch.Tensor, N: int) -> torch.Tensor:
        """Row of each index along ``dim``."""
        if self.dim is None:
            return torch.zeros_like(index)
        return index % N if self.inner else index // self.k

    def rows(self, t: torch.Tensor, N: int) -> torch.Tensor:
        """t as a view (N, ...) with row n at index n: the row dim moved to the front; with
        k > 1 the row's k entries take the place of the old dim; other dims keep order."""
        if self.dim is None:
            return t.unsqueeze(0)
        if self.k == 1:
            return t.movedim(self.dim, 0)
        if self.inner:
            return t.unflatten(self.dim, (self.k, N)).movedim(self.dim + 1, 0)
        return t.unflatten(self.dim, (N, self.k)).movedim(self.dim, 0)

    def unrow(self, r: torch.Tensor) -> torch.Tensor:
        """Inverse for one row: a slice ``rows(t)[n]`` back to the native layout of a
        one-row tensor (the row dim of size k at ``dim``)."""
        if self.dim is None or self.k > 1:
            return r
        return r.unsqueeze(self.dim)

    def describe(self) -> str:
        if self.dim is None:
            return "the whole tensor (one row)"
        if self.k == 1:
            return f"dim {self.dim}"
        return f"dim {self.dim} ({'interleaved' if self.inner else 'consecutive'} groups of {self.k})"


#: the layout of a one-row tensor (N = 1)
WHOLE = Layout(None)
#: rows in dim 0, one index each (the contract for the model's own inputs and outputs)
DIM0 = Layout(0)


def candidates(shape, N: int) -> list[Layout]:
    """Every layout a tensor of ``shape`` could hold N rows in."""
    out = []
    for b, size in enumerate(shape):
        if size == 0 or size % N:
            continue
        k = size // N
        out.append(Layout(b, k, False))
        if k > 1:
            out.append(Layout(b, k, True))
    return out


@dataclass
class Verdict:
    """What one change mask says: EMPTY, LAYOUT (one consistent layout), AMBIGUOUS
    (several), SPREAD (none: the change reaches other rows)."""

    kind: str
    layouts: list[Layout] = field(default_factory=list)


def classify(mask: torch.Tensor, N: int, r0: int) -> Verdict:
    """The layouts whose row r0 slice holds every True of ``mask`` (module docstring)."""
    if not bool(mask.any()):
        return Verdict(EMPTY)
    ok = []
    for L in candidates(mask.shape, N):
        size = mask.shape[L.dim]
        touched = mask.movedim(L.dim, 0).reshape(size, -1).any(1).nonzero().flatten()
        if bool((L.rows_of(touched, N) == r0).all()):
            ok.append(L)
    if not ok:
        return Verdict(SPREAD)
    return Verdict(LAYOUT if len(ok) == 1 else AMBIGUOUS, ok)


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Positions where a and b differ beyond rounding (module docstring), or None when
    they cannot be compared (different shapes or dtypes)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return None
    if not (a.is_floating_point() or a.is_complex()):
        return a != b
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    fa, fb = a[torch.isfinite(a)], b[torch.isfinite(b)]
    scale = max(float(fa.abs().max()) if fa.numel() else 0.0, float(fb.abs().max()) if fb.numel() else 0.0)
    tol = 2 * torch.finfo(a.dtype).eps * scale
    with torch.no_grad():
        diff = (a - b).abs()
    return ~same & ~(diff <= tol)


def nonzero(g: torch.Tensor) -> torch.Tensor:
    """Positions of a gradient above eps·max|g|/1024 (NaN counts)."""
    finite = g[torch.isfinite(g)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    tol = torch.finfo(g.dtype).eps * scale / 1024
    return ~(g.abs() <= tol)


def row_constant(x: torch.Tensor, N: int) -> list[Layout]:
    """The candidate layouts of x along which every row holds the same values."""
    out = []
    for L in candidates(x.shape, N):
        R = L.rows(x, N)
        if bool((R == R[:1]).all()):
            out.append(L)
    return out


def _merge(primary: Verdict | None, secondary: Verdict | None) -> Layout | None:
    """One layout from two verdicts on the same tensor, or None."""
    for v in (primary, secondary):
        if v is not None and v.kind == LAYOUT:
            return v.layouts[0]
    if primary is not None and secondary is not None and primary.kind == AMBIGUOUS and secondary.kind == AMBIGUOUS:
        common = [L for L in primary.layouts if L in secondary.layouts]
        if len(common) == 1:
            return common[0]
    return None


@dataclass
class OutputRows:
    """The rows of one output leaf of a module call: ``layout`` (a Layout), or ``kind``
    SHARED / "unknown"; ``problem``: why per-row gradients do not exist there."""

    layout: Layout | None = None
    kind: str = "unknown"
    problem: str | None = None


def classify_output(dY: Verdict | None, dD: Verdict | None, const: list | None = None) -> OutputRows:
    """Rows of a module output from its value change ΔY, its gradient under E (both
    cotangents, merged) and, for an output no row's input changed, the layouts along which
    its rows are equal (module docstring, "Classification")."""
    if dY is not None and dY.kind == SPREAD:
        return OutputRows(problem="its value changed in other rows when only one row's input changed: rows "
                                  "interact before or inside this module")
    if dD is None or dD.kind == EMPTY:  # row r0 sends no gradient here (a ReLU closed for it...)
        L = _merge(dY, None)
        if L is None and dY is not None and dY.kind == EMPTY and dD is not None:
            # neither its value nor the two rows' gradients show rows (a weight computed by a
            # parametrization, reached only through positions the check's rows do not read):
            # handled as shared, its parameters followed op by op to where they meet the rows
            # (the op tracer, whose split the check verifies; else the exact per-row re-run)
            return OutputRows(kind=SHARED)
        return OutputRows() if L is None else OutputRows(layout=L, kind=LAYOUT)
    if dD.kind == SPREAD:
        if dY is not None and dY.kind == EMPTY:
            return OutputRows(kind=SHARED)
        return OutputRows(problem="the gradient at its output changed in other rows when only one row's "
                                  "output gradient changed: rows interact after this module (BatchNorm in "
                                  "train mode, a batch statistic, attention across the batch)")
    if dY is not None and dY.kind == EMPTY and const is not None:
        # no row's input changed it: rows only where every row holds the same values (a
        # table looked up by ids repeated per row); anything else is one tensor for all rows
        fit = [L for L in dD.layouts if L in const]
        if not fit:
            return OutputRows(kind=SHARED)
        dD = Verdict(LAYOUT if len(fit) == 1 else AMBIGUOUS, fit)
    L = _merge(dD, dY)
    if L is None:
        return OutputRows(problem=f"its rows cannot be told apart (layouts {[x.describe() for x in dD.layouts]} "
                                  "all fit the check)")
    if dY is not None and dY.kind in (LAYOUT, AMBIGUOUS) and L not in dY.layouts:
        return OutputRows(problem=f"its value and its gradient put the rows in different places "
                                  f"({dY.layouts[0].describe()} against {L.describe()})")
    return OutputRows(layout=L, kind=LAYOUT)


@dataclass
class CallRows:
    """Rows of one module call: ``outs`` per output leaf, ``args`` per tensor leaf of the
    flattened (args, kwargs) (None: not a tensor, or no rows — shared by all rows), and
    ``arg_problem`` when an input mixes rows."""

    outs: list[OutputRows]
    args: list[Layout | None]
    arg_problem: str | None = None
    #: inputs the check left unchanged that could hold the rows: {leaf index: [layouts]}, the
    #: output's row layout first if it fits, then every dim of size N; ``args`` holds the
    #: first guess (that layout if every row is equal there, else shared)
    flexible: dict = field(default_factory=dict)


@dataclass
class RowModel:
    """The result of one check: root output layouts, and the rows of each watched
    module's k-th call within one call of the model, keyed (id(module), k)."""

    N: int
    r0: int
    outputs: list[Layout | None]
    calls: dict[tuple[int, int], CallRows] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)
    #: N = 1: no check ran; every position of every tensor is row 0 (``WHOLE``)
    single: bool = False
    #: why the op tracer's split into rows failed the check (check_rows), or None
    trace_problem: str | None = None

    def call(self, module: nn.Module, k: int) -> CallRows | None:
        return self.calls.get((id(module), k))


def _fields(x) -> list[str]:
    """Attribute names of a plain output object (``out.logits``) holding tensors, sorted."""
    d = getattr(x, "__dict__", None)
    if d is None or isinstance(x, (nn.Module, type)):
        return []
    return sorted(k for k, v in d.items() if isinstance(v, (torch.Tensor, tuple, list, Mapping)))


def flat(obj) -> list:
    """Leaves of a nested output or argument structure; mappings (Hugging Face
    ``ModelOutput`` and other dict subclasses) are opened by value, plain objects by their
    tensor attributes (sorted by name)."""
    leaves = tree_flatten(obj)[0]
    out = []
    for x in leaves:
        if isinstance(x, Mapping) and not isinstance(x, torch.Tensor):
            out.extend(flat(list(x.values())))
        elif isinstance(x, (tuple, list)):
            out.extend(flat(list(x)))
        elif not isinstance(x, torch.Tensor) and _fields(x):
            out.extend(flat([getattr(x, k) for k in _fields(x)]))
        else:
            out.append(x)
    return out


def alias_leaves(obj):
    """``obj`` with every tensor leaf (in ``flat``'s order) replaced by an alias
    ``t.view_as(t)`` that requires grad: a hook on the alias sees only the gradient that
    reaches that returned value, not what flows into the tensor through the module's other
    outputs computed from it (a model returning hidden states it also used for its logits).
    Mappings (a Hugging Face ``ModelOutput``) are updated in place, sequences rebuilt."""
    if isinstance(obj, torch.Tensor):
        return obj.view_as(obj) if obj.requires_grad else obj
    if isinstance(obj, Mapping):
        for k in list(obj.keys()):
            v = obj[k]
            if v is not None:
                obj[k] = alias_leaves(v)
        return obj
    if isinstance(obj, (tuple, list)):
        vals = [alias_leaves(v) for v in obj]
        if isinstance(obj, list):
            return vals
        return type(obj)(*vals) if hasattr(obj, "_fields") else type(obj)(vals)
    for k in _fields(obj):
        setattr(obj, k, alias_leaves(getattr(obj, k)))
    return obj


def per_row_inputs(args: tuple, kwargs: dict, N: int) -> list[int]:
    """Indices (in ``tree_flatten((args, kwargs))``'s leaves) of the model inputs that are
    per row: tensors with N entries in dim 0 (the contract)."""
    leaves = tree_flatten((args, kwargs))[0]
    return [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == N]


def signature(model: nn.Module, args: tuple, kwargs: dict, N: int) -> tuple:
    """What a check's result depends on: the inputs' structure, shapes, dtypes, devices,
    plain values, every module's training flag and the grad mode."""
    leaves, spec = tree_flatten((args, kwargs))
    parts = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            parts.append(("T", tuple(x.shape), x.dtype, x.device, x.requires_grad))
        else:
            try:
                hash(x)
                parts.append(("V", x))
            except TypeError:
                parts.append(("O", type(x).__name__))
    modes = tuple(m.training for m in model.modules())
    return (N, str(spec), tuple(parts), modes, torch.is_grad_enabled())


_MISSING = object()


def module_state(model: nn.Module) -> list:
    """Every module's plain attributes and the contents of its hook dicts (a forward may
    set a flag and register hooks the first time it runs: Hugging Face's output capture)."""
    out = []
    for m in model.modules():
        hooks = {k: dict(v) for k, v in m.__dict__.items() if "hook" in k and isinstance(v, dict)}
        out.append((m, dict(m.__dict__), hooks))
    return out


def restore_module_state(saved: list) -> None:
    """Put back what :func:`module_state` saw: attributes added since are removed, changed
    ones restored, hook dicts given their old contents (same dict objects)."""
    for m, attrs, hooks in saved:
        now = m.__dict__
        for k in [k for k in now if k not in attrs]:
            del now[k]
        for k, v in attrs.items():
            if now.get(k, _MISSING) is not v:
                now[k] = v
        for k, content in hooks.items():
            d = now[k]
            if d.keys() != content.keys():
                d.clear()
                d.update(content)


class _BufferState:
    """Every buffer of a model, restorable in place (between the check's runs and after
    them), and every module's attributes and hooks (module_state; after them only, so that
    run A starts where run B did)."""

    def __init__(self, model: nn.Module):
        self.saved = []
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    self.saved.append((m, name, b, b.detach().clone()))
        self.modules = module_state(model)

    def restore(self, everything: bool = False) -> None:
        with torch.no_grad():
            for m, name, b, copy in self.saved:
                m._buffers[name] = b
                if not torch.equal(b, copy):  # untouched buffers keep their version (autograd saves some)
                    b.copy_(copy)
        if everything:
            restore_module_state(self.modules)


def _pick_rows(leaves: list, batched: list[int], N: int, gen: torch.Generator) -> tuple[int, list[int]]:
    """(r0, [r1, ...]): a row, and up to 4 other rows to copy into it in run B, those that
    differ from it in the most per-row inputs first (a padding mask equal in r0 and r1
    would read as shared by all rows), among up to 8 random candidates for r0, rows
    other than the first and the last first (with N = 2 one direction of a coupling along
    the batch can go unseen)."""
    order = torch.randperm(N, generator=gen).tolist()
    # r0 away from both ends: rows coupled along the batch causally (an LSTM run over the
    # batch dim, a cumsum over rows) change the rows after the perturbed one, anti-causally
    # those before it, so a middle row shows either (the last row showed neither)
    inner = [r for r in order if 0 < r < N - 1] + [r for r in order if r in (0, N - 1)]
    best = (-1, inner[0], [])
    for r0 in inner[:8]:
        counts = [(sum(not torch.equal(leaves[i][r0], leaves[i][r]) for i in batched), r) for r in order if r != r0]
        counts = sorted((c for c in counts if c[0] > 0), key=lambda c: -c[0])
        top = counts[0][0] if counts else 0
        if top > best[0]:
            best = (top, r0, [r for _, r in counts[:4]])
        if top == len(batched):
            break
    return best[1], best[2]


def _perturb(leaves: list, batched: list[int], r0: int, r1: int | None, gen: torch.Generator) -> list:
    """The inputs of run B: row r0 of every per-row input replaced by row r1's values; with
    no differing row (all rows equal), floating inputs of row r0 get a small noise."""
    out = list(leaves)
    for i in batched:
        x = leaves[i].detach().clone()
        if r1 is not None:
            x[r0] = leaves[i][r1]
        elif x.is_floating_point():
            noise = torch.randn(x[r0].shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
            x[r0] = x[r0] + noise * (0.01 * (float(x.double().std()) if x.numel() > 1 else 1.0) + 0.01)
        out[i] = x
    return out


def merge_verdicts(v1: Verdict | None, v2: Verdict | None) -> Verdict | None:
    """One verdict from two experiments (cotangents on rows r0 and r0'): a layout must hold
    both rows' changes; a change that does not move with the row (the gradient of a shared
    output pooled at one position, which happens to be index r0) fits no common layout."""
    if v1 is None or v1.kind == EMPTY:
        return v2 if v2 is not None else v1
    if v2 is None or v2.kind == EMPTY:
        return v1
    if SPREAD in (v1.kind, v2.kind):
        return Verdict(SPREAD)
    common = [L for L in v1.layouts if L in v2.layouts]
    if not common:
        return Verdict(SPREAD)
    return Verdict(LAYOUT if len(common) == 1 else AMBIGUOUS, common)


class _Recorder:
    """Forward hooks on the watched modules for one check run: per call, in run B the
    detached input and output leaves; in run A the comparison with run B (as it goes) and
    hooks on outputs and inputs that need a gradient, to classify their gradient under each
    cotangent (``phase`` 0: E on row r0; 1: E' on row r0')."""

    def __init__(self, watched: dict[nn.Module, str], N: int, rows: tuple[int, int]):
        self.watched, self.N, self.rows = watched, N, rows
        self.r0 = rows[0]
        self.phase = 0
        self.counts: dict[int, int] = {}
        self.values: dict[tuple[int, int], tuple[list, list]] = {}  # run B
        self.dY: dict[tuple[int, int], list] = {}
        self.dX: dict[tuple[int, int], list] = {}
        self.dD: dict[tuple[int, int], list] = {}
        self.dG: dict[tuple[int, int], list] = {}
        self.const: dict[tuple[int, int], list] = {}
        self.const_out: dict[tuple[int, int], list] = {}
        self.cands: dict[tuple[int, int], list] = {}
        self.handles: list = []
        self.run = "B"

    def install(self) -> None:
        for m in self.watched:
            self.handles.append(m.register_forward_hook(self._on_forward, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def start(self, run: str) -> None:
        self.run = run
        self.counts = {}

    def _on_forward(self, module, args, kwargs, output):
        key = (id(module), self.counts.get(id(module), 0))
        self.counts[id(module)] = key[1] + 1
        ins = tree_flatten((args, kwargs))[0]
        outs = flat(output)
        if self.run == "B":
            # copies: a later in-place op (ReLU(inplace=True)) must not change what is compared
            self.values[key] = (
                [x.detach().clone() if isinstance(x, torch.Tensor) else None for x in ins],
                [y.detach().clone() if isinstance(y, torch.Tensor) else None for y in outs],
            )
            return
        before = self.values.pop(key, None)
        N, r0 = self.N, self.r0

        def compare(now, then):
            if then is None or len(now) != len(then):
                return [None] * len(now)
            out = []
            for x, y in zip(now, then):
                m = changed(x.detach(), y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else None
                out.append(None if m is None else classify(m, N, r0))
            return out

        self.dX[key] = compare(ins, before[0] if before else None)
        self.dY[key] = compare(outs, before[1] if before else None)

        def constant(leaves, verdicts):  # unchanged tensors: the layouts along which every row is equal
            return [row_constant(x.detach(), N) if isinstance(x, torch.Tensor) and v is not None and v.kind == EMPTY
                    else [] for x, v in zip(leaves, verdicts)]

        self.const[key] = constant(ins, self.dX[key])
        self.const_out[key] = constant(outs, self.dY[key])
        self.cands[key] = [candidates(x.shape, N) if isinstance(x, torch.Tensor) and v is not None and v.kind == EMPTY
                           else [] for x, v in zip(ins, self.dX[key])]
        self.dD[key] = [[None] * len(outs), [None] * len(outs)]
        self.dG[key] = [[None] * len(ins), [None] * len(ins)]
        for store, leaves in ((self.dD[key], outs), (self.dG[key], ins)):
            for i, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point():
                    self.handles.append(t.register_hook(_GradHook(self, store, i)))

    def result(self) -> dict[tuple[int, int], CallRows]:
        out = {}
        for key, dY in self.dY.items():
            dD = [merge_verdicts(a, b) for a, b in zip(*self.dD[key])]
            dG = [merge_verdicts(a, b) for a, b in zip(*self.dG[key])]
            outs = [classify_output(y, d, c) for y, d, c in zip(dY, dD, self.const_out[key])]
            args, flexible, problem = [], {}, None
            L_out = outs[0].layout if outs else None
            for i, (x, gv, const, cands) in enumerate(zip(self.dX[key], dG, self.const[key], self.cands[key])):
                if x is not None and x.kind == SPREAD:
                    problem = ("an input changed in other rows when only one row of the model's input "
                               "changed: rows interact before this module")
                L = _merge(gv, x)
                ambiguous = [v.layouts for v in (gv, x) if v is not None and v.kind == AMBIGUOUS]
                if L is None and ambiguous:
                    # changed in row r0's slice along several layouts (a (N, N) key padding mask
                    # changed at [r0, r0]): the output's row layout first if it is one of them;
                    # the per-row re-run tries the others
                    opts = ambiguous[0]
                    L = L_out if L_out in opts else opts[0]
                    flexible[i] = [o for o in opts if o != L]
                elif L is None and cands:
                    # unchanged by the check, with the rows' size somewhere: per row along the
                    # output's row layout if every row is equal there, else shared; a guess the
                    # per-row re-run may revise with the other one-entry-per-row dims (a batch-first
                    # key padding mask of a time-major attention; rules/fallback.py, "flexible")
                    first = [L_out] if L_out is not None and L_out in cands else []
                    flexible[i] = first + [c for c in cands if c.k == 1 and c not in first]
                    if first and L_out in const:
                        L = L_out
                args.append(L)
            out[key] = CallRows(outs, args, problem, flexible)
        return out


class _GradHook:
    """Tensor hook: classify one leaf's gradient under the current cotangent (no reference
    to the tensor)."""

    def __init__(self, rec: _Recorder, store: list, i: int):
        self.rec, self.store, self.i = rec, store, i

    def __call__(self, g):
        phase = self.rec.phase
        self.store[phase][self.i] = classify(nonzero(g.detach()), self.rec.N, self.rec.rows[phase])


class RowCheckError(ValueError):
    """The row check cannot tell the rows of the batch apart (module docstring)."""


def _root_outputs(out_a: list, out_b: list, N: int, r0: int, gen: torch.Generator):
    """Row layouts of the model's output leaves (run A against run B), the leaves that get a
    cotangent with their layouts [(leaf, layout)], their cotangents E (random on row r0's
    slice, zero elsewhere), and the outputs whose change reached other rows (a description
    each)."""
    layouts: list[Layout | None] = []
    outs, cots, spread = [], [], []
    for j, (ya, yb) in enumerate(zip(out_a, out_b)):
        L = None
        if isinstance(ya, torch.Tensor) and isinstance(yb, torch.Tensor) and ya.dim() > 0:
            m = changed(ya.detach(), yb)
            v = classify(m, N, r0) if m is not None else None
            if v is not None and v.kind == SPREAD:
                spread.append(f"output {j} {tuple(ya.shape)}")
            if v is not None and v.kind == LAYOUT:
                L = v.layouts[0]
            elif v is not None and v.kind == AMBIGUOUS and DIM0 in v.layouts:
                L = DIM0  # the contract decides between layouts the check cannot tell apart
        layouts.append(L)
        if L is not None and ya.requires_grad and ya.is_floating_point():
            outs.append((ya, L))
            cots.append(_localised(ya, L, N, r0, gen))
    return layouts, outs, cots, spread


def _localised(y: torch.Tensor, L: Layout, N: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A cotangent for y: random on row r's slice (layout L), zero elsewhere."""
    E = torch.zeros_like(y)
    Er = L.rows(E, N)[r]  # a view of row r's slice
    Er.copy_(torch.randn(Er.shape, generator=gen, dtype=torch.float64))
    return E


def check_rows(model: nn.Module, watched: dict[nn.Module, str], args: tuple, kwargs: dict, N: int,
               seed: int = 0, tracer=None, verify=None) -> RowModel:
    """Run the row check (module docstring) on one call ``model(*args, **kwargs)`` of N
    rows; ``watched``: {module: path} whose calls are classified. Leaves the model's
    buffers, the global RNG state and every parameter's ``.grad`` as they were.

    tracer, verify: an op tracer (a TorchFunctionMode, rules/traced.py) active during run
    A's forward, and ``verify(r0, {id(param): gradient under E}) -> problem or None`` called
    after each of the two backwards (rows r0 and r0'): under a cotangent on one row only
    that row has a gradient, so a tracer that splits rows correctly gives every other row
    zero, for both rows — a check of the split itself, which a comparison of sums over rows
    cannot make. Its answer is ``RowModel.trace_problem``.

    Raises RowCheckError when no input has N rows in dim 0, when the rows of the batch
    are all identical in inputs that cannot be perturbed, or when no output has rows.
    """
    gen = torch.Generator().manual_seed(seed)
    leaves, spec = tree_flatten((args, kwargs))
    batched = per_row_inputs(args, kwargs, N)
    if not batched:
        sizes = sorted({x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0})
        have = f"the model's inputs have {' or '.join(map(str, sizes))} rows in dim 0" if sizes else "no input tensor"
        raise RowCheckError(
            f"{have}, but segments has {N} entries; segments needs one id per row of dim 0 of the model's "
            "inputs (a module that takes its batch in another dim, e.g. nn.MultiheadAttention or nn.LSTM "
            "with batch_first=False, is served inside a model whose inputs have the rows in dim 0)"
        )
    r0, replacements = _pick_rows(leaves, batched, N, gen)
    floats = any(leaves[i].is_floating_point() for i in batched)
    if not replacements and not floats:
        raise RowCheckError(
            "every row of the batch has the same inputs, so the row check cannot tell them apart; "
            "record a batch with at least two different rows"
        )
    # run B's candidates: another row's inputs (a row whose inputs give the same outputs, e.g.
    # a permutation of the same tokens under a pooling, is followed by the next), then noise
    attempts = replacements + ([None] if floats else [])
    # the second cotangent's row: another row than r0 (and its replacement, when N allows)
    r0b = next((r for r in torch.randperm(N, generator=gen).tolist()
                if r != r0 and (N < 3 or not replacements or r != replacements[0])), r0)
    params = [p for p in model.parameters() if p.requires_grad]
    versions = [(n, p, p._version) for n, p in model.named_parameters()]
    devices = sorted({x.device.index or 0 for x in leaves if isinstance(x, torch.Tensor) and x.is_cuda})
    buffers = _BufferState(model)
    rec = None
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            state = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]

            def rewind():
                buffers.restore()
                torch.set_rng_state(state[0])
                for d, st in zip(devices, state[1]):
                    torch.cuda.set_rng_state(st, d)

            for attempt, r1 in enumerate(attempts):
                if rec is not None:
                    rec.remove()
                rec = _Recorder(watched, N, (r0, r0b))
                rec.install()
                if tracer is not None:
                    tracer.reset()
                rec.start("B")
                a, kw = tree_unflatten(_perturb(leaves, batched, r0, r1, gen), spec)
                try:
                    out_b = [y.detach() if isinstance(y, torch.Tensor) else y for y in flat(model(*a, **kw))]
                except Exception as e:
                    rewind()
                    with torch.no_grad():
                        model(*args, **kwargs)  # the real inputs fail too: the model's own error, raised as is
                    raise RowCheckError(
                        f"the model failed on the batch with row {r0}'s inputs replaced by another row's "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): an input with {N} "
                        "entries in dim 0 is not per-row data (EmbeddingBag offsets, lengths or indices into "
                        "another input); compute it inside the model from per-row data, or pass it with "
                        "another leading size"
                    ) from e
                rewind()
                rec.start("A")
                if tracer is not None:
                    with tracer:
                        out_a = flat(model(*args, **kwargs))
                else:
                    out_a = flat(model(*args, **kwargs))
                layouts, outs, cots, spread = _root_outputs(out_a, out_b, N, r0, gen)
                if outs or spread or attempt + 1 == len(attempts):
                    break
                rewind()  # no output moved (r1's inputs give r0's outputs): the next replacement
            if not outs and spread:
                raise RowCheckError(
                    f"the rows of the batch interact: changing the inputs of row {r0} alone changed other rows "
                    f"of the model's {', '.join(spread)} (batch statistics: BatchNorm in train mode, "
                    "F.batch_norm(training=True), a standardisation over the batch; or attention across the "
                    "batch). Per-sample gradients do not exist there: use eval-mode statistics"
                )
            if not outs:
                raise RowCheckError(
                    f"no output of the model has the {N} rows in dim 0 depending on its inputs' rows; the "
                    "model must return per-row outputs (e.g. logits) and the loss be computed from them"
                )
            trace_problem = None
            if params:
                # first cotangent (row r0), the graph kept for the second (row r0'): a layout
                # must hold both rows' gradients (merge_verdicts)
                ys = [y for y, _ in outs]
                grads = torch.autograd.grad(ys, params, cots, allow_unused=True, retain_graph=r0b != r0)
                if verify is not None:
                    trace_problem = verify(r0, {id(p): g for p, g in zip(params, grads)})
                if r0b != r0:
                    rec.phase = 1
                    if tracer is not None:
                        tracer.clear_grads()
                    grads = torch.autograd.grad(ys, params, [_localised(y, L, N, r0b, gen) for y, L in outs],
                                                allow_unused=True)
                    rec.phase = 0
                    if verify is not None and trace_problem is None:
                        # again under row r0''s cotangent: a split that took another dim for the
                        # rows can put row r0's gradient at index r0 by chance (a loss reading one
                        # position p == r0 of a time-major tensor), not both rows'
                        trace_problem = verify(r0b, {id(p): g for p, g in zip(params, grads)})
    finally:
        if rec is not None:
            rec.remove()
        buffers.restore(everything=True)
        if tracer is not None:
            tracer.close()
    written = [n for n, p, v in versions if p._version != v]
    if written:
        raise RowCheckError(
            f"the model writes into its parameters {written[:5]} during forward, and the row check's "
            "forwards wrote into them again (this cannot be undone: re-load them); move the update out of "
            "forward"
        )
    model_out = RowModel(N=N, r0=r0, outputs=layouts, calls=rec.result(), trace_problem=trace_problem)
    model_out.paths = {id(m): p for m, p in watched.items()}
    return model_out


__all__ = [
    "DIM0", "WHOLE", "Layout", "RowModel", "CallRows", "OutputRows", "RowCheckError", "SHARED",
    "alias_leaves", "candidates", "changed", "check_rows", "classify", "flat", "nonzero", "per_row_inputs",
    "signature",
]

