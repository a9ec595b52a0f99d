"""Models of the unlearning toolkit, one file each, registered by name.

    mlp          Flatten -> [Linear -> ReLU] * len(hidden) -> Linear (``mlp.py``)
    cnn          two 3x3 convs (ReLU, 2x2 max-pool after each) -> Linear (``cnn.py``)
    strided_cnn  two 3x3 stride-2 convs (ReLU after each) -> Linear (``strided_cnn.py``)

A new model is a file here whose builder ``build(cfg: ModelConfig, input_shape,
num_classes) -> nn.Module`` is decorated with :func:`register`, plus its import at the
bottom of this file; the CLI's ``--model`` choices are the registered names.
``transformer.py`` holds ``ClassTokenTransformer``, a ViT-shaped model on pre-embedded
features that the SampleGram tests and benchmark use; it takes (N, T, feat) inputs, not
images, so it is not registered for the image data sets.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: arch "mlp" (hidden widths), "cnn" or "strided_cnn" (channels of the two convs)."""

    arch: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    channels: tuple[int, int] = (16, 32)


REGISTRY: dict[str, Callable[[ModelConfig, tuple, int], nn.Module]] = {}


def register(name: str):
    """Decorator: register ``build(cfg, input_shape, num_classes) -> nn.Module`` as ``name``."""

    def deco(build):
        if name in REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        REGISTRY[name] = build
        return build

    return deco


def names() -> tuple[str, ...]:
    """The registered architectures (the CLI's ``--model`` choices)."""
    return tuple(REGISTRY)


def check_arch(arch: str) -> str:
    """Validate an architecture name (ValueError listing the choices)."""
    if arch not in REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; choose one of {names()}")
    return arch


def build_model(cfg: ModelConfig, input_shape, num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model (init seeded by ``seed``; the global RNG is untouched)."""
    build = REGISTRY[check_arch(cfg.arch)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(cfg, input_shape, num_classes)


from . import mlp, cnn, strided_cnn  # noqa: E402,F401,I001  (the built-in models register here, in this order)
from .cnn import SmallCNN  # noqa: E402
from .mlp import MLP  # noqa: E402
from .strided_cnn import StridedCNN  # noqa: E402
from .transformer import ClassTokenTransformer  # noqa: E402

ARCHS = names()

__all__ = ["ModelConfig", "REGISTRY", "register", "names", "check_arch", "build_model", "ARCHS",
           "MLP", "SmallCNN", "StridedCNN", "ClassTokenTransformer"]
