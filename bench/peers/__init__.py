"""Peer adapters for the OrthoGrad-step benchmark: one module per way to run a step.

``make_peer(name, model, loss_fn=..., granularity=..., lr=...)`` builds one; it raises
:class:`Unsupported` (with the reason) when that peer cannot run the model or is not
installed. Peers:

* ``ours``     this package, ``OrthoGrad.step`` (``ours.make_ours``, the only adapter)
* ``authors``  torch.func vmap per-sample gradients + per-tensor torch.linalg.qr
* ``opacus``   Opacus GradSampleModule hooks + the same QR
* ``backpack`` BackPACK BatchGrad + the same QR
* ``loop``     batch-size-1 backward loop + the same QR
* ``plain``    an ordinary forward/backward on the same rows: the floor (no projection)

``peers.check`` holds the fp64 reference every peer's step is checked against before the
benchmark reports its time.
"""
from __future__ import annotations

from .base import GRANULARITIES, Peer, Unsupported, project_authors

PEERS = ("ours", "authors", "opacus", "backpack", "loop", "plain")


def make_peer(name: str, model, **kw) -> Peer:
    """Build peer ``name`` on ``model`` (kw: loss_fn, granularity, lr; ``ours``: backend)."""
    if name == "ours":
        from .ours import make_ours

        return make_ours(model, **kw)
    kw.pop("backend", None)
    if name == "authors":
        from .authors import AuthorsPeer as cls
    elif name == "opacus":
        from .opacus_peer import OpacusPeer as cls
    elif name == "backpack":
        from .backpack_peer import BackpackPeer as cls
    elif name == "loop":
        from .loop import LoopPeer as cls
    elif name == "plain":
        from .plain import PlainPeer as cls
    else:
        raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
    return cls(model, **kw)


__all__ = ["GRANULARITIES", "PEERS", "Peer", "Unsupported", "make_peer", "project_authors"]
