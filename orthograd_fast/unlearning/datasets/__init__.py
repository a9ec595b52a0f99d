"""Data sets of the unlearning toolkit, one file each, registered by name (all offline).

    digits          scikit-learn's bundled 8x8 digits (``digits.py``)
    fashion-mnist   Debian's dataset-fashion-mnist, ``make data`` (``fashion_mnist.py``)

A new data set is a file here whose loader ``load(root=None, train_subset=None) ->
Dataset`` (``base.Dataset``) is decorated with :func:`register`, plus its import at the
bottom of this file; the CLI's ``--data`` accepts every registered name. The keyword
options of ``register`` are the default training recipe of the data set's original
model (``training.default_configs``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .base import Dataset


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set: its loader, other accepted names, and default recipe
    (ModelConfig / TrainConfig field overrides)."""

    name: str
    load: Callable[..., Dataset]
    aliases: tuple[str, ...] = ()
    recipe: dict = field(default_factory=dict)


REGISTRY: dict[str, DatasetEntry] = {}


def register(name: str, *, aliases: tuple[str, ...] = (), **recipe):
    """Decorator: register ``load(root=None, train_subset=None) -> Dataset`` as ``name``."""

    def deco(load):
        if name in REGISTRY:
            raise ValueError(f"data set {name!r} is registered twice")
        REGISTRY[name] = DatasetEntry(name, load, tuple(aliases), dict(recipe))
        return load

    return deco


def names() -> tuple[str, ...]:
    """The registered data set names (the CLI's ``--data`` choices)."""
    return tuple(REGISTRY)


def entry(name: str) -> DatasetEntry:
    """The registry entry of ``name`` or one of its aliases (ValueError listing the choices)."""
    for e in REGISTRY.values():
        if name == e.name or name in e.aliases:
            return e
    raise ValueError(f"unknown dataset {name!r}; choose one of {names()}")


def load_dataset(name: str, *, root=None, train_subset: int | None = None) -> Dataset:
    """Load the registered data set ``name`` (see its file for what it holds)."""
    return entry(name).load(root=root, train_subset=train_subset)


from . import digits, fashion_mnist  # noqa: E402,F401  (the built-in data sets register here)
from .digits import load_digits  # noqa: E402
from .fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist  # noqa: E402

__all__ = ["Dataset", "DatasetEntry", "REGISTRY", "register", "names", "entry", "load_dataset",
           "load_digits", "load_fashion_mnist", "FASHION_MNIST_DIR"]
