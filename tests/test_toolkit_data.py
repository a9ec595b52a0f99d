"""Data loaders and forgetting splits (digits is bundled with scikit-learn)."""
import gzip

import numpy as np
import pytest
import torch

from orthograd_fast.unlearning import datasets, splits
from orthograd_fast.unlearning.datasets import fashion_mnist


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits()


def test_digits_shapes_and_disjoint_splits(digits):
    assert digits.x_train.shape == (1257, 1, 8, 8) and digits.x_train.dtype == torch.float32
    assert len(digits.y_val) == 180 and len(digits.y_test) == 360
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    assert 0.0 <= float(digits.x_train.min()) and float(digits.x_train.max()) <= 1.0
    # every class in every part (stratified), and no image shared between train and test
    for y in (digits.y_train, digits.y_val, digits.y_test):
        assert set(y.tolist()) == set(range(10))
    train = {tuple(r) for r in digits.x_train.reshape(len(digits.y_train), -1).tolist()}
    shared = sum(tuple(r) in train for r in digits.x_test.reshape(360, -1).tolist())
    assert shared <= 2  # sklearn digits has a couple of exact duplicate images
    assert datasets.load_digits().fingerprint == digits.fingerprint  # deterministic


def test_class_split(digits):
    sp = splits.make_split(digits, "class:3", retain_size=64, seed=1)
    y = digits.y_train.numpy()
    assert (y[sp.forget_idx] == 3).all() and len(sp.forget_idx) == (y == 3).sum()
    assert not (y[sp.retain_idx] == 3).any()
    assert len(sp.forget_idx) + len(sp.retain_idx) == len(y)
    assert len(sp.retain_subset_idx) == 64 and np.isin(sp.retain_subset_idx, sp.retain_idx).all()
    assert (digits.y_test.numpy()[sp.test_mask] != 3).all() and (~sp.test_mask).sum() == (digits.y_test == 3).sum()
    two = splits.make_split(digits, "class:5,3", seed=0)
    assert set(y[two.forget_idx]) == {3, 5} and two.spec.classes == (3, 5)
    assert len(two.retain_subset_idx) == len(two.retain_idx)  # retain_size=None: all of D_r


def test_random_split_fixed_by_seed(digits):
    a = splits.make_split(digits, "random:0.1", retain_size=16, seed=3)
    b = splits.make_split(digits, "random:0.1", retain_size=16, seed=3)
    c = splits.make_split(digits, "random:0.1", retain_size=16, seed=4)
    assert len(a.forget_idx) == round(0.1 * 1257)
    np.testing.assert_array_equal(a.forget_idx, b.forget_idx)
    np.testing.assert_array_equal(a.retain_subset_idx, b.retain_subset_idx)
    assert not np.array_equal(a.forget_idx, c.forget_idx)
    assert a.test_mask.all()
    # the forget set does not depend on the retain size
    bigger = splits.make_split(digits, "random:0.1", retain_size=128, seed=3)
    np.testing.assert_array_equal(a.forget_idx, bigger.forget_idx)
    n = splits.make_split(digits, "random:100", seed=0)
    assert len(n.forget_idx) == 100 and len(np.intersect1d(n.forget_idx, n.retain_idx)) == 0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("class:11", "not in the digits training set"),
        ("random:0", "empty"),
        ("random:0.0001", "empty"),
        ("random:5000", "smaller than the training set"),
        ("random:1.5", r"\(0, 1\)"),
        ("class:", "must look like"),
        ("forget3", "must look like"),
        ("sample:3", "must look like"),
        ("class:" + ",".join(map(str, range(10))), "no retain data"),
    ],
)
def test_bad_forget_specs(digits, spec, match):
    with pytest.raises(ValueError, match=match):
        splits.make_split(digits, spec)


def test_retain_size_errors(digits):
    with pytest.raises(ValueError, match="larger than the retain data available"):
        splits.make_split(digits, "class:3", retain_size=5000)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="retain_size"):
            splits.make_split(digits, "class:3", retain_size=bad)


def test_unknown_dataset_and_loader_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load_dataset("cifar10")
    with pytest.raises(ValueError, match="empty"):
        splits.loader(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 4)


def test_fashion_mnist_missing_names_make_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="make data"):
        datasets.load_fashion_mnist(tmp_path)


def test_idx_reader(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in imgs.shape)
    with gzip.open(tmp_path / "i.gz", "wb") as f:
        f.write(header + imgs.tobytes())
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "i.gz"), imgs)
    with gzip.open(tmp_path / "l.gz", "wb") as f:
        f.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 8, 9]))
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "l.gz"), [7, 8, 9])
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write((2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes([1]))
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "bad.gz")


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed (make data)")
def test_fashion_mnist_subset():
    ds = datasets.load_fashion_mnist(train_subset=1000)
    assert ds.x_train.shape == (1000, 1, 28, 28) and len(ds.y_val) == 5000 and len(ds.y_test) == 10000
    assert set(ds.y_train.tolist()) == set(range(10))
    assert abs(float(ds.x_train.mean())) < 1e-3  # standardised with the train statistics


def test_dataset_registry():
    """A file in datasets/ registers a loader by name (and aliases) with its default recipe."""
    from orthograd_fast.unlearning import training

    assert datasets.names() == ("digits", "fashion-mnist")
    assert datasets.entry("fmnist").name == "fashion-mnist"
    with pytest.raises(ValueError, match="registered twice"):
        datasets.register("digits")(lambda **kw: None)
    mcfg, tcfg = training.default_configs("fashion-mnist[2000]", "cnn")
    assert (mcfg.arch, mcfg.hidden, tcfg.epochs, tcfg.batch_size) == ("cnn", (256,), 4, 128)
    mcfg, tcfg = training.default_configs("digits")
    assert (mcfg.arch, mcfg.hidden, tcfg.epochs, tcfg.batch_size) == ("mlp", (128,), 30, 64)
