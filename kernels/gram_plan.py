"""The segment plan shared by the Gram kernels, and their row index math.

Canonical form of a matrix layer (Linear; Conv through unfolded patches) as the Gram
kernels read it (orthograd_fast/gram/rules/matrix.py has the maths):

    A: (N, T, d)   layer inputs of N rows at T positions each   fp32 | fp16 | bf16, any strides
    D: (N, T, p)   output gradients at the same rows/positions  fp32 | fp16 | bf16, any strides
    ids: (N,)      segment of each row, in [0, S), or -1 (row ignored: never read)

Rows of one segment are grouped once per step on the host (``segment_plan``): ``order``
lists the kept rows segment by segment (stable: ascending row index inside a segment),
``starts[s]:starts[s+1]`` is segment s's slice of ``order``. One plan serves every layer
of the step (all layers see the same N rows), so its single device-to-host sync (the
number of kept rows, and the id range check) is paid once per step.

Flat rows. Within a range of ``order`` the kernels walk "flat rows" f = (row position,
position t): f = j·T + t for the j-th row of the range, so a segment with n rows has n·T
flat rows, and the flat rows of consecutive segments are consecutive. ``flat_offsets``
turns flat indices into element offsets of a strided (N, T, ·) tensor in int64: a row
index times a row stride passes 2^31 elements on large layers (row 40 000 of an
(N, 512, 768) activation is at 1.6e10), and the position term t·stride_t can too.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    """

    N: int
    S: int
    n_kept: int
    max_rows: int
    order: torch.Tensor
    seg_sorted: torch.Tensor
    starts: torch.Tensor
    by_size: torch.Tensor

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
    n_kept = int(counts.sum()) if S else 0
    order = perm[:n_kept].contiguous()
    starts = torch.zeros(S + 1, dtype=torch.int64, device=dev)
    starts[1:] = torch.cumsum(counts, 0)
    by_size = torch.sort(counts, descending=True, stable=True).indices.to(torch.int64)
    max_rows = int(counts.max()) if S else 0
    return SegmentPlan(N=N, S=S, n_kept=n_kept, max_rows=max_rows, order=order,
                       seg_sorted=key[order].contiguous(), starts=starts, by_size=by_size.contiguous())


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
def flat_offsets(order_ptr, r0, f, n_flat, T, stride_n, stride_t):
    """Element offsets (int64) of flat rows f of the order range starting at r0.

    f: [BF] flat indices (j·T + t) relative to the range, n_flat: flat rows in the range.
    Returns (offsets [BF] int64 = order[r0 + f // T]·stride_n + (f % T)·stride_t,
    mask [BF] = f < n_flat). Every factor is widened to int64 before a product.
    """
    f = f.to(tl.int64)  # [BF]; every product below has an int64 factor
    mask = f < n_flat
    pos = r0 + f // T  # [BF] position in order (r0 is an int64 load)
    row = tl.load(order_ptr + pos, mask=mask, other=0).to(tl.int64)  # [BF]
    t = f % T  # [BF] int64
    return row * stride_n + t * stride_t, mask


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
