"""``cnn``: two 3x3 convs (``channels``, ReLU, 2x2 max-pool after each) -> Linear."""
from __future__ import annotations

from torch import nn

from . import register


class SmallCNN(nn.Sequential):
    """(N, C, H, W) -> (N, num_classes): conv3x3-ReLU-pool2 twice, then Linear."""

    def __init__(self, input_shape, num_classes: int, channels=(16, 32)):
        c, h, w = input_shape
        c1, c2 = channels
        super().__init__(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), num_classes),
        )


@register("cnn")
def build(cfg, input_shape, num_classes: int) -> nn.Module:
    """A :class:`SmallCNN` with ``cfg.channels``."""
    return SmallCNN(input_shape, num_classes, cfg.channels)
