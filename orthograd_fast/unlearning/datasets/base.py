"""The in-memory dataset every toolkit data set loads into, and the helpers its loaders share.

A data set is one file in this folder that registers a loader by name
(``datasets.register``); the loader returns a :class:`Dataset` with a fixed
train/val/test split. The val set is never trained on; the unlearning loop may use it
for its stopping rules, the test set is for reporting only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0  # every built-in data set splits train/val/test with this seed


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/val/test image classification dataset held in memory.

    x_*: float32 (N, C, H, W); y_*: int64 (N,); fingerprint: short hash identifying the
    exact data (used in model cache keys).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    fingerprint: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, val={len(self.y_val)}, "
            f"test={len(self.y_test)}, input={self.input_shape}, classes={self.num_classes})"
        )


def fingerprint(*arrays: np.ndarray) -> str:
    """Short sha256 of the arrays' shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def stratified_holdout(y: np.ndarray, fraction_or_count, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) index arrays, held-out stratified by class."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    kept, held = train_test_split(idx, test_size=fraction_or_count, stratify=y, random_state=seed)
    return np.sort(kept), np.sort(held)


def make_dataset(name, x, y, splits, num_classes) -> Dataset:
    """A :class:`Dataset` from arrays x (N, ...), y (N,) and (train, val, test) index arrays."""
    tr, va, te = splits
    fp = fingerprint(x[tr], y[tr], x[va], x[te])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Dataset(
        name, t(x[tr]), t(y[tr]), t(x[va]), t(y[va]), t(x[te]), t(y[te]), num_classes, fp
    )
