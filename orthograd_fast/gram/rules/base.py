"""What every SampleGram layer rule shares: the registry, the rule interface, segments, probes.

A *rule* knows, for one module type, how to turn what a forward/backward pass shows at the
module boundary (its input, the gradient of its output) into the per-segment Gram of the
module's own parameters, the weighted gradient Σ_s w_s g_s, and a cheap *probe* of the
summed gradient that the engine compares with autograd's (module docstring of
``orthograd_fast.gram.engine``). Rules register by exact module type (Opacus style)::

    @register_rule(nn.Linear)
    class LinearRule(Rule): ...

Exact type, not ``isinstance``: a subclass may override ``forward`` (LoRA wrappers,
``NonDynamicallyQuantizableLinear`` used functionally by attention), so an unknown
subclass goes to the exact fallback instead of a rule that may not match its forward.
A class of another library is registered by its module path and name
(``register_rule_by_name``), still matched exactly, so that the library is never imported
here.

Notation used by all rules: N rows (dim 0 of the module input, one segment id each), S
segments, rows with id -1 are ignored. A row may hold T positions (sequence, pixels); the
per-row gradient of a parameter is the sum over its positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

_RULES: dict[type, type["Rule"]] = {}
#: rules for classes of other libraries, keyed by (``__module__``, ``__qualname__``), so that
#: registering them imports nothing (hf_conv1d.py: transformers' Conv1D)
_NAMED_RULES: dict[tuple[str, str], type["Rule"]] = {}


def register_rule(*module_types: type):
    """Class decorator: serve ``module_types`` (matched exactly) with the decorated rule."""

    def deco(cls):
        for t in module_types:
            _RULES[t] = cls
        return cls

    return deco


def register_rule_by_name(module_path: str, qualname: str):
    """Class decorator: serve the module class ``qualname`` defined in ``module_path``
    (matched exactly: ``type(m).__module__`` and ``type(m).__qualname__``; a subclass is
    another class) with the decorated rule, without importing ``module_path``."""

    def deco(cls):
        _NAMED_RULES[(module_path, qualname)] = cls
        return cls

    return deco


def rule_class_for(module: nn.Module) -> type["Rule"] | None:
    """The rule registered for ``type(module)`` (by type, or by its module path and name), or
    None."""
    t = type(module)
    cls = _RULES.get(t)
    if cls is None and _NAMED_RULES:
        cls = _NAMED_RULES.get((t.__module__, t.__qualname__))
    return cls


@dataclass
class GramOptions:
    """How Grams are formed.

    method: "auto" (cost model), "ghost" or "explicit" for matrix layers (Linear, Conv).
    precision: "fast" (fp32 tiles, summed in fp64) or "high" (fp64 products throughout).
    budget: max elements of any temporary tile (per-row tiles, segment tiles, ghost blocks).
    backend: "torch", "triton" or "auto" (Triton on CUDA tensors) for the matrix layers'
        Grams (matrix_triton.py decides per layer).
    """

    method: str = "auto"
    precision: str = "fast"
    budget: int = 1 << 22
    backend: str = "torch"


class Segments:
    """Segment ids of the N rows of one ``record()``.

    ids: (N,) int64 in [-1, S), kept per device. ``ext`` maps -1 to S (a zero-weight bucket
    for ``row_weights``).
    """

    def __init__(self, ids: torch.Tensor, num_segments: int):
        self.ids = ids
        self.N = int(ids.numel())
        self.S = int(num_segments)
        self.n_kept = int((ids >= 0).sum())
        self.all_kept = self.n_kept == self.N
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._memo: dict = {}

    def memo(self, key, make):
        """``make()``, computed once for these ids (row plans and segment maps that every
        layer of a step shares; the engine reuses a Segments across record() calls with
        equal ids, so a value here must depend on the ids, S and ``key`` only)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def _on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device not in self._dev:
            ids = self.ids.to(device)
            ext = torch.where(ids < 0, torch.full_like(ids, self.S), ids)
            self._dev[device] = (ids, ext)
        return self._dev[device]

    def ids_on(self, device) -> torch.Tensor:
        """(N,) ids in [-1, S) on ``device``."""
        return self._on(device)[0]

    def ext_on(self, device) -> torch.Tensor:
        """(N,) ids in [0, S] on ``device`` (S = ignored row)."""
        return self._on(device)[1]

    def kept_on(self, device) -> torch.Tensor:
        """(N,) bool, rows that belong to a segment."""
        return self._on(device)[0] >= 0

    def ignored_rows(self, device) -> torch.Tensor:
        """(n,) indices of the ignored rows (id -1), made once per device (``memo``)."""
        return self.memo(("ignored_rows", torch.device(device)),
                         lambda: (self._on(device)[0] < 0).nonzero().flatten())

    def row_weights(self, w: torch.Tensor, device, dtype) -> torch.Tensor:
        """(N,) weight of each row's segment (0 for ignored rows) from w: (S,)."""
        w = w.to(device=device, dtype=dtype)
        return torch.cat([w, w.new_zeros(1)])[self.ext_on(device)]


@dataclass
class Probe:
    """A random rank-1 probe of one parameter's summed gradient.

    The parameter is viewed as a matrix (m, n): m = shape[0] for ndim >= 2, else 1.
    u: (m,), w: (n,), unit fp64 vectors; when the rule asks for it (``Rule.probe_factors``)
    w is the Kronecker product of unit ``w_factors`` (a conv's w = v ⊗ k over input channels
    and kernel positions, so that its probe needs no full convolution). ``engine``
    accumulates uᵀ(Σ_rows g_row)w from the rule (all rows, ignored ones included),
    ``autograd`` the same contraction of the gradient autograd delivered to the parameter
    (a tensor hook). Rounding makes them differ by about
    eps·sqrt(count)·(sqrt(noise2)/sqrt(m·n) + |engine|), noise2 = Σ over the finest summands
    (positions) of their squared norms; a gradient that reached the parameter without going
    through the rule (functional use, tying, a loss term on the weights) differs by its
    whole size.
    """

    u: torch.Tensor
    w: torch.Tensor
    w_factors: tuple = ()
    engine: float = 0.0
    noise2: float = 0.0
    count: int = 0
    autograd: float = 0.0
    seen_autograd: bool = False
    #: u, w cast per (device, dtype), shared by the probes of one parameter across steps
    cast: dict = field(default_factory=dict)

    @property
    def m(self) -> int:
        return self.u.numel()

    @property
    def n(self) -> int:
        return self.w.numel()

    def contract(self, g: torch.Tensor) -> float:
        """``contract_probe(g, u, w)`` with u, w cast once per (device, dtype)."""
        m, n = self.m, self.n
        dt = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        key = (g.device, dt)
        if key not in self.cast:
            self.cast[key] = (self.u.to(g.device), self.w.to(g.device, dt))
        u, w = self.cast[key]  # u stays fp64: the m-term reduction is in fp64
        return float(u @ (g.reshape(m, n).to(dt) @ w).double())

    def add(self, value, noise2, count) -> None:
        self.engine += float(value)
        self.noise2 += float(noise2)
        self.count += int(count)

    def scale(self) -> float:
        """The size its rounding allowance is relative to (class docstring)."""
        return math.sqrt(max(self.count, 1)) * (math.sqrt(self.noise2) / math.sqrt(self.m * self.n) + abs(self.engine))

    def mismatch(self, eps: float, mult: float, floor: float = 0.0) -> bool:
        """True when |engine - autograd| exceeds the rounding allowance (class docstring);
        ``floor``: the allowance at least mult·eps·floor (the step's largest probe scale:
        a parameter whose gradient is zero in exact arithmetic has two sides of pure
        rounding noise, which must not read as gradient from outside its module)."""
        return abs(self.engine - self.autograd) > mult * eps * max(self.scale(), floor) + 1e-300


def probe_shape(p: torch.Tensor) -> tuple[int, int]:
    """The (m, n) matrix view a probe uses for parameter p."""
    if p.dim() >= 2:
        return p.shape[0], p.numel() // max(p.shape[0], 1)
    return 1, p.numel()


def contract_probe(g: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> float:
    """uᵀ g.view(m, n) w: one matrix-vector product in g's dtype (fp32 at least), reduced in
    fp64. Its rounding (~eps·|g|) is far inside the probe's allowance (Probe docstring)."""
    m, n = u.numel(), w.numel()
    g = g.reshape(m, n)
    dt = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
    v = (g.to(dt) @ w.to(device=g.device, dtype=dt)).double()
    return float(u.to(g.device) @ v)


def all_finite(t: torch.Tensor) -> bool:
    """Whether t holds no NaN/Inf, from its min and max in one pass (``torch.aminmax``
    propagates NaN; an Inf is the min or the max), without ``isfinite``'s mask: on one CPU
    thread 15 µs against 143 µs for 128 x 784 fp32 entries. Non-floating, complex and
    empty tensors go through ``isfinite``."""
    if t.numel() == 0 or not t.is_floating_point():
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def sq_norm(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Squared 2-norm (over ``dim``, or all) in fp64, without an fp64 copy of x. A strided
    view (e.g. a gradient sliced by a cat's backward) is reduced over its last dim first:
    the all-dims reduction of a non-contiguous tensor is ~7x slower on CPU."""
    if dim is None and x.dim() > 1 and not x.is_contiguous():
        return sq_norm(x, -1).sum()
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(x, dim=dim, dtype=dt).double().square()


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Common dtype of rule inputs, at least fp32 (half inputs are accumulated in fp32)."""
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    if dt in (torch.float16, torch.bfloat16):
        dt = torch.float32
    return dt


def gram_of_segment_tiles(X: torch.Tensor, precision: str) -> torch.Tensor:
    """fp64 (S, S) Gram of per-segment tiles X: (S, k) (fp32 GEMM summed in fp64, or fp64).

    Symmetric, so for large tiles only the lower block triangle is multiplied: rows
    [h, S) against all, rows [0, h) against [0, h), h = S/2 (3/4 of the products; measured
    ~15% faster than X Xᵀ for S = 65, k >= 16k on one CPU core), the upper block mirrored."""
    if precision == "high":
        X = X.double()
    S, k = X.shape
    if S < 32 or k < 8192:
        return (X @ X.T).double()
    h = S // 2
    K = torch.empty((S, S), dtype=torch.float64, device=X.device)
    K[h:] = X[h:] @ X.T  # [S-h, S]
    K[:h, :h] = X[:h] @ X[:h].T  # [h, h]
    K[:h, h:] = K[h:, :h].T
    return K


@dataclass
class SegmentSumPlan:
    """The index work of ``segment_sum`` for one ids vector, reusable for every rows tensor
    summed by the same ids (a record() step's kept rows: once per step, Segments.memo).

    pos (S,): the row that fills each segment (its last row); multi (m,): segments of more
    than one row; gather (n_multi,): their rows in segment order; lengths (m,); empty (e,):
    segments with no row."""

    n: int
    S: int
    pos: torch.Tensor
    multi: torch.Tensor
    gather: torch.Tensor
    lengths: torch.Tensor
    empty: torch.Tensor


def segment_sum_plan(ids: torch.Tensor, S: int) -> SegmentSumPlan:
    """Plan of ``segment_sum`` for ids: (n,) in [0, S)."""
    n, dev = ids.numel(), ids.device
    counts = torch.bincount(ids, minlength=S)
    pos = torch.zeros(S, dtype=torch.long, device=dev)
    pos[ids] = torch.arange(n, device=dev)
    is_multi = counts > 1
    multi = is_multi.nonzero().flatten()
    if multi.numel():
        order = torch.argsort(ids, stable=True)
        gather = order[is_multi[ids[order]].nonzero().flatten()]
    else:
        gather = multi
    return SegmentSumPlan(n, S, pos, multi, gather, counts[multi], (counts == 0).nonzero().flatten())


def segment_sum(rows: torch.Tensor, ids: torch.Tensor, S: int, plan: SegmentSumPlan | None = None) -> torch.Tensor:
    """(S, k) sums of rows: (n, k) by ids: (n,) in [0, S) (``plan``: segment_sum_plan(ids, S),
    when several tensors are summed by the same ids).

    One gather puts every single-row segment in place; rows of multi-row segments are
    gathered in segment order and reduced with ``segment_reduce``; empty segments are
    zeroed. Index tensors only (``index_add_`` on CPU is a serial loop, ~8x slower than a
    copy for wide rows, and boolean masks cost a nonzero pass each).
    """
    n, k = rows.shape
    if n == 0 or S == 0:
        return rows.new_zeros((S, k))
    if plan is None:
        plan = segment_sum_plan(ids, S)
    X = rows.index_select(0, plan.pos)
    if plan.multi.numel():
        sums = torch.segment_reduce(rows.index_select(0, plan.gather), "sum", lengths=plan.lengths, axis=0)
        X.index_copy_(0, plan.multi, sums)
    if plan.empty.numel():
        X.index_fill_(0, plan.empty, 0)
    return X


def kept_segment_sum(rows: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(S, k) segment sums of per-row values rows: (N, k) over the kept rows of a step (the
    index plan made once per step)."""
    dev = rows.device

    def make():
        ids = seg.ids_on(dev)
        kept = None if seg.all_kept else seg.kept_on(dev).nonzero().flatten()
        kept_ids = ids if kept is None else ids.index_select(0, kept)
        return kept, segment_sum_plan(kept_ids, seg.S)

    kept, plan = seg.memo(("segment_sum_plan", dev), make)
    rows = rows if kept is None else rows.index_select(0, kept)
    return segment_sum(rows, None, seg.S, plan)


def gram_from_row_grads(rows: torch.Tensor, seg: Segments, precision: str, tiles: dict | None = None, name=None):
    """fp64 (S, S) Gram of the segment sums of per-row gradients rows: (N, k); with
    ``tiles`` the segment sums (S, k) are also stored there under ``name``."""
    X = kept_segment_sum(rows, seg)
    if tiles is not None:
        tiles[name] = X
    return gram_of_segment_tiles(X, precision)


def probe_tiles(probe: Probe, X: torch.Tensor) -> float:
    """uᵀ(Σ_s X_s)w for kept segment gradients X: (S, m·n) (the segment sum as a GEMV)."""
    return probe.contract(X.new_ones(X.shape[0]) @ X)


def probe_row_grads(probe: Probe, rows: torch.Tensor, noise2: float, count: int) -> None:
    """Add Σ_rows uᵀ g_row w to a probe; rows: (N, m·n) per-row gradients of all rows."""
    probe.add(probe.contract(rows.sum(0)), noise2, count)


def dominant_weight(wr: torch.Tensor):
    """(w*, rows with weight != w*) for per-row weights wr: (N,), or None when no single
    value covers at least a quarter of the rows.

    combine() uses it with autograd's summed gradient G = Σ_rows D_rᵀA_r:
    Σ_r w_r D_rᵀA_r = w*·G + Σ_{r: w_r != w*} (w_r - w*) D_rᵀA_r, one GEMM over fewer rows
    (OrthoGrad: the forget batch shares one weight, so half the rows drop out).
    """
    vals, counts = torch.unique(wr, return_counts=True)
    k = int(counts.argmax())
    if int(counts[k]) * 4 < wr.numel():
        return None
    w_star = vals[k]
    return w_star, (wr != w_star).nonzero().flatten()


@dataclass
class Call:
    """One forward call of a module inside ``record()``.

    saved: what the rule's ``capture`` kept (the module input, usually, detached).
    grads: gradient of each output leaf (None until the backward reaches it).
    versions: version counters of saved tensors at capture, checked before use.
    cache: per-step values a rule derives once and reuses (Gram, probe, combine).
    rows: the row model's ``CallRows`` of the call (gram/rows.py); layouts: per output leaf,
    the rows.Layout its gradient is converted with before the rule reads it (None: as is).
    """

    saved: Any
    grads: list = field(default_factory=list)
    versions: tuple = ()
    cache: dict = field(default_factory=dict)
    rows: Any = None
    layouts: list = field(default_factory=list)

    @property
    def grad(self) -> torch.Tensor | None:
        return self.grads[0] if self.grads else None


class Rule:
    """Serves the parameters a module owns directly (``recurse=False``).

    One instance per module. ``params`` maps the module's local parameter names to the
    names ``model.named_parameters()`` gives (the keys of per-tensor Grams).

    Subclasses implement ``capture`` (forward: keep what the rule needs, detached),
    ``grams`` / ``combine`` / ``probe`` (from the calls, once their output gradients are in),
    and may override ``unsupported`` (a reason to send the module to the fallback instead),
    ``check`` (raise when the module's state makes rows interact) and ``describe``.
    """

    kind: ClassVar[str] = "rule"
    #: the rule serves every parameter in the module's subtree (attention uses its
    #: submodules' weights functionally, so their own hooks never fire)
    claims_subtree: ClassVar[bool] = False
    #: Grams computed after the backward (torch.func fallbacks), not from hooks
    deferred: ClassVar[bool] = False

    def __init__(self, module: nn.Module, path: str, params: dict[str, str]):
        self.module = module
        self.path = path
        self.params = dict(params)
        self.methods: dict[str, str] = {}
        #: global names whose weight this step's calls read detached (``detach_weight``), and
        #: those of them whose Gram must keep the segment gradients (``.grad`` comes from them)
        self.skipped: set[str] = set()
        self.forced: set[str] = set()

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        return None

    def probe_factors(self, local_name: str) -> tuple[int, ...]:
        """Sizes whose Kronecker product forms the probe's w for this parameter (Probe)."""
        return ()

    def check(self, module: nn.Module) -> None:
        return None

    def detach_weight(
        self, args: tuple, kwargs: dict, seg: Segments, opts: GramOptions, need_tiles: bool
    ) -> bool:
        """Store mode: whether this call (the layer's first of the step) may run with its
        ``weight`` detached, so that autograd skips the weight gradient; with ``need_tiles``
        only when its Gram will keep the per-segment gradients (``.grad`` is then formed from
        them). Engine docstring, "Detached weights"."""
        return False

    #: with its parameters detached, a call whose inputs need no gradient gets its output
    #: anchored in the graph by the engine (output + a zero leaf), so the rule still sees its
    #: output gradient while autograd skips the layer's whole backward (conv.py)
    anchors_output = False

    def detach_bias(self, args: tuple, kwargs: dict) -> bool:
        """Whether, with its weight detached, the layer also runs with its ``bias`` detached
        (its Gram, ``.grad`` and combination then come from the output gradients the rule
        records anyway). Only where that saves work: a convolution's CPU backward forms
        the weight gradient whenever the bias needs one (conv.py)."""
        return False

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        raise NotImplementedError

    #: set by the engine in stream mode for deferred rules: call it once ``ready`` may be true
    notify = None

    def ready(self, calls: list[Call]) -> bool:
        """Deferred rules: whether ``finish`` could run now, inside the backward (stream mode)."""
        return False

    def drop(self, calls: list[Call]) -> None:
        """Release tensors the rule keeps outside the calls, once their Grams are formed."""
        return None

    def hooks(self, saved) -> list:
        """Removable handles the capture registered (removed when record() exits)."""
        return []

    #: where the module may hold the rows of the batch (gram/rows.py measures where they
    #: are): "leading" — any dim before the output's ``out_features()`` trailing feature
    #: dims, the others being positions (Linear, Embedding, LayerNorm, RMSNorm); "dim0" —
    #: torch's batch dim only (Conv, GroupNorm, BatchNorm); "custom" — the rule reads the
    #: layouts itself (attention, the torch.func fallback)
    rows_at: ClassVar[str] = "leading"

    def out_features(self) -> int:
        """Trailing feature dims of the module's output (rows_at "leading")."""
        return 1

    def batched(self, t: torch.Tensor) -> bool:
        """rows_at "dim0": whether t (input or output gradient) has torch's batch dim (an
        unbatched call, N = 1, gets one)."""
        return True

    def layout_problem(self, layout, out: torch.Tensor) -> str | None:
        """Why this rule cannot read rows at ``layout`` (rows.Layout) of its output ``out``,
        or None."""
        if layout.dim is None or self.rows_at == "custom":
            return None
        if self.rows_at == "dim0":
            if layout.dim == 0 and layout.k == 1:
                return None
            return (f"the rows are in {layout.describe()} of its output {tuple(out.shape)}, but "
                    f"{type(self.module).__name__} takes the batch in dim 0 only, one row per entry")
        if layout.dim >= out.dim() - self.out_features():
            return f"the rows are in a feature dim ({layout.describe()}) of its output {tuple(out.shape)}"
        return None

    def to_rows(self, t: torch.Tensor, layout, N: int) -> torch.Tensor:
        """t (the captured input, or an output gradient) as (N, ...) with row n at index n
        (``layout_problem`` returned None)."""
        if layout.dim is None:
            return t if self.rows_at == "dim0" and self.batched(t) else t.unsqueeze(0)
        if self.rows_at == "dim0":
            return t
        return layout.rows(t, N)

    def grams(
        self, calls: list[Call], seg: Segments, opts: GramOptions, tiles: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """{name: fp64 (S, S) Gram}. With ``tiles`` (store mode), a rule may also put there
        {name: (S, numel)} segment gradients it formed anyway (Σ over the kept rows of each
        segment, exact): the engine then combines from them, ``probe`` reads them, and once
        every parameter of the rule has its tiles the calls are dropped."""
        raise NotImplementedError

    def combine(
        self, calls: list[Call], seg: Segments, weights: dict[str, torch.Tensor], totals: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """{name: Σ_s weights[name][s]·g_s} for the names in ``weights`` (a subset of the
        rule's: the others were combined from their tiles). ``totals`` holds, where known,
        autograd's gradient summed over all rows of this step (rules may use it with
        ``dominant_weight``)."""
        raise NotImplementedError

    def probe(self, calls: list[Call], seg: Segments, probes: dict[str, Probe], tiles: dict | None = None) -> None:
        """Add uᵀ(Σ over all rows of g_row)w to each served parameter's probe (Probe);
        ``tiles``: the segment gradients ``grams`` kept, if any."""
        raise NotImplementedError

    def segment_grads(self, calls: list[Call], seg: Segments, opts: GramOptions) -> dict[str, tuple]:
        """{name: (X, index)}: the per-segment gradients of each served parameter, exact,
        from the recorded calls: X (S, k) with index None (X is the whole flattened
        parameter, k = numel) or a LongTensor (k,) of the flat entries X covers (the others
        are zero in every segment: an embedding's absent rows). ``SampleGram.segment_grads``."""
        raise NotImplementedError(f"{type(self).__name__} does not form per-segment gradients")

    def describe(self) -> dict[str, str]:
        return {g: self.methods.get(g, self.kind) for g in self.params.values()}

    # helpers -------------------------------------------------------------------------
    def local(self, local_name: str) -> str | None:
        """Global name of a served local parameter, or None when it is not served."""
        return self.params.get(local_name)

    def param(self, local_name: str) -> torch.Tensor:
        return getattr(self.module, local_name)
