"""Obviously-correct pure-PyTorch versions of everything the package computes fast.

Used by the tests (the ground truth) and by the benchmarks (the baselines). Nothing here
is tuned: clarity and fp64 first. Three groups:

* per-sample gradients: a batch-size-1 autograd loop and ``torch.func`` (vmap over
  ``functional_call``), both returning ``{param name: (N, *param.shape)}``;
* per-segment Grams built from those (what ``SampleGram`` must reproduce);
* projections: fp64 SVD of the row-normalised G with the numerical-rank rule of
  DESIGN.md §3 (``project_svd``), Householder QR as the authors use it (``project_qr``),
  and the authors' whole OrthoGrad direction (``authors_orthograd_direction``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------
# per-sample gradients
# --------------------------------------------------------------------------------------
def _named_trainable(model: nn.Module, params: Sequence[nn.Parameter] | None):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    wanted = {id(p) for p in params}
    return [(n, p) for n, p in model.named_parameters() if id(p) in wanted]


def per_sample_grads_loop(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Sequence[nn.Parameter] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients by N separate backward passes of batch size 1.

    inputs: (N, ...), targets: (N, ...). ``loss_fn(model(x_i[None]), y_i[None])`` is the
    loss of sample i. Returns {name: (N, *p.shape)} for the trainable (or given) params.
    """
    named = _named_trainable(model, params)
    n = inputs.shape[0]
    out = {name: torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) for name, p in named}
    tensors = [p for _, p in named]
    for i in range(n):
        loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1])
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for (name, _), gr in zip(named, grads):
            if gr is not None:
                out[name][i] = gr
    return out


def per_sample_grads_vmap(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Sequence[nn.Parameter] | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients with ``torch.func.vmap(grad(...))`` over ``functional_call``.

    The authors' route: materialises the full (N, P) set of gradients. Same contract as
    :func:`per_sample_grads_loop`. Frozen parameters are passed as constants.
    """
    from torch.func import functional_call, grad, vmap

    named = _named_trainable(model, params)
    trainable = {n: p.detach() for n, p in named}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in trainable}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(tr, x, y):
        out = functional_call(model, ({**tr, **frozen}, buffers), (x[None],))
        return loss_fn(out, y[None])

    return vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(
        trainable, inputs, targets
    )


def segment_grads(
    per_sample: dict[str, torch.Tensor], segments: torch.Tensor, num_segments: int
) -> dict[str, torch.Tensor]:
    """Sum per-row gradients into per-segment gradients; rows with segment -1 are dropped.

    per_sample: {name: (N, *shape)}; segments: (N,) int64 in [-1, S). Returns {name: (S, *shape)}.
    """
    out = {}
    keep = segments >= 0
    for name, g in per_sample.items():
        acc = torch.zeros((num_segments, *g.shape[1:]), dtype=g.dtype, device=g.device)
        acc.index_add_(0, segments[keep].to(g.device), g[keep])
        out[name] = acc
    return out


def gram_from_grads(grads: dict[str, torch.Tensor], per_tensor: bool = False):
    """fp64 Gram of per-segment gradients {name: (S, *shape)}: (S, S), or {name: (S, S)}."""
    grams = {}
    for name, g in grads.items():
        flat = g.reshape(g.shape[0], -1).double()
        grams[name] = flat @ flat.T
    if per_tensor:
        return grams
    return sum(grams.values())


# --------------------------------------------------------------------------------------
# projections
# --------------------------------------------------------------------------------------
def _as_lists(g, G):
    if isinstance(g, torch.Tensor):
        return [g], [G], True
    return list(g), list(G), False


def project_svd(g, G, rtol: float, return_rank: bool = False):
    """g minus its orthogonal projection onto span(rows of G), computed in fp64 by SVD.

    g: tensor of shape S (or a sequence of tensors), G: (B, *S) (or a matching sequence,
    projected jointly as one concatenated vector). Zero rows are dropped, the rest are
    normalised to unit length, and right singular vectors with sigma_k > rtol * sigma_max
    span the subspace removed (DESIGN.md §3). Returns g's structure in fp64 (and the rank).
    """
    gs, Gs, single = _as_lists(g, G)
    b = Gs[0].shape[0]
    flat_g = torch.cat([x.reshape(-1).double() for x in gs])
    flat_G = torch.cat([x.reshape(b, -1).double() for x in Gs], dim=1)
    norms = flat_G.norm(dim=1)
    rows = flat_G[norms > 0] / norms[norms > 0, None]
    rank = 0
    r = flat_g.clone()
    if rows.shape[0] > 0:
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        rank = int((s > rtol * s[0]).sum())
        q = vh[:rank].T  # [P, rank], orthonormal
        r = flat_g - q @ (q.T @ flat_g)
    out, start = [], 0
    for x in gs:
        out.append(r[start : start + x.numel()].reshape(x.shape))
        start += x.numel()
    result = out[0] if single else out
    return (result, rank) if return_rank else result


def project_qr(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The authors' projection: reduced Householder QR of Gᵀ, then g - Q(Qᵀg), no rank rule.

    g: (*S), G: (B, *S); computed in g's dtype (the authors use fp32).
    """
    b = G.shape[0]
    if b == 0:
        return g.clone()
    q, _ = torch.linalg.qr(G.reshape(b, -1).T)  # [P, min(P, B)]
    flat = g.reshape(-1)
    return (flat - q @ (q.T @ flat)).reshape(g.shape)


def orthogonality(r, G) -> float:
    """‖G r‖ / (‖G‖₂ ‖r‖) in fp64: 0 for an exactly orthogonal r (r, G as in project_svd)."""
    rs, Gs, _ = _as_lists(r, G)
    b = Gs[0].shape[0]
    flat_r = torch.cat([x.reshape(-1).double() for x in rs])
    flat_G = torch.cat([x.reshape(b, -1).double() for x in Gs], dim=1)
    denom = torch.linalg.matrix_norm(flat_G, ord=2) * flat_r.norm()
    if denom == 0:
        return 0.0
    return float((flat_G @ flat_r).norm() / denom)


def authors_orthograd_direction(
    model: nn.Module,
    loss_fn: LossFn,
    forget_inputs: torch.Tensor,
    forget_targets: torch.Tensor,
    retain_inputs: torch.Tensor,
    retain_targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The authors' OrthoGrad direction (to be ascended), as their code computes it.

    g_u = grad of the mean forget loss; per-sample retain gradients by vmap (a (B, P)
    buffer); each parameter tensor projected on its own with ``torch.linalg.qr``.
    Returns {name: g_u⊥ restricted to that tensor}.
    """
    named = _named_trainable(model, None)
    loss = loss_fn(model(forget_inputs), forget_targets)
    g_u = torch.autograd.grad(loss, [p for _, p in named])
    per_sample = per_sample_grads_vmap(model, loss_fn, retain_inputs, retain_targets)
    return {name: project_qr(gu, per_sample[name]) for (name, _), gu in zip(named, g_u)}


def per_sample_grads_rows(
    model: nn.Module,
    row_loss: Callable[[object, dict], torch.Tensor],
    batch: dict,
    call: Callable[[nn.Module, dict], object] | None = None,
    params: Sequence[nn.Parameter] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample gradients by N backward passes of batch size 1, for models that take
    several keyword tensors (Hugging Face style).

    batch: {key: (N, ...)}, every tensor with the N rows in dim 0. Row i is run alone as
    ``call(model, {k: v[i:i+1]})`` (default ``model(**row)``) and
    ``row_loss(output, row)`` -> (1,) (or a scalar) is its loss. Returns
    ({name: (N, *p.shape)} for the trainable (or given) params, the (N,) row losses), so a
    caller can check that each row alone gives the loss it has in the batch (padding and
    attention masks must make rows independent for per-sample gradients to exist).
    """
    named = _named_trainable(model, params)
    n = next(iter(batch.values())).shape[0]
    call = call or (lambda m, row: m(**row))
    out = {name: torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) for name, p in named}
    losses = []
    tensors = [p for _, p in named]
    for i in range(n):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        loss = row_loss(call(model, row), row).sum()
        losses.append(loss.detach())
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for (name, _), gr in zip(named, grads):
            if gr is not None:
                out[name][i] = gr
    return out, torch.stack(losses)
