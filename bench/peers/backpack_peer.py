"""BackPACK ``BatchGrad`` for the per-sample retain gradients.

The model is ``extend``-ed in place; g_u by an ordinary backward (outside any
``backpack`` context, so no extension runs); the retain batch's summed loss is
backpropagated under ``with backpack(BatchGrad())``, leaving ``p.grad_batch`` (B, *shape)
per parameter (the B x P buffer); then the authors' per-tensor QR. A parameter that gets
no ``grad_batch`` (a module BackPACK has no extension for: ``nn.MultiheadAttention``,
``nn.LayerNorm`` in 1.7) makes the peer :class:`Unsupported`, naming those modules.
"""
from __future__ import annotations

import re
import warnings

from .base import Batch, Peer, Unsupported

# module types named in the short reason (containers that merely hold parameters of
# unsupported children are left to the long one)
_LEAF_KINDS = {"MultiheadAttention", "LayerNorm", "GroupNorm", "Embedding", "LSTM", "GRU", "RNN"}


class BackpackPeer(Peer):
    """BackPACK BatchGrad + per-tensor Householder QR (module doc)."""

    name = "backpack"

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchGrad
        except ImportError as e:
            raise Unsupported(f"backpack-for-pytorch is not installed here ({e})", "not installed") from None
        self._ctx, self._ext = backpack, BatchGrad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extend(model)

    def step(self, forget: Batch, retain: Batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        g_u = self.forget_grad(forget)
        x, y = retain
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self._ctx(self._ext()):
                self.loss_fn(self.model(x), y).sum().backward()
        missing = [n for n, p in self.named if getattr(p, "grad_batch", None) is None]
        if missing:
            self._clear()
            kinds = sorted({m.group(1).rsplit(".", 1)[-1] for w in caught
                            if (m := re.search(r"extension for Module <class '([^']+)'>", str(w.message)))})
            leaves = [k for k in kinds if k in _LEAF_KINDS] or kinds
            raise Unsupported(
                f"BackPACK BatchGrad has no extension for {', '.join(kinds) or 'some modules'}: "
                f"{len(missing)} of {len(self.named)} parameter tensors get no per-sample gradient",
                f"no BatchGrad extension for {', '.join(leaves) or 'some modules'}",
            )
        per_sample = [p.grad_batch for p in self.params]
        self._clear()
        self.apply(g_u, per_sample)

    def _clear(self) -> None:
        for p in self.params:
            if hasattr(p, "grad_batch"):
                del p.grad_batch
