"""The floor: one ordinary forward/backward over the same rows and an SGD step.

Rows: the retain batch and the forget batch concatenated (what this package's one pass
covers), loss Σ_i ℓ(retain_i) + mean_j ℓ(forget_j). No per-sample information, no
projection: its ``.grad`` is not an OrthoGrad direction (``projects = False``).
"""
from __future__ import annotations

import torch

from .base import Batch, Peer


class PlainPeer(Peer):
    """Plain training step on forget ∪ retain (module doc)."""

    name = "plain"
    projects = False

    def step(self, forget: Batch, retain: Batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        (xf, yf), (xr, yr) = forget, retain
        losses = self.loss_fn(self.model(torch.cat([xr, xf])), torch.cat([yr, yf]))
        B = xr.shape[0]
        (losses[:B].sum() + losses[B:].mean()).backward()
        self.optimizer.step()
