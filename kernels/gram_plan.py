"""The segment plan shared by the Gram kernels, and their row index math.

Canonical form of a matrix layer (Linear; Conv through unfolded patches) as the Gram
kernels read it (orthograd_fast/gram/rules/matrix.py has the maths):

    A: (N, T, d)   layer inputs of N rows at T positions each   fp32 | fp16 | bf16, any strides
    D: (N, T, p)   output gradients at the same rows/positions  fp32 | fp16 | bf16, any strides
    ids: (N,)      segment of each row, in [0, S), or -1 (row ignored: never read)

Rows of one segment are grouped once per step on the host (``segment_plan``): ``order``
lists the kept rows segment by segment (stable: ascending row index inside a segment),
``starts[s]:starts[s+1]`` is segment s's slice of ``order``. One plan serves every layer
of the step (all layers see the same N rows), so its two device-to-host syncs (the id range
check, the rows per segment) are paid once per step.

Flat rows. The kernels walk "flat rows" f = j·T + t (row j of the plan order, position
t), so segment s owns flat rows [starts[s]·T, starts[s+1]·T). ``flat_rows`` maps flat
indices to (row, t) and ``row_offsets`` to element offsets of a strided (N, T, ·)
tensor in int64: a row index times a row stride passes 2^31 elements on large layers
(row 40 000 of an (N, 512, 768) activation is at 1.6e10), and t·stride_t can too. Flat
indices themselves stay below 2^31 (launchers refuse n_kept·T past it), so the division
f // T runs in int32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SegmentPlan:
    """Kept rows grouped by segment (module docstring); build with ``segment_plan``.

    N: rows of the batch; S: segments; n_kept: rows with an id >= 0 (host int).
    order (n_kept,) int64: kept row indices, segment by segment, ascending inside one.
    seg_sorted (n_kept,) int64: the segment of each entry of order (non-decreasing).
    starts (S+1,) int64: segment s owns order[starts[s]:starts[s+1]] (empty segments allowed).
    by_size (S,) int64: segments by decreasing row count (longest first: the explicit
        kernel schedules them first so the long programs do not finish last).
    max_rows: rows of the largest segment (host int).
    counts: rows per segment (host tuple of S ints).
    """

    N: int
    S: int
    n_kept: int
    max_rows: int
    order: torch.Tensor
    seg_sorted: torch.Tensor
    starts: torch.Tensor
    by_size: torch.Tensor
    counts: tuple = ()
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def items(self, rows_per_item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every non-empty segment cut into runs of at most ``rows_per_item`` rows of the
        order ("items"; the explicit kernel's unit of work, so that a many-row segment is
        not one long program). Returns (lo (W,) int64, hi (W,) int64: item w owns
        order[lo:hi]; seg (W,) int64: its segment), longest items first. Memoized."""
        key = ("items", rows_per_item)
        if key not in self._memo:
            lo, hi, seg = [], [], []
            start = 0
            for s, n in enumerate(self.counts):
                for a in range(0, n, rows_per_item):
                    lo.append(start + a)
                    hi.append(start + min(n, a + rows_per_item))
                    seg.append(s)
                start += n
            by_len = sorted(range(len(lo)), key=lambda w: lo[w] - hi[w])  # stable: longest first
            t = torch.tensor([[lo[w] for w in by_len], [hi[w] for w in by_len], [seg[w] for w in by_len]],
                             dtype=torch.int64).reshape(3, -1).to(self.device)
            self._memo[key] = (t[0], t[1], t[2])
        return self._memo[key]

    def n_items(self, rows_per_item: int) -> int:
        """W of ``items(rows_per_item)``, without building them."""
        return sum(-(-n // rows_per_item) for n in self.counts)

    @property
    def device(self) -> torch.device:
        return self.order.device


def segment_plan(ids: torch.Tensor, num_segments: int) -> SegmentPlan:
    """Group the rows of ``ids`` by segment (once per step; module docstring).

    ids: (N,) integer tensor, values in [0, num_segments) or -1; num_segments: S >= 0.
    Returns a SegmentPlan on ids's device. Raises ValueError for a non-1-D or non-integer
    ids, a negative S, or an id outside [-1, S) (naming the offending value).
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"segment ids must be a 1-D tensor, got {type(ids).__name__} "
                         f"of shape {tuple(getattr(ids, 'shape', ()))}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"segment ids must be integers (int64), got {ids.dtype}")
    S = int(num_segments)
    if S < 0:
        raise ValueError(f"num_segments must be >= 0, got {num_segments}")
    ids = ids.to(torch.int64)
    N = ids.numel()
    dev = ids.device
    if N:
        lo, hi = (int(v) for v in torch.stack([ids.min(), ids.max()]).tolist())
        if lo < -1 or hi >= S:
            bad = lo if lo < -1 else hi
            raise ValueError(f"segment id {bad} is outside [-1, {S}) (num_segments={S}); "
                             "use -1 for rows to ignore, or pass a larger num_segments")
    kept = ids >= 0
    # ids + (S+1)·[ignored] puts ignored rows last; a stable sort keeps row order per segment
    key = torch.where(kept, ids, torch.full_like(ids, S))
    perm = torch.sort(key, stable=True).indices
    counts = torch.bincount(ids[kept], minlength=S)[:S]  # [S]
    counts_host = tuple(counts.tolist())  # the plan's second (and last) device-to-host sync
    n_kept = sum(counts_host)
    order = perm[:n_kept].contiguous()
    starts = torch.zeros(S + 1, dtype=torch.int64, device=dev)
    starts[1:] = torch.cumsum(counts, 0)
    by_size = torch.sort(counts, descending=True, stable=True).indices.to(torch.int64)
    max_rows = max(counts_host, default=0)
    return SegmentPlan(N=N, S=S, n_kept=n_kept, max_rows=max_rows, order=order,
                       seg_sorted=key[order].contiguous(), starts=starts, by_size=by_size.contiguous(),
                       counts=counts_host)


def check_rows(name_a: str, A: torch.Tensor, name_d: str, D: torch.Tensor, plan: SegmentPlan) -> None:
    """ValueError unless A (N, T, d) and D (N, T, p) are float tensors of the plan's rows."""
    for name, x in ((name_a, A), (name_d, D)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (rows, positions, features), got "
                             f"shape {tuple(getattr(x, 'shape', ()))}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; the Triton Gram kernels take float32, "
                             "float16 or bfloat16 (fp64: use the torch backend with precision='high')")
        if x.device != plan.device:
            raise ValueError(f"{name} is on {x.device} but the segment plan is on {plan.device}")
    if A.shape[:2] != D.shape[:2]:
        raise ValueError(f"{name_a} {tuple(A.shape)} and {name_d} {tuple(D.shape)} must agree on "
                         "(rows, positions)")
    if A.shape[0] != plan.N:
        raise ValueError(f"{name_a} has {A.shape[0]} rows but the segment plan has {plan.N}")


@triton.jit
def flat_rows(order_ptr, f, f_hi, T):
    """Rows and positions of flat rows f of the plan order (module docstring).

    f: [BF] flat indices pos·T + t (integers < 2^31: the launchers refuse n_kept·T past
    that), f_hi: end of the valid range. Returns (pos [BF] int32 = f // T, row [BF] int64
    = order[pos], t [BF] int64 = f % T, mask [BF] = f < f_hi). The division runs in int32 (a 64-bit
    division is a long software sequence on GPUs); the results are widened, so the
    offsets built from them (``row_offsets``) are int64.
    """
    mask = f < f_hi
    f32 = f.to(tl.int32)
    pos = f32 // T  # [BF]
    row = tl.load(order_ptr + pos, mask=mask, other=0).to(tl.int64)  # [BF]
    t = (f32 - pos * T).to(tl.int64)  # [BF]
    return pos, row, t, mask


@triton.jit
def row_offsets(row, t, stride_n, stride_t):
    """Element offsets row·stride_n + t·stride_t of int64 rows/positions (int64 products)."""
    return row * stride_n + t * stride_t


MAX_FLAT = 2**31 - 1


def check_flat(plan: "SegmentPlan", T: int, name: str) -> None:
    """ValueError when the kept flat rows n_kept·T do not fit the kernels' int32 indices."""
    if plan.n_kept * T > MAX_FLAT:
        raise ValueError(f"{name}: {plan.n_kept} kept rows x {T} positions = {plan.n_kept * T} flat rows "
                         f"exceed 2^31 - 1; use the torch backend or fewer rows per step")


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
