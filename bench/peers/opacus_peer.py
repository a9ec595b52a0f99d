"""Opacus ``GradSampleModule`` (hooks) for the per-sample retain gradients.

g_u by an ordinary backward with the hooks disabled; the retain batch's summed loss is
backpropagated with the hooks on (``loss_reduction="sum"``: ``p.grad_sample[i]`` is
sample i's gradient, a (B, *shape) tensor per parameter, the B x P buffer); then the
authors' per-tensor QR (``base.project_authors``). Layers without an Opacus grad sampler
go through Opacus's own functorch fallback; where even that cannot run (e.g.
``nn.MultiheadAttention``, called with three inputs) the peer is :class:`Unsupported`.
"""
from __future__ import annotations

import warnings

from .base import Batch, Peer, Unsupported


class OpacusPeer(Peer):
    """GradSampleModule hooks + per-tensor Householder QR (module doc)."""

    name = "opacus"

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        try:
            from opacus import GradSampleModule
        except ImportError as e:
            raise Unsupported(f"opacus is not installed here ({e})", "not installed") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
            except Exception as e:  # Opacus's validator names the offending module
                raise Unsupported(
                    f"Opacus GradSampleModule refuses the model: {type(e).__name__}: {e}", "refused by GradSampleModule"
                ) from None

    def step(self, forget: Batch, retain: Batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.gsm.disable_hooks()
        try:
            g_u = self.forget_grad(forget, self.gsm)
        finally:
            self.gsm.enable_hooks()
        x, y = retain
        try:
            self.loss_fn(self.gsm(x), y).sum().backward()
        except Exception as e:
            self._clear()
            raise Unsupported(
                f"Opacus hooks cannot compute per-sample gradients here: {type(e).__name__}: {e}",
                f"Opacus hooks fail on{_culprit(self.gsm)} ({type(e).__name__})",
            ) from None
        missing = [n for n, p in self.named if getattr(p, "grad_sample", None) is None]
        if missing:
            self._clear()
            raise Unsupported(
                f"Opacus left no grad_sample for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}",
                f"no per-sample gradient for {len(missing)} tensors",
            )
        per_sample = [p.grad_sample for p in self.params]
        self._clear()
        self.apply(g_u, per_sample)

    def _clear(self) -> None:
        for p in self.params:
            p.grad_sample = None
        for m in self.gsm.modules():
            if hasattr(m, "activations"):
                m.activations = []

    def close(self) -> None:
        self._clear()
        self.gsm._close()


def _culprit(gsm) -> str:
    """' <module types>' of the modules with parameters that no Opacus grad sampler covers."""
    covered = tuple(gsm.GRAD_SAMPLERS)
    kinds = sorted({type(m).__name__ for m in gsm._module.modules()
                    if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, covered)})
    return f" {', '.join(kinds)}" if kinds else " this model"
