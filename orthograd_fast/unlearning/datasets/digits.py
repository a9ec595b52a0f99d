"""``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes, inside the wheel).

Images float32 (N, 1, 8, 8), pixels /16; labels int64. Fixed stratified split (seed 0):
1257 train / 180 val / 360 test. Default recipe: MLP with one hidden layer of 128 (9.6k
params), 30 epochs, batch 64, lr 0.05.
"""
from __future__ import annotations

import numpy as np

from . import register
from .base import SPLIT_SEED, Dataset, make_dataset, stratified_holdout


@register("digits", hidden=(128,), epochs=30, batch_size=64, lr=0.05)
def load_digits(*, root=None, train_subset: int | None = None) -> Dataset:
    """scikit-learn's bundled digits: 1257 train / 180 val / 360 test, (1, 8, 8), 10 classes.
    root: unused (bundled data)."""
    from sklearn.datasets import load_digits as _sk_digits

    if train_subset is not None:
        raise ValueError("train_subset applies to fashion-mnist only (digits is already tiny)")
    x, y = _sk_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    rest, test = stratified_holdout(y, 0.2, SPLIT_SEED)
    tr, va = stratified_holdout(y[rest], 180, SPLIT_SEED)
    return make_dataset("digits", x, y, (rest[tr], rest[va], test), 10)
