"""The authors' OrthoGrad path (``notes/paper.md``): the reference implementation a user copies.

g_u by an ordinary backward of the mean forget loss; per-sample retain gradients by
``torch.func.vmap(grad(...))`` over ``functional_call`` (a (B, P) buffer of fp32
gradients); each parameter tensor projected with reduced ``torch.linalg.qr`` and no rank
rule (``base.project_authors``).
"""
from __future__ import annotations

from torch.func import functional_call, grad, vmap

from .base import Batch, Peer


class AuthorsPeer(Peer):
    """vmap per-sample gradients + per-tensor Householder QR (module doc)."""

    name = "authors"

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        names = [n for n, _ in self.named]
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        def sample_loss(params, x, y):
            out = functional_call(model, ({**params, **frozen}, buffers), (x[None],))
            return self.loss_fn(out, y[None]).sum()

        self._names = names
        self._per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step(self, forget: Batch, retain: Batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        g_u = self.forget_grad(forget)
        params = {n: p.detach() for n, p in self.named}
        per_sample = self._per_sample(params, *retain)  # {name: (B, *shape)}: the B x P buffer
        self.apply(g_u, [per_sample[n] for n in self._names])
