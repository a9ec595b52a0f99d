"""Training from scratch, and a disk cache for the original and retrain models.

Training recipe (``TrainConfig``): SGD with momentum 0.9, weight decay 5e-4, cosine
learning-rate decay, cross-entropy, shuffled mini-batches; fully seeded. Each data set
registers its default recipe (``datasets.register``); ``default_configs`` reads it.

Named recipes (``RECIPES``, the CLI's ``--recipe``, ``bench/unlearning_study.py``) fix the
data (and training subset), the model and the training config of an original model that
*memorises* its training set the way the OrthoGrad paper's models do: training accuracy
≈ 100 % with a clear gap to test accuracy (long training on little data, no
augmentation). Measured (``bench/UNLEARNING.md`` has the per-seed figures of the study):

* ``fashion-mnist-cnn``: 5000 stratified Fashion-MNIST training images, ``strided_cnn``
  (16, 32) (20k params), 30 epochs, batch 64, lr 0.05, wd 5e-4: train 99.8 %, test 84.7 %
  (seed 0); a loss-threshold attack's AUC on train vs test 0.56.
* ``digits-mlp``: all 1257 digits training images, MLP (128,), 100 epochs, batch 64,
  lr 0.05, no weight decay: train 99.97 %, test 97.1 % (mean of seeds 0-2). Digits is
  too easy for a larger gap; its random forgetting stays uninformative (retrain's forget
  accuracy ≈ the original's), use class forgetting there.

The original model (trained on all of D_train) and the retrain oracle (same recipe, fresh
init, D_r only) are cached as ``<cache>/<kind>-<key>.pt`` where key hashes the dataset
fingerprint, the training indices, the model and training configs and the seed. Cache dir:
``$ORTHOGRAD_FAST_CACHE`` or ``~/.cache/orthograd_fast``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import datasets as _datasets
from .datasets import Dataset
from .models import ModelConfig, build_model, check_arch

_CACHE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe: epochs over the training set, batch size, SGD lr/momentum/wd."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class Recipe:
    """A named original-model recipe: the data set (``train_subset``: a stratified subset
    of its training split, None = all), the model and the training config."""

    name: str
    dataset: str
    train_subset: int | None
    model: ModelConfig
    train: TrainConfig

    def load_data(self, root=None) -> Dataset:
        """The recipe's data set (``root``: where its files are, as ``load_dataset``)."""
        return _datasets.load_dataset(self.dataset, root=root, train_subset=self.train_subset)


RECIPES: dict[str, Recipe] = {
    "fashion-mnist-cnn": Recipe(
        "fashion-mnist-cnn", "fashion-mnist", 5000, ModelConfig("strided_cnn", channels=(16, 32)),
        TrainConfig(epochs=30, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4),
    ),
    "digits-mlp": Recipe(
        "digits-mlp", "digits", None, ModelConfig("mlp", hidden=(128,)),
        TrainConfig(epochs=100, batch_size=64, lr=0.05, momentum=0.9, weight_decay=0.0),
    ),
}


def recipe(name: str) -> Recipe:
    """The named recipe of ``RECIPES`` (ValueError listing the choices)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def default_configs(dataset_name: str, arch: str = "mlp") -> tuple[ModelConfig, TrainConfig]:
    """The recipe used by the CLI for a dataset (and arch): the data set's registered
    recipe (``datasets.register``; digits' for a name that is not registered)."""
    base = dataset_name.split("[")[0]
    try:
        recipe = _datasets.entry(base).recipe
    except ValueError:
        recipe = _datasets.entry("digits").recipe
    check_arch(arch)
    model_fields = {f.name for f in fields(ModelConfig)}
    train_fields = {f.name for f in fields(TrainConfig)}
    mcfg = ModelConfig(arch, **{k: v for k, v in recipe.items() if k in model_fields})
    tcfg = TrainConfig(**{k: v for k, v in recipe.items() if k in train_fields})
    return mcfg, tcfg


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Reset every submodule that has ``reset_parameters`` (in place, seeded); returns model.
    The global RNG is untouched. :func:`uninitializable` lists what this leaves alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


def uninitializable(model: nn.Module) -> list[str]:
    """Names of trainable parameters that :func:`reinitialize` would not reset: those held
    (directly) by a module without ``reset_parameters``."""
    covered = {id(p) for m in model.modules() if hasattr(m, "reset_parameters")
               for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` in place on (x (N, ...), y (N,)) with the ``cfg`` recipe; returns it."""
    from tqdm.auto import tqdm

    if len(y) == 0:
        raise ValueError("cannot train on an empty set")
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(total, 1))))
    model.train()
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False, unit="ep")
    for _ in bar:
        perm = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


# --------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------
def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The model cache folder: ``path``, else $ORTHOGRAD_FAST_CACHE, else ~/.cache/orthograd_fast."""
    if path is None:
        path = os.environ.get("ORTHOGRAD_FAST_CACHE") or Path.home() / ".cache" / "orthograd_fast"
    return Path(path)


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class TrainedModel:
    """A trained model with how it was made. seconds: training wall time (from the cache
    file when loaded); cached: loaded from disk."""

    model: nn.Module
    key: str
    seconds: float
    cached: bool
    meta: dict = field(default_factory=dict)


def get_trained(
    kind: str,
    dataset: Dataset,
    train_idx: np.ndarray,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    *,
    seed: int,
    cache: str | os.PathLike | None | bool = None,
    progress: bool = False,
) -> TrainedModel:
    """Train (or load from cache) a model on ``dataset.x_train[train_idx]``.

    kind: a label ("original", "retrain") in the file name and progress bar. cache: a
    folder, None for the default folder, or False to disable caching.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    payload = {
        "v": _CACHE_VERSION, "kind": kind, "data": dataset.fingerprint,
        "idx": hashlib.sha256(train_idx.tobytes()).hexdigest()[:16],
        "model": asdict(mcfg), "train": asdict(tcfg), "seed": seed,
        "torch": torch.__version__.split("+")[0],
    }
    key = _key(payload)
    model = build_model(mcfg, dataset.input_shape, dataset.num_classes, seed=seed)
    path = None if cache is False else cache_dir(cache) / f"{kind}-{key}.pt"
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"])
            model.eval()
            return TrainedModel(model, key, float(blob["seconds"]), True, payload)
        except Exception:  # a corrupt or stale file is retrained and overwritten
            model = build_model(mcfg, dataset.input_shape, dataset.num_classes, seed=seed)
    t0 = time.perf_counter()
    idx = torch.from_numpy(train_idx)
    train_model(
        model, dataset.x_train[idx], dataset.y_train[idx], tcfg,
        seed=seed, progress=progress, desc=f"{kind} (seed {seed})",
    )
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save({"state_dict": model.state_dict(), "seconds": seconds, "meta": payload}, tmp)
        os.replace(tmp, path)
    return TrainedModel(model, key, seconds, False, payload)


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (the caller's model is never modified by the toolkit's comparisons)."""
    return copy.deepcopy(model)
