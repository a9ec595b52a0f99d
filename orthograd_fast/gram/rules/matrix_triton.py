"""The Triton path of a matrix layer's segment Gram: backend "triton", and "auto" on CUDA.

The maths is matrix.py's; the kernels are ``orthograd_fast.kernels`` (gram_plan.py groups
the rows by segment, gram_explicit.py is the flash-Gram, gram_ghost.py the ghost Gram,
each with its numerics and measured figures). This file hands the engine's rows to them
and decides where they run; matrix.gram calls it.

Rows. The kernels read A (N, T, d) and D (N, T, p) with any strides, rows in the order of
the step's segment ids. The row model (gram/rows.py) gives every rule canonical (N, ...)
rows, so a Linear call's A and D are LinearRows.x and .g themselves (views, no copy). A
convolution's are its unfolded patches, ConvRows.chunk over the whole batch: one copy of
N·C_in·prod(k)·L elements per call, the memory that implicit-GEMM loads would save
(ResNet-18's 64->64 layer at 32x32, N = 128: 75.5M fp32 elements, 302 MB). A layer of G
groups is G kernel launches, summed (<g_s, g_t> = Σ_g <g_sg, g_tg>); the calls of one
layer go to the kernels together, so their cross terms are in the Gram. One segment plan
per step serves every layer on a device (Segments.memo): its two host syncs are paid once.

What runs where.

* ghost (the cost model's choice, matrix.choose_method): ``ghost_gram``, weight and bias
  Grams in one pass, then matrix.guard_ghost, the torch path's cancellation safeguard with
  the same decision and fallbacks. Its sums Q_s = Σ_{f in s} |A_f|²|D_f|² (Σ|D_f|² for the
  bias) are reduced here with torch, O(F·(d+p)) (the kernel does not return its slabs'
  diagonals); weak segments' rows and columns are redone with fp64 products (torch: the
  kernels have none), and the block still weak in fp64, or the whole layer where fp64
  rows cost more, by the flash-Gram. The kernel sums each pair of BLOCK_F-row chunks in
  fp32 (per entry, 2·BLOCK_F + 1 more fp32 roundings than the torch path, whose segment
  sums are fp64; gram_ghost.py, "Numerics"), so τ grows by sqrt((d+p+2·BLOCK_F+1)/(d+p))
  (guard_ghost's ``extra``): 1.06 for a 384 -> 1536 layer with the GPU's BLOCK_F = 32.
* explicit, segment gradients not kept (stream mode; store mode where X (S, G·p·d) would
  outgrow the recorded tensors): ``flash_gram``, X never stored.
* explicit with kept segment gradients (store mode where X is no larger than the layer's
  recorded input + output gradient: convolutions and sequence layers at OrthoGrad's
  S = B + 1): the torch path. There X is formed on purpose: combine is then Σ_s w_s X_s
  (S·p·d) instead of a GEMM over the N·T rows, and autograd skipped the detached weight's
  gradient. The flash-Gram exists not to store X; on this path it would add that GEMM
  back, and its tile kernel runs at ~70 % of cuBLAS (gram_explicit.py), so the cuBLAS
  per-row tiles are the faster route.
* combine: the torch path always (linear.py, conv.py): one row-scaled cuBLAS GEMM (conv:
  the weight-gradient convolution), measured faster than kernels/gram_combine.py on every
  benchmark layer of an H200 (1.04-3x, that file's docstring).

Backend choice (``serves``): "auto" takes the kernels for CUDA tensors of compute
capability 8.0 or later (the kernels were measured on sm_90; older cards keep the torch
path) in fp32/fp16/bf16 with precision="fast"; everything else, the CPU included, stays on
the torch path. "triton" takes them wherever they can run, CUDA tensors or CPU tensors
under TRITON_INTERPRET=1 (the tests), and raises a ValueError naming the layer where they
cannot: fp64 rows, more than 65535 segments, 2^31 flat rows or more. ``check_backend`` is
SampleGram's check at construction.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import torch

from . import matrix
from .base import GramOptions, Segments, kept_segment_sum, sq_norm

#: dtypes the kernels read (products in fp32, Grams accumulated in fp64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: the flash-Gram's grid bound on segments (kernels/gram_explicit.py)
MAX_SEGMENTS = 65535


@functools.lru_cache(maxsize=1)
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(backend: str, precision: str) -> None:
    """ValueError when ``backend="triton"`` cannot run in this process (SampleGram's
    construction); nothing for the other backends."""
    if backend != "triton":
        return
    way_out = "use backend='auto' (the kernels on CUDA, the torch path elsewhere) or backend='torch'"
    if not _installed():
        raise ValueError(f"SampleGram: backend='triton' needs the triton package, which is not installed; {way_out}")
    if not torch.cuda.is_available() and not _interpreting():
        raise ValueError(
            "SampleGram: backend='triton' cannot run here: no CUDA device, and TRITON_INTERPRET=1 is not "
            f"set (Triton's interpreter runs the kernels on CPU tensors, slowly: for tests); {way_out}"
        )
    if precision != "fast":
        raise ValueError(
            f"SampleGram: backend='triton' with precision={precision!r}: the Triton kernels multiply in fp32 "
            "(summed in fp64); precision='high' needs fp64 products. Use precision='fast', or "
            "backend='torch' or 'auto' for fp64 products"
        )


def _why_not(calls: Sequence[matrix.MatrixRows], seg: Segments, opts: GramOptions) -> str | None:
    """Why the kernels cannot serve these rows (None: they can)."""
    c0 = calls[0]
    dev = c0.device
    if not _installed():
        return "the triton package is not installed"
    if dev.type != "cuda" and not (dev.type == "cpu" and _interpreting()):
        return (f"its tensors are on {dev}; the Triton kernels need CUDA tensors (or CPU tensors with "
                "TRITON_INTERPRET=1 set before Triton is imported)")
    if opts.precision != "fast":
        return f"precision={opts.precision!r} needs fp64 products, which the kernels do not have"
    if any(c.dtype not in KERNEL_DTYPES for c in calls):
        return f"its rows are {c0.dtype}; the kernels read float32, float16 or bfloat16"
    if seg.S > MAX_SEGMENTS:
        return f"{seg.S} segments exceed the kernels' {MAX_SEGMENTS}"
    flat = seg.n_kept * max(c.T for c in calls)
    if flat > 2**31 - 1:
        return f"{flat} flat rows (kept rows x positions) exceed the kernels' int32 indices"
    return None


def _capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def serves(calls: Sequence[matrix.MatrixRows], seg: Segments, opts: GramOptions, name: str = "") -> bool:
    """Whether the kernels form this layer's Gram (module docstring, "Backend choice");
    raises ValueError for backend "triton" where they cannot (``name``: the weight's)."""
    if opts.backend == "torch":
        return False
    if opts.backend == "auto":
        return _capable(calls[0].device) and _why_not(calls, seg, opts) is None
    why = _why_not(calls, seg, opts)
    if why is not None:
        raise ValueError(
            f"SampleGram(backend='triton'): layer weight {name!r}: {why}. Use backend='auto' (the torch "
            "path where the kernels cannot run) or backend='torch'"
        )
    return True


def step_plan(seg: Segments, device):
    """The step's kernels.gram_plan.SegmentPlan on ``device`` (made once per record() step)."""
    from orthograd_fast.kernels import gram_plan

    device = torch.device(device)
    return seg.memo(("triton_plan", device), lambda: gram_plan.segment_plan(seg.ids_on(device), seg.S))


def kernel_rows(calls: Sequence[matrix.MatrixRows]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """[group][call] -> (A (N, T, d), D (N, T, p)): each call's canonical rows as the kernels
    read them (Linear: views of x and g; conv: its unfolded patches, module docstring)."""
    out: list[list] = [[] for _ in range(calls[0].G)]
    for c in calls:
        A, D = c.chunk(slice(None))  # [N, G, d, T], [N, G, p, T]
        for g, rows in enumerate(out):
            rows.append((A[:, g].transpose(1, 2), D[:, g].transpose(1, 2)))  # [N, T, d], [N, T, p]
    return out


def gram_explicit(calls: Sequence[matrix.MatrixRows], seg: Segments, opts: GramOptions, keep: bool = False):
    """(K, None): the layer's fp64 (S, S) Gram from the flash-Gram (matrix.gram_explicit's
    contract without kept segment gradients: ``keep`` must be False)."""
    from orthograd_fast.kernels.gram_explicit import flash_gram

    if keep:
        raise ValueError("matrix_triton.gram_explicit does not keep segment gradients (module docstring)")
    c0 = calls[0]
    K = torch.zeros((seg.S, seg.S), dtype=torch.float64, device=c0.device)
    if seg.S == 0 or seg.n_kept == 0:
        return K, None
    plan = step_plan(seg, c0.device)
    for rows in kernel_rows(calls):
        flash_gram(rows, plan, out=K)
    return K, None


def _cancellation_sums(groups, seg: Segments, bias: bool):
    """(Q (S,), Qb (S,) or None): Σ over the kept flat rows f of each segment (all groups
    and calls) of |A_f|²|D_f|², and of |D_f|² (the bias's), in fp64."""
    q = qb = 0.0
    for rows in groups:
        for A, D in rows:
            a2, d2 = sq_norm(A, -1), sq_norm(D, -1)  # [N, T] fp64
            q = q + (a2 * d2).sum(1)
            if bias:
                qb = qb + d2.sum(1)
    Q = kept_segment_sum(q[:, None], seg)[:, 0]
    return Q, (kept_segment_sum(qb[:, None], seg)[:, 0] if bias else None)


def gram_ghost(calls: Sequence[matrix.MatrixRows], seg: Segments, opts: GramOptions, bias: bool = False):
    """(K, Kb): matrix.gram_ghost's contract from the ghost kernel, with its cancellation
    safeguard (module docstring)."""
    from orthograd_fast.kernels.gram_ghost import ghost_config, ghost_gram

    c0 = calls[0]
    S, dev = seg.S, c0.device
    K = torch.zeros((S, S), dtype=torch.float64, device=dev)
    Kb = torch.zeros_like(K) if bias else None
    if S == 0 or seg.n_kept == 0:
        return K, Kb
    plan = step_plan(seg, dev)
    groups = kernel_rows(calls)
    for rows in groups:
        if bias:
            Kb += ghost_gram(rows, plan, bias=True, out=K)[1]
        else:
            ghost_gram(rows, plan, out=K)
    Q, Qb = _cancellation_sums(groups, seg, bias)
    extra = 2 * ghost_config(S, dev)["BLOCK_F"] + 1
    return matrix.guard_ghost(calls, seg, opts, (K, Kb, Q, Qb), torch.float32, extra=extra, explicit=gram_explicit)
