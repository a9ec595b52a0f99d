"""Forgetting splits of a toolkit data set, and the loaders the methods see.

Forgetting (``--forget``): ``class:K`` or ``class:K1,K2`` forgets every training sample
of those classes; ``random:F`` forgets a random fraction F in (0, 1) of the training set,
``random:N`` N random samples. D_f = forget set, D_r = the rest of the training set, and
the methods see a *retain subset* of D_r of a chosen size (the paper's small retain set),
drawn with the split's seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .datasets.base import Dataset, fingerprint


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
        return fingerprint(self.retain_idx.astype(np.int64))

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
