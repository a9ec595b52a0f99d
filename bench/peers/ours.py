"""This package: ``orthograd_fast.OrthoGrad.step`` (SampleGram + fp64 solve + one combination).

One forward/backward over forget ∪ retain recorded by the per-sample Gram engine, the
(B+1) x (B+1) segment Gram per tensor (or global), c = K⁺b in fp64 with the package's
rank rule, and the update Σ_s w_s g_s written into ``.grad`` by one GEMM per layer; no
(B, P) buffer. ``make_ours`` is the single adapter: everything the benchmark knows about
the package goes through it.
"""
from __future__ import annotations

from .base import Batch, Peer


class OursPeer(Peer):
    """``OrthoGrad(model, SGD, granularity, alpha=0, backend)`` (module doc)."""

    name = "ours"

    def __init__(self, model, *, backend: str = "torch", **kw):
        super().__init__(model, **kw)
        from orthograd_fast.orthograd import OrthoGrad

        self.orthograd = OrthoGrad(
            model, self.optimizer, loss_fn=self.loss_fn, granularity=self.granularity, alpha=0.0, backend=backend
        )
        self.stats: dict = {}

    def step(self, forget: Batch, retain: Batch) -> None:
        self.stats = self.orthograd.step(forget, retain)

    def close(self) -> None:
        self.orthograd.close()


def make_ours(model, **kw) -> OursPeer:
    """The one adapter for this package (kw: loss_fn, granularity, lr, backend)."""
    return OursPeer(model, **kw)
