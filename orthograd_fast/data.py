"""Datasets and forgetting splits for the unlearning toolkit (all offline).

Datasets (images as float32 (N, 1, H, W), labels int64 (N,)):

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes, inside the
  wheel). Pixels /16. Fixed stratified split (seed 0): 1257 train / 180 val / 360 test.
* ``fashion-mnist``: the 60k + 10k 28x28 images of Debian's ``dataset-fashion-mnist``
  (IDX gz files under ``/usr/share/datasets/fashion-mnist``; ``make data`` installs it).
  Pixels standardised with the train mean/std. Fixed stratified split (seed 0): 55000
  train / 5000 val (held out of the original train file) / 10000 test.

The val set is never trained on; the unlearning loop may use it for its stopping rules,
the test set is for reporting only.

Forgetting (``--forget``): ``class:K`` or ``class:K1,K2`` forgets every training sample
of those classes; ``random:F`` forgets a random fraction F in (0, 1) of the training set,
``random:N`` N random samples. D_f = forget set, D_r = the rest of the training set, and
the methods see a *retain subset* of D_r of a chosen size (the paper's small retain set),
drawn with the split's seed.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_SPLIT_SEED = 0


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


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _stratified_holdout(y: np.ndarray, fraction_or_count, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) index arrays, held-out stratified by class."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    kept, held = train_test_split(idx, test_size=fraction_or_count, stratify=y, random_state=seed)
    return np.sort(kept), np.sort(held)


def _make(name, x, y, splits, num_classes) -> Dataset:
    tr, va, te = splits
    fp = _fingerprint(x[tr], y[tr], x[va], x[te])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Dataset(
        name, t(x[tr]), t(y[tr]), t(x[va]), t(y[va]), t(x[te]), t(y[te]), num_classes, fp
    )


def load_digits() -> Dataset:
    """scikit-learn's bundled digits: 1257 train / 180 val / 360 test, (1, 8, 8), 10 classes."""
    from sklearn.datasets import load_digits as _sk_digits

    x, y = _sk_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    rest, test = _stratified_holdout(y, 0.2, _SPLIT_SEED)
    tr, va = _stratified_holdout(y[rest], 180, _SPLIT_SEED)
    return _make("digits", x, y, (rest[tr], rest[va], test), 10)


def _read_idx(path: Path) -> np.ndarray:
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
    xtr, ytr, xte, yte = (_read_idx(root / names[k]) for k in ("xtr", "ytr", "xte", "yte"))
    x = np.concatenate([xtr, xte]).astype(np.float32) / 255.0
    y = np.concatenate([ytr, yte]).astype(np.int64)
    n_train = len(ytr)
    tr, va = _stratified_holdout(y[:n_train], 5000, _SPLIT_SEED)
    if train_subset is not None:
        if not 0 < train_subset <= len(tr):
            raise ValueError(f"train_subset must be in [1, {len(tr)}], got {train_subset}")
        if train_subset < len(tr):
            _, keep = _stratified_holdout(y[tr], train_subset, _SPLIT_SEED)
            tr = tr[keep]
    mean, std = float(x[tr].mean()), float(x[tr].std())
    x = ((x - mean) / std)[:, None]
    te = np.arange(n_train, len(y))
    name = "fashion-mnist" if train_subset is None else f"fashion-mnist[{train_subset}]"
    return _make(name, x, y, (tr, va, te), 10)


def load_dataset(name: str, *, root=None, train_subset: int | None = None) -> Dataset:
    """Load ``digits`` or ``fashion-mnist`` (see the module doc)."""
    if name == "digits":
        if train_subset is not None:
            raise ValueError("train_subset applies to fashion-mnist only (digits is already tiny)")
        return load_digits()
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(root, train_subset)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


# --------------------------------------------------------------------------------------
# forgetting splits
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForgetSpec:
    """What to forget: ``kind`` "class" (``classes``) or "random" (``fraction`` or ``count``)."""

    kind: str
    classes: tuple[int, ...] = ()
    fraction: float | None = None
    count: int | None = None

    def __str__(self) -> str:
        if self.kind == "class":
            return "class:" + ",".join(map(str, self.classes))
        return f"random:{self.fraction if self.fraction is not None else self.count}"


def parse_forget(spec: str | ForgetSpec) -> ForgetSpec:
    """Parse ``class:3``, ``class:3,5``, ``random:0.1`` (fraction) or ``random:100`` (count)."""
    if isinstance(spec, ForgetSpec):
        return spec
    usage = f"forget spec must look like 'class:3', 'class:3,5', 'random:0.1' or 'random:100', got {spec!r}"
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(usage)
    kind, _, arg = spec.partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind == "class":
        try:
            classes = tuple(sorted({int(c) for c in arg.split(",")}))
        except ValueError:
            raise ValueError(usage) from None
        return ForgetSpec("class", classes=classes)
    if kind == "random":
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(usage) from None
        if value.is_integer() and "." not in arg:
            if value <= 0:
                raise ValueError(f"random forget count must be positive, got {arg}: the forget set would be empty")
            return ForgetSpec("random", count=int(value))
        if not 0 < value < 1:
            raise ValueError(f"random forget fraction must be in (0, 1), got {arg}")
        return ForgetSpec("random", fraction=value)
    raise ValueError(usage)


@dataclass(frozen=True, eq=False)
class Split:
    """One forgetting split of a dataset (index arrays into the training set, sorted).

    forget_idx: D_f; retain_idx: D_r = train minus D_f; retain_subset_idx: the small
    retain set the methods see (a subset of D_r); test_mask: (N_test,) bool, test samples
    of the classes that remain (class forgetting; all True for random forgetting).
    """

    spec: ForgetSpec
    seed: int
    forget_idx: np.ndarray
    retain_idx: np.ndarray
    retain_subset_idx: np.ndarray
    test_mask: np.ndarray = field(repr=False)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def digest(self) -> str:
        """Short hash of D_r (model cache keys for the retrain oracle)."""
        return _fingerprint(self.retain_idx.astype(np.int64))

    def to_json(self) -> dict:
        return {
            "forget": str(self.spec),
            "seed": self.seed,
            "num_forget": int(len(self.forget_idx)),
            "num_retain": int(len(self.retain_idx)),
            "retain_subset_idx": self.retain_subset_idx.tolist(),
        }


def make_split(dataset: Dataset, forget, *, retain_size: int | None = None, seed: int = 0) -> Split:
    """Build a forgetting split (module doc). retain_size: size of the retain subset the
    methods see (None: all of D_r). Fixed by ``seed``."""
    spec = parse_forget(forget)
    y = dataset.y_train.numpy()
    n = len(y)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    if spec.kind == "class":
        present = set(np.unique(y).tolist())
        absent = [c for c in spec.classes if c not in present]
        if absent:
            raise ValueError(
                f"forget class(es) {absent} not in the {dataset.name} training set "
                f"(classes present: {sorted(present)})"
            )
        mask = np.isin(y, spec.classes)
        if mask.all():
            raise ValueError(f"forgetting classes {list(spec.classes)} would leave no retain data")
        test_mask = ~np.isin(dataset.y_test.numpy(), spec.classes)
    else:
        k = spec.count if spec.count is not None else int(round(spec.fraction * n))
        if k <= 0:
            raise ValueError(f"forget set is empty: {spec} of {n} training samples rounds to 0")
        if k >= n:
            raise ValueError(f"forget set ({k}) must be smaller than the training set ({n})")
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=k, replace=False)] = True
        test_mask = np.ones(len(dataset.y_test), dtype=bool)
    forget_idx = np.flatnonzero(mask)
    retain_idx = np.flatnonzero(~mask)
    if retain_size is None:
        subset = retain_idx.copy()
    else:
        if isinstance(retain_size, bool) or not isinstance(retain_size, (int, np.integer)) or retain_size <= 0:
            raise ValueError(f"retain_size must be a positive int, got {retain_size!r}")
        if retain_size > len(retain_idx):
            raise ValueError(
                f"retain_size={retain_size} is larger than the retain data available "
                f"({len(retain_idx)} training samples outside the forget set)"
            )
        subset = np.sort(rng.choice(retain_idx, size=int(retain_size), replace=False))
    return Split(spec, seed, forget_idx, retain_idx, subset, test_mask)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0):
    """A DataLoader over (x, y); shuffling uses its own generator seeded by ``seed``."""
    from torch.utils.data import DataLoader, TensorDataset

    if len(y) == 0:
        raise ValueError("cannot build a DataLoader over an empty set")
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)
