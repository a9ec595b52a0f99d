"""``mlp``: Flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

Digits default hidden (128,) (9.6k params); Fashion-MNIST (256,) (203k params).
"""
from __future__ import annotations

import numpy as np
from torch import nn

from . import register


class MLP(nn.Sequential):
    """(N, *input_shape) -> (N, num_classes) logits."""

    def __init__(self, input_shape, num_classes: int, hidden=(128,)):
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(np.prod(input_shape))
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


@register("mlp")
def build(cfg, input_shape, num_classes: int) -> nn.Module:
    """An :class:`MLP` with ``cfg.hidden`` widths."""
    return MLP(input_shape, num_classes, cfg.hidden)
