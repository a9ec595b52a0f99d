"""The four models and input streams the peer benchmark times an OrthoGrad step on.

Every workload is a seeded model factory plus a batch factory; the batches are real data
where this machine has it (scikit-learn's digits, Fashion-MNIST from Debian's package
``dataset-fashion-mnist``) and seeded random inputs otherwise (the GPU machine, the
transformer's token ids). Which one a run used is recorded in ``Workload.inputs``.

=========== ======================================================= ========= ==========
name        model                                                   input     P (params)
=========== ======================================================= ========= ==========
digits-mlp  Flatten, Linear 64-128, ReLU, Linear 128-10             (N,1,8,8)     9,610
mlp-1024    Flatten, Linear 784-1024, ReLU, 1024-1024, ReLU, 1024-10 (N,1,28,28) 1,863,690
cnn-28      Conv 1-16 3x3 p1, ReLU, MaxPool 2, Conv 16-32 3x3 p1,  (N,1,28,28)    20,490
            ReLU, MaxPool 2, Flatten, Linear 1568-10
transformer token + position Embedding (512, 64 / 64, 64), 2 x           (N, 64) ids   137,482
            TransformerEncoderLayer(64, 4 heads, ff 256, no dropout,
            batch_first), mean over T, Linear 64-10
=========== ======================================================= ========= ==========

All models are row-independent (no BatchNorm, dropout 0), as OrthoGrad requires, and are
used at their seeded random initialisation: the step's cost does not depend on training.
"""
from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

FASHION_MNIST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FASHION_MNIST_LABELS = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
NUM_CLASSES = 10
SEQ_LEN = 64
VOCAB = 512


def loss_per_sample(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per row: logits (N, C), targets (N,) -> (N,)."""
    return F.cross_entropy(logits, targets, reduction="none")


class MeanOverTime(nn.Module):
    """(N, T, d) -> (N, d): the mean over the sequence positions."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=1)


class TinyTransformer(nn.Module):
    """Token ids (N, T) -> logits (N, 10): embeddings, encoder layers, mean pool, linear.

    The position embedding is looked up with (N, T) ids so that every module sees the
    batch in dim 0 (per-sample engines need that).
    """

    def __init__(self, vocab: int = VOCAB, seq_len: int = SEQ_LEN, d: int = 64, heads: int = 4,
                 ff: int = 256, layers: int = 2, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.encoder = nn.Sequential(*[
            nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True) for _ in range(layers)
        ])
        self.pool = MeanOverTime()
        self.head = nn.Linear(d, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(n, t)
        return self.head(self.pool(self.encoder(self.tok(ids) + self.pos(positions))))


def _mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, NUM_CLASSES),
    )


# ------------------------------------------------------------------------------------------
# input pools: (x (M, ...) float32 or int64, y (M,) int64), sampled by seeded permutations
# ------------------------------------------------------------------------------------------
_POOLS: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}


def _digits_pool():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(11)
        return torch.rand(1797, 1, 8, 8, generator=g), torch.randint(0, 10, (1797,), generator=g), "random (scikit-learn missing)"
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(y, dtype=torch.int64), "real: scikit-learn digits"


def _read_idx(path: Path) -> torch.Tensor:
    import numpy as np

    raw = gzip.open(path, "rb").read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic == 2051:
        n, h, w = (int.from_bytes(raw[o: o + 4], "big") for o in (4, 8, 12))
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w).copy())
    if magic == 2049:
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=8).copy())
    raise ValueError(f"{path}: not an IDX image or label file (magic {magic})")


def _fashion_pool():
    if FASHION_MNIST_IMAGES.is_file() and FASHION_MNIST_LABELS.is_file():
        x = _read_idx(FASHION_MNIST_IMAGES).float().div_(255.0)
        x = ((x - x.mean()) / x.std())[:, None]
        return x, _read_idx(FASHION_MNIST_LABELS).long(), "real: Fashion-MNIST test images"
    g = torch.Generator().manual_seed(12)
    return (torch.randn(4096, 1, 28, 28, generator=g), torch.randint(0, 10, (4096,), generator=g),
            f"random (no Fashion-MNIST at {FASHION_MNIST_IMAGES.parent})")


def _token_pool():
    g = torch.Generator().manual_seed(13)
    return (torch.randint(0, VOCAB, (4096, SEQ_LEN), generator=g), torch.randint(0, 10, (4096,), generator=g),
            "random token ids")


_POOL_MAKERS = {"digits": _digits_pool, "fashion": _fashion_pool, "tokens": _token_pool}


def _pool(kind: str):
    if kind not in _POOLS:
        _POOLS[kind] = _POOL_MAKERS[kind]()
    return _POOLS[kind]


@dataclass(frozen=True)
class Workload:
    """One benchmark model and its data.

    name: id used in files and tables; title: human label; build(): the seeded model
    (fp32, CPU); pool: "digits" | "fashion" | "tokens" (where batches come from).
    """

    name: str
    title: str
    build: Callable[[], nn.Module]
    pool: str

    @property
    def inputs(self) -> str:
        """Where the batches come from on this machine (real data or random)."""
        return _pool(self.pool)[2]

    def model(self, seed: int = 0) -> nn.Module:
        """The model at a seeded initialisation, in train mode (no dropout or BatchNorm)."""
        torch.manual_seed(seed)
        return self.build().train()

    def batches(self, n: int, seed: int, device="cpu"):
        """Disjoint (forget, retain) batches of n rows each: ((x, y), (x, y)), x (n, ...)."""
        x, y, _ = _pool(self.pool)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(x.shape[0], generator=g)[: 2 * n]
        if idx.numel() < 2 * n:
            raise ValueError(f"{self.name}: the input pool has {x.shape[0]} rows, fewer than 2 x {n}")
        xs, ys = x[idx].to(device), y[idx].to(device)
        return (xs[:n], ys[:n]), (xs[n:], ys[n:])


WORKLOADS = {
    w.name: w
    for w in (
        Workload("digits-mlp", "digits MLP 64-128-10", lambda: _mlp((64, 128, 10)), "digits"),
        Workload("mlp-1024", "MLP 784-1024-1024-10", lambda: _mlp((784, 1024, 1024, 10)), "fashion"),
        Workload("cnn-28", "small CNN 28x28", _cnn, "fashion"),
        Workload("transformer", f"transformer T={SEQ_LEN} (2 encoder layers, d=64)", TinyTransformer, "tokens"),
    )
}


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
