"""Module modes for an OrthoGrad step: every module in eval mode, each module's own mode back after.

OrthoGrad needs rows that are independent and deterministic: the per-sample retain
gradients it projects against must be the gradients of the model the user deploys, one
row at a time. Train mode breaks both:

* BatchNorm normalises each row with statistics of the whole batch, so a row's loss
  depends on the other rows (the engine refuses it), and it updates its running
  statistics with forget rows;
* Dropout (``nn.Dropout*`` modules, and the attention dropout that ``nn.MultiheadAttention``
  and Hugging Face attention layers apply when their own ``training`` flag is set) makes the
  retain gradients those of one random sub-network: a step orthogonal to them is not
  orthogonal to the deployed model's (measured in issue 9: cosine 5.7e-2 in train mode,
  5e-8 in eval mode).

``eval_modes(model)`` sets ``training = False`` on every submodule (``model.eval()``) for the
duration of the block and then writes back each module's own flag, so a model with mixed
modes (say BatchNorm frozen in eval inside a model in train mode) comes back exactly as it
was. Flags are written back as attributes, not through ``train()``, which would recurse
into children and overwrite their flags.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, training flag) for every module of ``model`` (``model`` included)."""
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Write back the flags of :func:`module_modes`."""
    for m, flag in modes:
        m.training = flag


@contextmanager
def eval_modes(model: nn.Module, enabled: bool = True):
    """Every module of ``model`` in eval mode inside the block, each module's flag restored
    after (also on an exception). ``enabled=False``: the modes are left as they are."""
    if not enabled:
        yield
        return
    modes = module_modes(model)
    model.eval()
    try:
        yield
    finally:
        restore_modes(modes)
