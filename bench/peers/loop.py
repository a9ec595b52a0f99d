"""The naive path: per-sample retain gradients by B backward passes of batch size 1.

Each retain sample's gradient is copied into a preallocated (B, *shape) buffer per
parameter (the same B x P memory as the authors' vmap), then the authors' per-tensor QR.
"""
from __future__ import annotations

import torch

from .base import Batch, Peer


class LoopPeer(Peer):
    """Batch-size-1 autograd loop + per-tensor Householder QR (module doc)."""

    name = "loop"

    def step(self, forget: Batch, retain: Batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        g_u = self.forget_grad(forget)
        x, y = retain
        B = x.shape[0]
        per_sample = [torch.empty((B, *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        for i in range(B):
            loss = self.loss_fn(self.model(x[i : i + 1]), y[i : i + 1]).sum()
            for buf, g in zip(per_sample, torch.autograd.grad(loss, self.params, allow_unused=True)):
                if g is None:
                    buf[i].zero_()
                else:
                    buf[i].copy_(g)
        self.apply(g_u, per_sample)
