"""Models, training from scratch and the on-disk cache."""
import numpy as np
import pytest
import torch

from orthograd_fast import data, models


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def test_architectures_shapes():
    x = torch.randn(5, 1, 8, 8)
    mlp = models.build_model(models.ModelConfig("mlp", (32, 16)), (1, 8, 8), 10, seed=0)
    cnn = models.build_model(models.ModelConfig("cnn"), (1, 8, 8), 10, seed=0)
    assert mlp(x).shape == (5, 10) and cnn(x).shape == (5, 10)
    assert models.build_model(models.ModelConfig("cnn"), (1, 28, 28), 10)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    same = models.build_model(models.ModelConfig("mlp", (32, 16)), (1, 8, 8), 10, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(mlp.parameters(), same.parameters()))
    with pytest.raises(ValueError, match="unknown arch"):
        models.build_model(models.ModelConfig("resnet"), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="unknown arch"):
        models.default_configs("digits", "vit")


def test_training_learns_and_reinitialize(digits):
    cfg = models.ModelConfig("mlp", (64,))
    model = models.build_model(cfg, digits.input_shape, 10, seed=1)
    models.train_model(model, digits.x_train, digits.y_train, models.TrainConfig(epochs=5), seed=1)
    with torch.no_grad():
        acc = float((model(digits.x_test).argmax(1) == digits.y_test).float().mean())
    assert acc > 0.85
    before = [p.detach().clone() for p in model.parameters()]
    models.reinitialize(model, seed=1)
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="empty"):
        models.train_model(model, digits.x_train[:0], digits.y_train[:0], models.TrainConfig(epochs=1))


def test_cache_roundtrip(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHOGRAD_FAST_CACHE", str(tmp_path / "envcache"))
    assert models.cache_dir() == tmp_path / "envcache"
    cfg, tcfg = models.ModelConfig("mlp", (32,)), models.TrainConfig(epochs=2)
    idx = np.arange(200)
    a = models.get_trained("original", digits, idx, cfg, tcfg, seed=0)
    assert not a.cached and len(list((tmp_path / "envcache").glob("original-*.pt"))) == 1
    b = models.get_trained("original", digits, idx, cfg, tcfg, seed=0)
    assert b.cached and b.key == a.key and b.seconds == pytest.approx(a.seconds)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    # any change of seed, indices or recipe is a different model
    assert models.get_trained("original", digits, idx, cfg, tcfg, seed=1, cache=False).key != a.key
    assert models.get_trained("original", digits, idx[:-1], cfg, tcfg, seed=0, cache=False).key != a.key
    other = models.get_trained("original", digits, idx, cfg, models.TrainConfig(epochs=3), seed=0, cache=False)
    assert other.key != a.key
    # a corrupt cache file is retrained, not fatal
    path = next((tmp_path / "envcache").glob("original-*.pt"))
    path.write_bytes(b"garbage")
    c = models.get_trained("original", digits, idx, cfg, tcfg, seed=0)
    assert not c.cached and all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))
