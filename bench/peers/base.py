"""What every peer adapter shares: the step contract, the authors' projection, errors.

A peer is one way a user could run an OrthoGrad step (DESIGN.md §1, alpha = 0):

    g_u   = grad of the mean forget loss                         (forget batch, F rows)
    g_i   = grad of retain sample i's loss, i = 1..B              (per-sample information)
    g_u⊥  = g_u minus its projection on span{g_i}                 ("per_tensor": per tensor)
    .grad = -g_u⊥, then ``optimizer.step()`` (SGD), i.e. projected ascent

``Peer.step(forget, retain)`` does all of it; afterwards every trainable parameter's
``.grad`` holds the direction that was applied, which is how the benchmark and the test
read each peer's result. ``plain`` is the exception: an ordinary forward/backward of the
same rows (no projection), the floor every OrthoGrad implementation is measured against.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from orthograd_fast.reference import project_qr

GRANULARITIES = ("per_tensor", "global")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


class Unsupported(RuntimeError):
    """This peer cannot run this workload; reported, never skipped.

    reason: the full explanation; short: a few words for a table cell (default: reason).
    """

    def __init__(self, reason: str, short: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.short = short or reason


class Peer:
    """One OrthoGrad-step implementation on its own copy of the model.

    model: the network (the adapter may wrap or hook it); loss_fn(logits, targets) -> (N,)
    per-sample losses; granularity: "per_tensor" (the authors' code) or "global";
    lr: SGD learning rate of the update. Subclasses implement :meth:`step`.
    """

    name = "peer"
    projects = True  # False for the plain floor: its .grad is not an OrthoGrad direction

    def __init__(self, model: nn.Module, *, loss_fn: LossFn, granularity: str = "per_tensor", lr: float = 1e-3):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.granularity = granularity
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.optimizer = torch.optim.SGD(self.params, lr=lr)

    def step(self, forget: Batch, retain: Batch) -> None:
        """One full step: per-sample retain information, projection, update."""
        raise NotImplementedError

    def direction(self) -> dict[str, torch.Tensor]:
        """{param name: .grad} as left by the last step (the applied direction)."""
        return {n: p.grad.detach().clone() for n, p in self.named}

    def close(self) -> None:
        """Remove hooks or wrappers (default: nothing to undo)."""

    # helpers ---------------------------------------------------------------------------
    def forget_grad(self, forget: Batch, model: nn.Module | None = None) -> list[torch.Tensor]:
        """g_u: the gradient of the mean forget loss, one tensor per trainable parameter."""
        x, y = forget
        loss = self.loss_fn((model or self.model)(x), y).mean()
        return list(torch.autograd.grad(loss, self.params))

    def apply(self, g_u: Sequence[torch.Tensor], per_sample: Sequence[torch.Tensor]) -> None:
        """Project g_u against the per-sample rows with the authors' QR, write -g_u⊥, step.

        g_u: one tensor per parameter (shape of the parameter); per_sample: (B, *shape)
        per parameter. Writes ``.grad`` and calls the optimizer.
        """
        for p, r in zip(self.params, project_authors(g_u, per_sample, self.granularity)):
            p.grad = r.neg_()
        self.optimizer.step()


def project_authors(g_u: Sequence[torch.Tensor], per_sample: Sequence[torch.Tensor], granularity: str) -> list[torch.Tensor]:
    """g_u⊥ by reduced Householder QR (``reference.project_qr``, no rank rule), per tensor
    or on the concatenated vector. g_u: [shape_t]; per_sample: [(B, *shape_t)]."""
    if granularity == "per_tensor":
        return [project_qr(g, G) for g, G in zip(g_u, per_sample)]
    B = per_sample[0].shape[0]
    flat = project_qr(torch.cat([g.reshape(-1) for g in g_u]), torch.cat([G.reshape(B, -1) for G in per_sample], 1))
    return [r.view_as(g) for r, g in zip(flat.split([g.numel() for g in g_u]), g_u)]
