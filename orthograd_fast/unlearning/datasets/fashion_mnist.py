"""``fashion-mnist``: the 60k + 10k 28x28 images of Debian's ``dataset-fashion-mnist``.

IDX gz files under ``/usr/share/datasets/fashion-mnist`` (``make data`` installs the
package). Images float32 (N, 1, 28, 28), standardised with the train mean/std; labels
int64. Fixed stratified split (seed 0): 55000 train / 5000 val (held out of the original
train file) / 10000 test. Default recipe: MLP with one hidden layer of 256 (203k params),
4 epochs, batch 128, lr 0.05.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from . import register
from .base import SPLIT_SEED, Dataset, make_dataset, stratified_holdout

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def read_idx(path: Path) -> np.ndarray:
    """Read one gzip'd IDX file (magic 2049: labels, 2051: images) as uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic == 2049:
        n = int.from_bytes(raw[4:8], "big")
        arr = np.frombuffer(raw, dtype=np.uint8, offset=8)
        shape = (n,)
    elif magic == 2051:
        n, h, w = (int.from_bytes(raw[o : o + 4], "big") for o in (4, 8, 12))
        arr = np.frombuffer(raw, dtype=np.uint8, offset=16)
        shape = (n, h, w)
    else:
        raise ValueError(f"{path} is not an IDX label/image file (magic number {magic})")
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


@register("fashion-mnist", aliases=("fashion_mnist", "fmnist"), hidden=(256,), epochs=4, batch_size=128, lr=0.05)
def load_fashion_mnist(root: str | os.PathLike | None = None, train_subset: int | None = None) -> Dataset:
    """Fashion-MNIST from Debian's IDX files: 55000 train / 5000 val / 10000 test, (1, 28, 28).

    root: folder with the four ``*-ubyte.gz`` files (default /usr/share/datasets/fashion-mnist).
    train_subset: keep a stratified subset of this many training images (fixed seed) for
    quick runs; val and test are unchanged.
    """
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    names = {
        "xtr": "train-images-idx3-ubyte.gz", "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz", "yte": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {', '.join(missing)} missing in {root}. Run `make data` "
            "(installs the Debian package dataset-fashion-mnist), or pass the folder holding "
            "the IDX files."
        )
    xtr, ytr, xte, yte = (read_idx(root / names[k]) for k in ("xtr", "ytr", "xte", "yte"))
    x = np.concatenate([xtr, xte]).astype(np.float32) / 255.0
    y = np.concatenate([ytr, yte]).astype(np.int64)
    n_train = len(ytr)
    tr, va = stratified_holdout(y[:n_train], 5000, SPLIT_SEED)
    if train_subset is not None:
        if not 0 < train_subset <= len(tr):
            raise ValueError(f"train_subset must be in [1, {len(tr)}], got {train_subset}")
        if train_subset < len(tr):
            _, keep = stratified_holdout(y[tr], train_subset, SPLIT_SEED)
            tr = tr[keep]
    mean, std = float(x[tr].mean()), float(x[tr].std())
    x = ((x - mean) / std)[:, None]
    te = np.arange(n_train, len(y))
    name = "fashion-mnist" if train_subset is None else f"fashion-mnist[{train_subset}]"
    return make_dataset(name, x, y, (tr, va, te), 10)
