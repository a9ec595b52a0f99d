"""The OrthoGrad unlearning step (DESIGN.md §1-2), built on the per-sample Gram engine.

One step, forget batch (x_f, y_f) of F rows and retain batch (x_r, y_r) of B rows:

1. one forward/backward over the concatenated batch [x_r; x_f] of the row-separable loss
   L = Σ_i ℓ(x_r_i) + mean_j ℓ(x_f_j), recorded by ``SampleGram`` with retain row i in
   segment i and every forget row in segment B (``retain_grads="mean"``: all retain rows
   in segment 0, forget rows in segment 1). Segment gradients: g_i (per retain sample, or
   their sum) and g_u (the mean forget loss, to be ascended);
2. the fp64 (S, S) segment Gram: K = Gram[:B, :B], b = Gram[:B, B], ‖g_u‖² = Gram[B, B];
3. c = K⁺ b on the numerical rank (the rule of ``linalg``), so g_u⊥ = g_u − Σ_i c_i g_i is
   g_u minus its projection on span{g_i};
4. the descent direction d = α·mean_i g_i − (1−α)·g_u⊥ written into ``.grad`` by one
   weighted combination: w_i = α/B + (1−α)c_i (retain), w_B = −(1−α) (forget);
5. optional clipping to ``max_grad_norm``, a finiteness check, ``optimizer.step()``.

``granularity="per_tensor"`` (the authors' code) solves step 3 per parameter tensor with
that tensor's Gram and writes per-tensor weights. No (B, P) buffer is ever formed.

Optimizer-aware. The guarantee is about the parameter change Δθ the optimizer makes, not
the gradient it is given: G·Δθ = 0 (α = 0; with α > 0, G·Δθ is the intended retain descent)
for G the retain per-sample gradients of the tensors the optimizer moves (the projection is
over exactly those: an optimizer over the last layer projects the last layer's gradients).

* plain SGD (one learning rate, no momentum history, no weight decay): Δθ = −lr·d, the
  written direction's orthogonality is the step's;
* SGD with momentum / Nesterov / dampening / weight decay / per-group learning rates: the
  step is Δθ = −lr·(a·g + b) with b from the momentum buffer and θ (optimizers.py), so the
  written g = −(1−α)g_u + Gᵀw solves the B x B system Σ_t lr_t|a_t|·K_t w' =
  (1−α)Σ_t lr_t|a_t| b_t − s·Σ_t G_t(lr_t·b_t) (per_tensor: one per tensor): exact, from the
  Grams and G·b (the per-segment gradients X, ``SampleGram.segment_grads``); with
  ``max_grad_norm`` the clip factor enters a fixed point that settles in a few rounds;
* Adam / AdamW: Δθ = −P(g)⊙m' with P = lr/(sqrt(v̂(g)) + ε) depending on the written g
  itself; at the first step Δθ ≈ −lr·sign(g), which no choice of the B coefficients makes
  orthogonal in general (a fixed point of the preconditioned solve G·P·Gᵀ did not settle:
  measured 8e-3 after 25 rounds). So the plain OrthoGrad gradient is written, Adam steps
  (its m, v are those of that gradient), and the step it took is projected:
  Δθ ← Δθ − Gᵀc, K c = G·Δθ (``step_projected`` = ‖Gᵀc‖/‖Δθ‖). Exact for any optimizer:
  ``project_step=True`` applies it to optimizers that are not modelled, which otherwise
  get one warning (the gradient is orthogonal, the step may not be).

Cost beyond the plain step: X = the per-segment gradients of the moved tensors (S·P
memory, formed one layer at a time from what the step recorded) whenever the step is not
plain SGD, and a copy of θ.

Reported figures. ``solve_orthogonality`` = ‖G d‖/(‖G‖₂‖d‖) of the solved direction from
the fp64 Gram blocks (G d = b − K c: it measures the solve only, ~1e-16). What the step
achieved: with X at hand (every non-plain step, or ``measure=True``) ``step_orthogonality``
= ‖G·Δθ‖/(‖G‖₂‖Δθ‖) and ``step_cosine_max`` = max_i |cos(g_i, Δθ)| on the actual Δθ (fp64
products of the fp32 X and Δθ); otherwise ``step_orthogonality_bound``: the solve's residual
+ the combination's rounding u·sqrt(N)·Σ_s|w_s|‖g_s‖/‖d‖ (a typical-error model) + the
rounding of θ − lr·g in the parameters' dtype, u·‖θ‖/‖Δθ‖ (measured on fp32 MLPs: ~1e-5,
against true values ~2e-7). ``orthogonality`` is the measured value when there is one
(α = 0), else the bound (of the ascent part, for α > 0).

Default rank tolerance (``DEFAULT_RTOL`` by the narrowest trainable dtype: 1e-4 for fp32
models, 1e-7 for fp64, 1e-2 for fp16/bf16) is far above ``project_orthogonal``'s (1e-7
for fp32), for two reasons: OrthoGrad has no refinement pass (it would cost a second
combination), so every error of c lands in the update; and the retain gradients are
themselves fp32 computations of the true gradients, whose backprop rounding (~1e-6
relative) makes directions below that level noise. Measured on the digits and
Fashion-MNIST MLPs (B = 64 with 32 near-duplicate pairs, σ_min/σ_max ≈ 2e-6), true
orthogonality ‖G g_u⊥‖/(‖G‖₂‖g_u⊥‖) against fp64 per-sample gradients: rtol 1e-7 gives up
to 4e-4 (coefficients ~1e9 amplifying the noise), 1e-5 up to 3e-5, 1e-4 at most 8e-7, on
both "fast" and "high" Grams. Dropping σ < 1e-4 σ_max leaves those retain samples a
first-order loss change of at most ~1e-4 of plain ascent's.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import batches as _batches
from .gram.rules.base import all_finite
from .linalg import _single_thread
from .optimizers import describe, is_plain
from .modes import eval_modes

GRANULARITIES = ("global", "per_tensor")
DEFAULT_RTOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
RETAIN_GRADS = ("per_sample", "mean")


class NonFiniteGradientError(FloatingPointError):
    """NaN/Inf reached a loss, the Gram or the update; raised before the optimizer step."""


def _default_loss(logits, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of the logits (a tensor, ``.logits`` or ``["logits"]``);
    targets -100 give 0 (F.cross_entropy's ignore_index). ``OrthoGrad.step`` checks the
    targets first (batches.class_target_problem)."""
    return F.cross_entropy(_batches.logits_of(logits), targets, reduction="none")


def _default_loss_problem(out, y: torch.Tensor, B: int) -> str | None:
    """Why the default loss cannot take this output and these targets (rows named in the
    forget or retain batch the caller passed, not in their concatenation)."""
    logits = _batches.logits_of(out)
    if logits is None:
        return (f"the model returned {type(out).__name__}; the default loss needs logits (a tensor, or an "
                "output with a .logits tensor): pass loss_fn(outputs, targets) -> per-sample losses (N,)")
    return _batches.class_target_problem(
        logits, y, ignore_index=-100,
        where=lambda r: f"retain row {r}" if r < B else f"forget row {r - B}")


def _unpack(batch, what: str):
    """(inputs, targets) of a forget or retain batch (batches.py: a pair, or a mapping with labels)."""
    x, y, _ = _batches.split_batch(batch, f"{what} batch")
    return x, y


def _solve(K: torch.Tensor, b: torch.Tensor, gg: torch.Tensor, rtol: float, max_rank: int | None = None):
    """c = K⁺b with r = g_u − Σ c_i g_i: (c, rank, G r (B,), ‖r‖²), from Gram blocks only."""
    cap = None if max_rank is None else torch.tensor([max_rank])
    c, rank, Gr, rr = _solve_batched(K[None], b[None], gg[None], rtol, cap)
    return c[0], int(rank[0]), Gr[0], rr[0]


def _certified_full_rank(C: torch.Tensor, rtol: float) -> torch.Tensor:
    """(L,) bool: cosine matrices C (L, n, n) whose every eigenvalue provably exceeds the
    rank rule's threshold rtol²·λ_max, so that K⁺ = K⁻¹ and no eigh is needed.

    Certificate: a Cholesky factorisation of C − τI succeeds with τ = 2·rtol²·ρ, where
    ρ = max_i Σ_j |C_ij| ≥ λ_max (Gershgorin). A computed Cholesky of M succeeds only if
    M + E is positive definite for some ‖E‖₂ ≲ n²·u·ρ (backward error), so λ_min(C) >
    τ − n²uρ ≥ rtol²·ρ ≥ rtol²·λ_max when rtol² ≥ n²u: below that (rtol 1e-7 in fp64)
    nothing is certified and eigh decides. Cholesky is ~n³/3 flops against eigh's ~9n³
    (129 x 129, one CPU core: ~0.1 ms against 1.1 ms)."""
    L, n = C.shape[0], C.shape[-1]
    if n == 0 or rtol * rtol < n * n * torch.finfo(C.dtype).eps:
        return torch.zeros(L, dtype=torch.bool, device=C.device)
    rho = C.abs().sum(-1).amax(-1)  # [L]
    shifted = C - (2 * rtol * rtol * rho)[:, None, None] * torch.eye(n, dtype=C.dtype, device=C.device)
    return torch.linalg.cholesky_ex(shifted).info == 0


def _solve_batched(K: torch.Tensor, b: torch.Tensor, gg: torch.Tensor, rtol: float,
                   max_rank: torch.Tensor | None = None):
    """``_solve`` for L Grams at once: K (L, B, B), b (L, B), gg (L,) -> c (L, B),
    rank (L,), G r (L, B), ‖r‖² (L,) (per_tensor granularity: one batched solve, not L).

    max_rank (L,): the number of entries of each Gram's tensor, which its gradients cannot
    span more directions than: at most that many eigen-directions (the largest) are kept,
    and a Gram of a tensor with fewer entries than B rows is never certified full rank.
    Without the cap, a 10-entry bias reported rank 21 at B = 128 on the fp32-product Gram,
    whose rounding floor (σ/σ_max ~ 3e-4) sits above OrthoGrad's fp32 rtol (README,
    "Numerics").

    The maths of ``linalg.gram_pinv`` (its module docstring) on all L together: a
    zero-norm row is dropped by giving it cosine-matrix row/column e_j·(−1), so its
    eigenpair (−1, e_j) is never kept (kept: λ > rtol²·λ_max > 0) and the other eigenpairs
    are those of the kept block; K⁺ = D^-1/2 V_k diag(1/λ_k) V_kᵀ D^-1/2. A cosine matrix
    certified full rank (``_certified_full_rank``) skips the eigh: K⁺ = D^-1/2 C⁻¹ D^-1/2
    from its Cholesky factor, the same matrix the rule would keep in full. The (L, B, B)
    work runs on the CPU, one thread, as linalg.gram_pinv's does (small eigh/Cholesky calls
    are expected to be launch-bound on a GPU; not yet measured there); results come back on
    K's device.
    """
    device = K.device
    K, b, gg = K.detach().cpu(), b.detach().cpu(), gg.detach().cpu()
    K = 0.5 * (K + K.mT)
    d = torch.diagonal(K, dim1=-2, dim2=-1)
    kept = d > 0
    inv_sqrt_d = torch.where(kept, d.clamp_min(torch.finfo(K.dtype).tiny).rsqrt(), torch.zeros_like(d))
    C = K * inv_sqrt_d[:, :, None] * inv_sqrt_d[:, None, :]
    C = C - torch.diag_embed((~kept).to(C.dtype))  # dropped rows: eigenpair (-1, e_j)
    n = C.shape[-1]
    inv_C = torch.empty_like(C)  # C restricted to the kept directions, inverted there
    rank = torch.empty(C.shape[0], dtype=torch.long, device=C.device)
    with _single_thread():
        full = _certified_full_rank(C, rtol)
        if max_rank is not None:
            max_rank = max_rank.to(device=C.device, dtype=torch.long)
            full &= max_rank >= n
        n_full = int(full.sum())
        if n_full == C.shape[0]:  # all certified (the common per-tensor case): no gather/scatter
            inv_C = torch.cholesky_inverse(torch.linalg.cholesky(C))
            rank.fill_(n)
        elif n_full:
            inv_C[full] = torch.cholesky_inverse(torch.linalg.cholesky(C[full]))
            rank[full] = n
        rest = ~full
        if n_full < C.shape[0]:
            lam, V = torch.linalg.eigh(C[rest])  # ascending
            lam_max = lam[:, -1].clamp_min(0)
            keep = (lam > (rtol * rtol) * lam_max[:, None]) & (lam_max[:, None] > 0)
            if max_rank is not None:  # only the largest max_rank of the ascending eigenvalues
                keep &= torch.arange(n, device=C.device) >= (n - max_rank[rest])[:, None]
            inv_lam = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
            inv_C[rest] = (V * inv_lam[:, None, :]) @ V.mT
            rank[rest] = keep.sum(-1)
    pinv = inv_C * inv_sqrt_d[:, :, None] * inv_sqrt_d[:, None, :]  # D^-1/2 C⁺ D^-1/2, [L, B, B]
    c = (pinv @ b[:, :, None]).squeeze(-1)
    Kc = (K @ c[:, :, None]).squeeze(-1)
    Gr = b - Kc
    rr = (gg - 2 * (c * b).sum(-1) + (c * Kc).sum(-1)).clamp_min(0)
    if device.type != "cpu":
        c, rank, Gr, rr = (t.to(device) for t in (c, rank, Gr, rr))
    return c, rank, Gr, rr


def _norms64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(L,) fp64 2-norms of the tensors, formed in fp64 without fp64 copies (one
    ``torch._foreach_norm`` call when they share a device and are dense)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    dev = tensors[0].device
    if any(t.device != dev or t.is_sparse for t in tensors):
        return torch.stack([torch.linalg.vector_norm(t.to_dense(), dtype=torch.float64).cpu() for t in tensors])
    return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float64))


def _finite_sq_norm(tensors: list[torch.Tensor]) -> tuple[bool, float]:
    """(whether no tensor holds NaN/Inf, Σ_t ‖t‖² in fp64), from one fp64 norm per tensor.

    A finite norm proves its tensor finite (NaN and Inf propagate through a sum of squares);
    a non-finite one is rechecked with ``isfinite`` (an fp64 sum of squares overflows only
    for entries beyond ~1e154, never for fp32/fp16/bf16 ones). One reduction pass per
    tensor instead of an ``isfinite`` mask and its ``all`` per tensor."""
    norms = _norms64(tensors)
    sq = float(norms.square().sum())
    if math.isfinite(sq):
        return True, sq
    return all(bool(torch.isfinite(t).all()) for t in tensors), sq


def _spectral_sq(K: torch.Tensor) -> float:
    """‖G‖₂² = λ_max(K) of a Gram K (B, B), on the CPU like ``_solve_batched``."""
    if K.numel() == 0:
        return 0.0
    K = K.detach().cpu()
    with _single_thread():
        return float(torch.linalg.eigvalsh(0.5 * (K + K.T))[-1].clamp_min(0))


class OrthoGrad:
    """Unlearning by ascent on the forget loss orthogonal to every per-sample retain gradient.

    model: the network (its trainable parameters are projected and updated; frozen ones
    are left alone). optimizer: any torch optimizer over (some of) those parameters; the
    step writes the direction d (module doc) into ``.grad`` and calls ``optimizer.step()``.
    loss_fn(logits, targets) -> per-sample losses (N,) (default cross-entropy).
    granularity: "global" (one projection of the whole trainable vector, the paper's maths)
    or "per_tensor" (each tensor on its own, the authors' code). alpha in [0, 1]: weight of
    retain descent (0 = pure projected ascent). retain_grads: "per_sample" (OrthoGrad) or
    "mean" (the paper's unstable ablation: project against the mean retain gradient only).
    rtol: rank tolerance on σ/σ_max of the row-normalised retain gradients (None: module
    doc). max_grad_norm: clip the update's total norm.
    backend: passed to ``SampleGram``. engine: a ready per-sample Gram engine with the
    ``SampleGram`` interface (default: ``SampleGram(model, trainable params, backend=backend,
    record_grads=False)``: the step always combines, so the record pass skips Linear/Conv
    weight gradients).

    optimizer_aware: "auto" (model SGD/Adam/AdamW steps, module docstring "Optimizer-aware";
    warn once for other optimizers), True (refuse unmodelled optimizers), False (project the
    written gradient only). measure: also measure the step's orthogonality on the actual
    Δθ for plain SGD (costs the per-segment gradients). project_step: project the actual
    step of any optimizer (used for Adam/AdamW always). max_fixed_point_iters: rounds of the
    clip-factor fixed point.

    eval_mode: run the step's forward/backward with every module in eval mode (BatchNorm on
    its running statistics, Dropout and attention dropout off) and give each module its
    own mode back afterwards (``orthograd_fast.modes``): the rows are then independent and
    the retain gradients are those of the model as deployed. False: the modes as they are
    (BatchNorm in train mode is then refused; Dropout draws one mask, shared by the Gram
    and the update, so the step is orthogonal to that sub-network's retain gradients only).

    Use as a context manager or call :meth:`close` to remove the engine's hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        granularity: str = "global",
        alpha: float = 0.0,
        retain_grads: str = "per_sample",
        rtol: float | None = None,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        engine=None,
        eval_mode: bool = True,
        optimizer_aware: bool | str = "auto",
        measure: bool = False,
        project_step: bool = False,
        max_fixed_point_iters: int = 25,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if retain_grads not in RETAIN_GRADS:
            raise ValueError(f"retain_grads must be one of {RETAIN_GRADS}, got {retain_grads!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._numel = {n: p.numel() for n, p in self.named}  # rank caps of the solves (_solve_batched)
        if not self.named:
            raise ValueError("model has no trainable parameters (requires_grad=True): nothing to unlearn")
        trainable = {id(p) for _, p in self.named}
        held = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in trainable:
                    raise ValueError(
                        "the optimizer holds a parameter that is frozen or not in the model; "
                        "OrthoGrad only writes .grad of the model's trainable parameters"
                    )
                held.add(id(p))
            if group.get("maximize", False):
                raise ValueError(
                    "the optimizer has maximize=True: OrthoGrad writes a descent direction into .grad "
                    "(it ascends the forget loss itself), so a maximizing optimizer would learn the "
                    "forget set; construct the optimizer with maximize=False"
                )
        # the projection is over the tensors the step moves: those the optimizer holds
        self.named = [(n, p) for n, p in self.named if id(p) in held]
        self._numel = {n: p.numel() for n, p in self.named}
        if not self.named:
            raise ValueError("the optimizer holds none of the model's trainable parameters: nothing to unlearn")
        if optimizer_aware not in ("auto", True, False):
            raise ValueError(f"optimizer_aware must be 'auto', True or False, got {optimizer_aware!r}")
        if not isinstance(measure, bool):
            raise ValueError(f"measure must be True or False, got {measure!r}")
        if isinstance(max_fixed_point_iters, bool) or not isinstance(max_fixed_point_iters, int) or max_fixed_point_iters < 1:
            raise ValueError(f"max_fixed_point_iters must be a positive int, got {max_fixed_point_iters!r}")
        if not isinstance(project_step, bool):
            raise ValueError(f"project_step must be True or False, got {project_step!r}")
        self.optimizer_aware, self.measure, self.max_iters = optimizer_aware, measure, max_fixed_point_iters
        self.project_step = project_step
        self._warned = False
        if rtol is None:
            narrowest = min((p.dtype for _, p in self.named), key=lambda d: torch.finfo(d).bits)
            rtol = DEFAULT_RTOL[narrowest]
        elif not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
            raise ValueError(f"rtol must be a float in [0, 1), got {rtol!r}")
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or _default_loss
        self.granularity, self.alpha, self.retain_grads = granularity, float(alpha), retain_grads
        self.rtol, self.max_grad_norm = float(rtol), max_grad_norm
        if not isinstance(eval_mode, bool):
            raise ValueError(f"eval_mode must be True or False, got {eval_mode!r}")
        self.eval_mode = eval_mode
        if engine is None:
            from .gram import SampleGram

            # combine() always follows record() here: autograd need not form .grad at record
            engine = SampleGram(model, [p for _, p in self.named], backend=backend, record_grads=False)
        self.engine = engine

    # ------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the Gram engine's hooks."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------
    def _check_finite(self, gram: torch.Tensor) -> None:
        if not bool(torch.isfinite(gram).all()):
            raise NonFiniteGradientError(
                "non-finite values (NaN or Inf) in the per-sample gradient Gram: the model or a "
                "loss overflowed (lower the learning rate or set max_grad_norm)"
            )

    def _combination(self, c: torch.Tensor, nb: int, B: int) -> torch.Tensor:
        """Combination weights (..., nb + 1) from coefficients c (..., nb)."""
        a = self.alpha
        w = torch.empty(c.shape[:-1] + (nb + 1,), dtype=torch.float64, device=c.device)
        w[..., :nb] = a / B + (1.0 - a) * c  # mean_i g_i = Σ_i g_i / B in both modes
        w[..., nb] = -(1.0 - a)
        return w

    def _weights(self, gram: torch.Tensor, nb: int, B: int):
        """Combination weights (S,) and the Gram-block stats for one (S, S) Gram."""
        self._check_finite(gram)
        K, b, gg = gram[:nb, :nb], gram[:nb, nb], gram[nb, nb]
        c, rank, Gr, rr = _solve(K, b, gg, self.rtol, sum(self._numel.values()))
        return self._combination(c, nb, B), c, rank, Gr, rr, gg

    def step(self, forget_batch, retain_batch) -> dict:
        """One OrthoGrad step. forget_batch, retain_batch: (inputs, targets) pairs, or mappings
        with a "labels" entry (a Hugging Face collator's batch). Inputs: a tensor (N, ...)
        (called ``model(x)``), a tuple of tensors (``model(*x)``) or a mapping of tensors
        (``model(**x)``), rows in dim 0 (orthograd_fast.batches). Targets: (N,) class
        indices for the default cross-entropy (checked against the logits: shape, range),
        anything ``loss_fn`` takes otherwise.

        Returns {forget_loss, retain_loss (means over the batch rows, before the step),
        rank (numerical rank of the retain gradients; per_tensor: summed over tensors),
        coef_norm ‖c‖, kept ‖g_u⊥‖/‖g_u‖, solve_orthogonality, orthogonality and
        step_orthogonality / step_cosine_max or step_orthogonality_bound (module docstring,
        "Reported figures"), step_projected (Adam, project_step), fixed_point_iters,
        optimizer, grad_norm (of the written gradient before clipping), step_time (s)}.
        Raises NonFiniteGradientError (before any parameter changes) on NaN/Inf in a loss, the
        Gram or the update; ValueError (before any change) on bad batches: NaN/Inf in the data
        (rows of the batch passed), inputs of another dtype than the model, targets the
        default loss cannot take, a call under ``torch.no_grad()``/``inference_mode()``.
        """
        if self.engine is None:
            raise ValueError("this OrthoGrad was closed")
        if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
            ctx = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
            raise ValueError(
                f"OrthoGrad.step() was called under {ctx}: the step needs the gradients of a "
                "forward/backward pass; call it outside that context"
            )
        t0 = time.perf_counter()
        xf, yf = _unpack(forget_batch, "forget")
        xr, yr = _unpack(retain_batch, "retain")
        B, Fn = yr.shape[0], yf.shape[0]
        self._B = B
        per_sample = self.retain_grads == "per_sample"
        nb = B if per_sample else 1
        dev = _batches.leaves(xr)[0][1].device
        seg_r = torch.arange(B, device=dev) if per_sample else torch.zeros(B, dtype=torch.long, device=dev)
        segments = torch.cat([seg_r, torch.full((Fn,), nb, dtype=torch.long, device=dev)])
        pdt = self.named[0][1].dtype
        for what, t in (("retain batch", xr), ("forget batch", xf)):
            if not all(all_finite(v) for _, v in _batches.leaves(t) if isinstance(v, torch.Tensor)):
                _batches.check_finite(t, what)  # names the rows (one aminmax per input leaf first)
            _batches.check_dtype(t, pdt, what)
        problem = _batches.align_problem(xf, xr)
        if problem is not None:
            raise ValueError(f"forget and retain batches cannot be concatenated: {problem}")
        x = _batches.cat_rows(xr, xf)
        y = torch.cat([yr, yf.to(device=yr.device)])
        default_loss = self.loss_fn is _default_loss

        self.optimizer.zero_grad(set_to_none=True)
        try:
            with eval_modes(self.model, self.eval_mode), self.engine.record(segments, num_segments=nb + 1):
                out = _batches.call(self.model, x)
                if default_loss and (problem := _default_loss_problem(out, y, B)) is not None:
                    raise ValueError(f"OrthoGrad's default loss (cross-entropy): {problem}")
                losses = self.loss_fn(out, y)
                if losses.dim() != 1 or losses.shape[0] != B + Fn:
                    raise ValueError(
                        f"loss_fn must return per-sample losses of shape ({B + Fn},), got {tuple(losses.shape)}"
                    )
                loss_r, loss_f = losses[:B], losses[B:]
                (loss_r.sum() + loss_f.mean()).backward()
        except ValueError as e:  # the engine's own checks may trip over NaN/Inf first
            if all(bool(torch.isfinite(p).all()) for _, p in self.named):
                raise
            raise NonFiniteGradientError(f"non-finite model parameters: the model diverged ({e})") from e
        forget_loss, retain_loss = float(loss_f.detach().mean()), float(loss_r.detach().mean())
        if not (math.isfinite(forget_loss) and math.isfinite(retain_loss)):
            raise NonFiniteGradientError(
                f"non-finite loss (forget {forget_loss}, retain {retain_loss}): the model diverged"
            )

        try:
            grams = self.engine.gram(per_tensor=True)
        except FloatingPointError as e:  # the engine's own non-finite check (gram.NonFiniteGramError)
            raise NonFiniteGradientError(str(e)) from e
        stacked = torch.stack(list(grams.values()))  # [L, S, S], one copy for the check and the solve
        self._check_finite(stacked)
        steps, why = self._optimizer_steps()
        # Adam/AdamW (and, with project_step=True, any optimizer): the step itself is
        # projected after optimizer.step() (module docstring, "Optimizer-aware")
        post = (why is None and any(st.adam is not None for st in steps.values())) or (
            why is not None and self.project_step)
        aware = why is None and not post and not is_plain(steps)
        linear = aware and all(st.b is None and st.c is None for st in steps.values())
        X = None
        if (aware and not linear) or post or self.measure:
            X = self.engine.segment_grads(list(grams))
        solved = None  # (‖G‖₂², stacked per-tensor weights and Grams) of the plain solve, for the bound
        if aware:
            weights, stats, grads = self._aware_step(grams, X, steps, nb, B)
        else:
            weights, stats, solved = self._plain_solve(grams, nb, B, stacked)
            grads = None
        if grads is None and X is not None:
            grads = {n: self._combine_from(X[n], weights[n] if isinstance(weights, dict) else weights, p)
                     for n, p in self.named}
        if grads is None:
            self.engine.combine(weights)
        else:
            for n, p in self.named:
                p.grad = grads[n].to(p.dtype).view(p.shape)
        params = [p for _, p in self.named if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))  # clip_grad_norm_'s
        if not math.isfinite(grad_norm):
            raise NonFiniteGradientError(f"the OrthoGrad update has a non-finite norm ({grad_norm})")
        if not aware and self.max_grad_norm is not None and grad_norm > self.max_grad_norm:
            scale = self.max_grad_norm / grad_norm  # the aware step clipped inside its solve
            for p in params:
                p.grad.mul_(scale)
        before = {n: p.detach().clone() for n, p in self.named} if X is not None else None
        # ‖written gradient‖ in fp64, for the bound (a step the optimizer model covers)
        dnorm = math.sqrt(float(_norms64([p.grad for p in params]).square().sum())) if why is None else None
        self.optimizer.step()
        with torch.no_grad():  # the finiteness check gives ‖θ‖² for the bound on the way
            finite, theta_sq = _finite_sq_norm([p for _, p in self.named])
        if not finite:
            if before is not None:
                with torch.no_grad():
                    for n, p in self.named:
                        p.copy_(before[n])
            raise NonFiniteGradientError(
                f"{type(self.optimizer).__name__}.step() made parameters non-finite from a finite gradient "
                f"(an overflow in the optimizer's arithmetic, e.g. Adam's eps underflowing in fp16: use "
                f"fp32 master weights){'; the parameters were restored' if before is not None else ''}"
            )
        if post:
            stats.update(self._project_step(grams, X, before, nb))
            theta_sq = None  # the projection moved θ again
        stats.update(self._step_stats(grams, X, before, dnorm, weights, steps, why, nb, solved, theta_sq))
        stats["grad_norm"] = grad_norm
        stats["step_time"] = time.perf_counter() - t0
        stats.update({"forget_loss": forget_loss, "retain_loss": retain_loss})
        return stats

    # ------------------------------------------------------------------------------ solves
    def _optimizer_steps(self):
        """(TensorSteps of the moved tensors, None) or ({}, why the step is not modelled);
        warns once when the optimizer is not modelled (optimizer_aware="auto")."""
        if self.optimizer_aware is False:
            return {}, "optimizer_aware=False"
        steps, why = describe(self.optimizer, dict(self.named))
        if why is not None:
            if self.optimizer_aware is True:
                raise ValueError(f"optimizer_aware=True: {why}")
            if not self._warned and not self.project_step:
                self._warned = True
                warnings.warn(
                    f"OrthoGrad: {why}: the gradient written into .grad is orthogonal to every retain "
                    "per-sample gradient, but the step the optimizer takes from it may not be "
                    "(momentum, adaptive scaling, weight decay). Use SGD, Adam or AdamW, or "
                    "OrthoGrad(..., project_step=True) to project the step it takes.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return steps, why

    def _plain_weights(self, grams: dict, nb: int, B: int):
        """The written gradient's projection (module docstring, steps 3-4): combination
        weights (S,) or {name: (S,)}, and the solve's stats."""
        weights, stats, _ = self._plain_solve(grams, nb, B)
        return weights, stats

    def _plain_solve(self, grams: dict, nb: int, B: int, stacked: torch.Tensor | None = None):
        """``_plain_weights`` and (‖G‖₂², the per-tensor weights stacked (L, S) and Grams
        stacked (L, S, S), or None, None for global), which the step's bound reuses
        (``_step_stats``). stacked: the Grams of ``grams``
        stacked in their order (L, S, S), when the caller has them."""
        W = G = None
        if self.granularity == "global":
            gram = sum(grams.values())
            weights, c, rank, Gr, rr, gg = self._weights(gram, nb, B)
            coef_sq = float(c @ c)
            norm_sq = _spectral_sq(gram[:nb, :nb])
        else:  # one stacked (L, S, S) solve for the L tensors
            G = torch.stack(list(grams.values())) if stacked is None else stacked  # [L, S, S]
            K, b, gg_l = G[:, :nb, :nb], G[:, :nb, nb], G[:, nb, nb]
            caps = self._caps(grams, nb)
            c, ranks, Gr_l, rr_l = _solve_batched(K, b, gg_l, self.rtol, caps)
            W = self._combination(c, nb, B)  # [L, S]
            weights = dict(zip(grams, W.unbind(0)))
            rank, coef_sq = int(ranks.sum()), float((c * c).sum())
            Gr, rr, gg = Gr_l.sum(0), rr_l.sum(), gg_l.sum()
            norm_sq = _spectral_sq(K.sum(0))
        denom = (norm_sq * float(rr)) ** 0.5
        return weights, {
            "rank": rank,
            "coef_norm": coef_sq**0.5,
            "solve_orthogonality": float(Gr.norm()) / denom if denom > 0 else 0.0,
            "kept": (float(rr) / float(gg)) ** 0.5 if float(gg) > 0 else 0.0,
            "fixed_point_iters": 0,
        }, (norm_sq, W, G)

    def _caps(self, grams: dict, nb: int) -> torch.Tensor:
        """(L,) rank caps of the per-tensor solves (``_solve_batched``), made once per name
        order."""
        key = (tuple(grams), nb)
        if getattr(self, "_caps_cache", (None,))[0] != key:
            self._caps_cache = (key, torch.tensor([self._numel.get(n, nb) for n in grams]))
        return self._caps_cache[1]

    @staticmethod
    def _combine_from(Xi: tuple, w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Σ_s w_s X_s as a dense fp64 tensor of p's numel, from (X, index)."""
        X, index = Xi
        v = w.to(torch.float64) @ X.to(torch.float64)  # [k]
        if index is None:
            return v
        out = torch.zeros(p.numel(), dtype=torch.float64, device=v.device)
        out[index] = v
        return out

    def _aware_step(self, grams: dict, X, steps: dict, nb: int, B: int):
        """The optimizer-aware solve (module docstring, "Optimizer-aware"): weights such that
        the optimizer's step Δθ = −P(g)⊙(a·g + b) − c satisfies G·Δθ = (the α retain
        descent), G the retain per-sample gradients of the moved tensors. Linear steps (P
        constant per tensor, b = c = 0: SGD with per-group learning rates) need only the
        Grams; otherwise the per-segment gradients X give G·P·Gᵀ, G·P·b, G·c, and P(g) (Adam)
        or the clip factor κ make it a fixed point, iterated until the weights settle.
        Returns (weights, stats, written gradients {name: fp64 dense} or None)."""
        alpha, names = self.alpha, [n for n, _ in self.named]
        sgn = 1.0 if next(iter(steps.values())).a > 0 else -1.0
        params = dict(self.named)
        if X is None:  # linear: K_P = lr·|a|·K per tensor
            scaled = {n: grams[n] * (steps[n].lr * abs(steps[n].a)) for n in names}
            weights, stats = self._plain_weights(scaled, nb, B)
            stats["fixed_point_iters"] = 1
            return weights, stats, None
        XR = {n: X[n][0][:nb].to(torch.float64) for n in names}  # [nb, k]
        xu = {n: X[n][0][nb].to(torch.float64) for n in names}  # [k]
        idx = {n: X[n][1] for n in names}

        def sel(v, n):  # a full-tensor vector restricted to the entries X covers
            if v is None:
                return None
            v = v.reshape(-1) if torch.is_tensor(v) else v
            return v if idx[n] is None or not torch.is_tensor(v) else v[idx[n]]

        weights, stats = self._plain_weights(grams, nb, B)  # start: the plain projection
        kappa, iters, prev = 1.0, 0, None
        for iters in range(1, self.max_iters + 1):
            Ks, rs, ggs = {}, {}, {}
            g = {n: self._combine_from(X[n], weights[n] if isinstance(weights, dict) else weights, params[n])
                 for n in names}
            for n in names:
                st = steps[n]
                P = sel(st.scale(kappa * g[n]), n)
                P = torch.as_tensor(P, dtype=torch.float64, device=XR[n].device)
                a = abs(st.a) * kappa
                XP = XR[n] * P if P.dim() else XR[n] * float(P)  # [nb, k]
                Ks[n] = a * (XP @ XR[n].T)
                r = (1 - alpha) * a * (XP @ xu[n])
                if st.b is not None:
                    r = r - sgn * (XP @ sel(st.b, n))
                if st.c is not None:
                    r = r - sgn * (XR[n] @ sel(st.c, n))
                rs[n] = r
                ggs[n] = a * float((xu[n] * (P if P.dim() else float(P)) * xu[n]).sum())
            weights, stats = self._aware_weights(Ks, rs, ggs, nb, B, names)
            gn = {n: self._combine_from(X[n], weights[n] if isinstance(weights, dict) else weights, params[n])
                  for n in names}
            if self.max_grad_norm is not None:
                total = math.sqrt(sum(float((v * v).sum()) for v in gn.values()))
                kappa_new = min(1.0, self.max_grad_norm / total) if total > 0 else 1.0
            else:
                kappa_new = 1.0
            flatw = torch.cat([w.reshape(-1) for w in (weights.values() if isinstance(weights, dict) else [weights])])
            if prev is not None and float((flatw - prev).abs().max()) <= 1e-12 * max(float(flatw.abs().max()), 1e-300) \
                    and abs(kappa_new - kappa) <= 1e-12:
                break
            if self.max_grad_norm is None:
                break  # P and κ do not depend on the weights: one solve is exact
            prev, kappa = flatw, kappa_new
        stats["fixed_point_iters"] = iters
        stats["clip_factor"] = kappa
        return weights, stats, {n: kappa * v for n, v in gn.items()}

    def _aware_weights(self, Ks: dict, rs: dict, ggs: dict, nb: int, B: int, names: list):
        """Combination weights from K̃ w' = r (global: summed over tensors; per_tensor: one
        solve each), w = α/B + w' on retain segments, −(1−α) on the forget segment."""
        a = self.alpha

        def comb(wp):
            w = torch.empty(wp.shape[:-1] + (nb + 1,), dtype=torch.float64, device=wp.device)
            w[..., :nb] = a / B + wp
            w[..., nb] = -(1.0 - a)
            return w

        if self.granularity == "global":
            K = sum(Ks.values())
            r = sum(rs.values())
            gg = torch.tensor(sum(ggs.values()), dtype=torch.float64)
            c, rank, Gr, rr = _solve(K, r, gg, self.rtol, sum(self._numel.values()))
            denom = (_spectral_sq(K) * float(rr)) ** 0.5
            w = comb(c)
            coef_sq, Grn = float(c @ c), float(Gr.norm())
        else:
            Kst = torch.stack([Ks[n] for n in names])
            rst = torch.stack([rs[n] for n in names])
            ggt = torch.tensor([ggs[n] for n in names], dtype=torch.float64)
            caps = torch.tensor([self._numel[n] for n in names])
            c, ranks, Gr_l, rr_l = _solve_batched(Kst, rst, ggt, self.rtol, caps)
            w = dict(zip(names, comb(c).unbind(0)))
            rank, coef_sq, Grn, rr = int(ranks.sum()), float((c * c).sum()), float(Gr_l.sum(0).norm()), rr_l.sum()
            denom = (_spectral_sq(Kst.sum(0)) * float(rr)) ** 0.5
            gg = ggt.sum()
        return w, {
            "rank": int(rank),
            "coef_norm": coef_sq**0.5,
            "solve_orthogonality": Grn / denom if denom > 0 else 0.0,
            "kept": (float(rr) / float(gg)) ** 0.5 if float(gg) > 0 else 0.0,
        }

    def _step_stats(self, grams, X, before, dnorm, weights, steps, why, nb, solved=None, theta_sq=None) -> dict:
        """What the step achieved: measured on the actual Δθ when the per-segment gradients
        are at hand (the optimizer-aware path, or measure=True), else an honest bound.

        step_orthogonality = ‖G·Δθ‖/(‖G‖₂‖Δθ‖) and step_cosine_max = max_i |cos(g_i, Δθ)|
        over the retain per-sample gradients g_i of the moved tensors, Δθ = θ_after − θ_before
        (fp64 products of the fp32 X and Δθ). The bound (no X): the solve's residual, plus
        the combination's rounding u·sqrt(n)·Σ_s|w_s|‖g_s‖/‖d‖ (n the rows summed; a typical
        -error model), plus the rounding of θ − lr·g in the parameters' dtype, u·‖θ‖/‖Δθ‖.
        ``orthogonality`` is the measured value when there is one, else the bound; NaN for a
        step the optimizer model does not cover (unmodelled, or optimizer_aware=False) and
        that is not measured (measure=True or project_step=True measure it).

        dnorm: ‖written gradient‖ (fp64; None when why is set). solved: ``_plain_solve``'s
        (‖G‖₂², per-tensor weights (L, S), Grams (L, S, S); None for global), so that the
        bound needs no second eigen-solve and no loop over the tensors. theta_sq: ‖θ‖² after
        the step (fp64), when the caller has it.
        """
        out = {"optimizer": "unmodelled" if why and why != "optimizer_aware=False" else
               ("not modelled (optimizer_aware=False)" if why else type(self.optimizer).__name__)}
        if X is not None:
            K = sum(grams[n][:nb, :nb] for n, _ in self.named)
            g_norm = torch.diagonal(K).clamp_min(0).sqrt()  # ‖g_i‖
            G2 = _spectral_sq(K) ** 0.5
            out.update(self._step_stats_measured(X, before, K, g_norm, G2, nb))
            if self.alpha > 0:  # measured: the whole step (it descends on purpose); bound: the ascent part
                out.update({k: v for k, v in self._step_stats(grams, None, before, dnorm, weights, steps, why,
                                                              nb, theta_sq=theta_sq).items() if k != "optimizer"})
            else:
                out["orthogonality"] = out["step_orthogonality"]
            return out
        if why is not None:  # a step that is not modelled has no bound from the Grams: unknown
            out["orthogonality"] = float("nan")  # (measure=True or project_step=True measure it)
            return out
        names = [n for n, _ in self.named]
        norm_sq, W, Gst = solved if solved is not None else (None, None, None)
        per_tensor = isinstance(weights, dict)
        if per_tensor:  # one (L, S, S) stack and (L, S) weights, in the moved tensors' order
            if W is None or Gst is None or list(grams) != names:
                Gst = torch.stack([grams[n] for n in names])
                W = torch.stack([weights[n] for n in names])
            W = W.to(Gst.dtype)
        if self.alpha > 0:  # the bound of the ascent part −(1−α)·g_u⊥ (the α part descends on purpose)
            if per_tensor:
                W = W.clone()
                W[:, :nb] -= self.alpha / self._B
            else:
                weights = self._ascent_part(weights, nb)
        u = self._unit_roundoff()
        if per_tensor:
            comb_err = float((W.abs() * torch.diagonal(Gst, dim1=-2, dim2=-1).clamp_min(0).sqrt()).sum())
            GW = (Gst @ W[:, :, None]).squeeze(-1)  # [L, S]: each tensor's Gram times its weights
            Gd, dd = GW[:, :nb].sum(0), float((GW * W).sum())
            if norm_sq is None:
                norm_sq = _spectral_sq(Gst[:, :nb, :nb].sum(0))
        else:
            Kt = sum(grams.values())
            comb_err = float((weights.abs() * torch.diagonal(Kt).clamp_min(0).sqrt()).sum())
            Gd, dd = Kt[:nb] @ weights.to(Kt.dtype), float(weights @ Kt @ weights)
            if norm_sq is None:
                norm_sq = _spectral_sq(Kt[:nb, :nb])
        rows = int(self.engine._step.seg.N) if getattr(self.engine, "_step", None) is not None else 1
        den = (norm_sq * max(dd, 0.0)) ** 0.5
        bound, d_norm = (float(Gd.norm()) / den if den > 0 else 0.0), max(dd, 0.0) ** 0.5
        if d_norm > 0 and dnorm > 0:
            bound += u * math.sqrt(rows) * comb_err / d_norm
            if theta_sq is None:
                with torch.no_grad():
                    theta_sq = float(_norms64([p for _, p in self.named]).square().sum())
            theta = math.sqrt(theta_sq)
            lr = max(float(g["lr"]) for g in self.optimizer.param_groups)
            bound += u * theta / (lr * dnorm) if lr > 0 else 0.0
        out["step_orthogonality_bound"] = bound
        out["orthogonality"] = bound
        return out

    def _unit_roundoff(self) -> float:
        """The largest eps of the moved tensors' dtypes."""
        return max(torch.finfo(p.dtype).eps for _, p in self.named)

    def _project_step(self, grams: dict, X: dict, before: dict, nb: int) -> dict:
        """Project the optimizer's actual step onto the orthogonal complement of the retain
        per-sample gradients: Δθ ← Δθ − Gᵀc with K c = G·Δθ (the rank rule of the solve;
        per_tensor: per tensor), written into the parameters. Adam's step is P(g)⊙m' with
        P depending on the written g itself (at its first step Δθ ≈ −lr·sign(g), so no
        choice of the B coefficients makes it orthogonal in general); projecting the step
        it took is exact whatever the optimizer, and leaves its state (m, v) that of the
        written OrthoGrad gradient. Returns {step_projected: ‖Gᵀc‖/‖Δθ‖}."""
        params = dict(self.named)
        names = [n for n, _ in self.named]
        d = {n: (params[n].detach().double() - before[n].double()).reshape(-1) for n in names}

        def G_dot(n, v):
            Xn, index = X[n]
            return Xn[:nb].to(torch.float64) @ (v if index is None else v[index])

        def Gt(n, c):
            Xn, index = X[n]
            v = c @ Xn[:nb].to(torch.float64)
            if index is None:
                return v
            out = torch.zeros_like(d[n])
            out[index] = v
            return out

        if self.granularity == "global":
            K = sum(grams[n][:nb, :nb] for n in names)
            Gd = sum(G_dot(n, d[n]).to(K.device) for n in names)
            dd = torch.tensor(sum(float((d[n] * d[n]).sum()) for n in names), dtype=torch.float64)
            c = _solve(K, Gd, dd, self.rtol, sum(self._numel.values()))[0]
            corr = {n: Gt(n, c.to(torch.float64)) for n in names}
        else:
            Kst = torch.stack([grams[n][:nb, :nb] for n in names])
            Gd = torch.stack([G_dot(n, d[n]).to(Kst.device) for n in names])
            dd = torch.tensor([float((d[n] * d[n]).sum()) for n in names], dtype=torch.float64)
            caps = torch.tensor([self._numel[n] for n in names])
            cs = _solve_batched(Kst, Gd, dd, self.rtol, caps)[0]
            corr = {n: Gt(n, cs[i].to(torch.float64)) for i, n in enumerate(names)}
        removed = math.sqrt(sum(float((corr[n] * corr[n]).sum()) for n in names))
        total = math.sqrt(sum(float((d[n] * d[n]).sum()) for n in names))
        with torch.no_grad():
            for n in names:
                p = params[n]
                p.copy_((before[n].double().reshape(-1) + d[n] - corr[n]).view(p.shape).to(p.dtype))
        return {"step_projected": removed / total if total > 0 else 0.0}

    def _ascent_part(self, w: torch.Tensor, nb: int) -> torch.Tensor:
        """Combination weights of the ascent part alone (the α/B retain descent removed)."""
        w = w.clone()
        w[:nb] -= self.alpha / self._B
        return w

    def _step_stats_measured(self, X, before, K, g_norm, G2, nb) -> dict:
        """step_orthogonality ‖G·Δθ‖/(‖G‖₂‖Δθ‖) and step_cosine_max of the actual Δθ."""
        out = {}
        GD = torch.zeros(nb, dtype=torch.float64, device=K.device)
        dd = 0.0
        for n, p in self.named:
            d = (p.detach().double() - before[n].double()).reshape(-1)
            dd += float((d * d).sum())
            Xn, index = X[n]
            dn = d if index is None else d[index]
            GD += (Xn[:nb].to(torch.float64) @ dn).to(GD.device)
        dnorm = dd**0.5
        out["step_orthogonality"] = float(GD.norm()) / (G2 * dnorm) if G2 > 0 and dnorm > 0 else 0.0
        den = g_norm * dnorm
        cos = torch.where(den > 0, GD.abs() / den.clamp_min(1e-300), torch.zeros_like(GD))
        out["step_cosine_max"] = float(cos.max()) if cos.numel() else 0.0
        return out
