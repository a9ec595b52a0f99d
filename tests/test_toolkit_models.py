"""Models, training from scratch and the on-disk cache."""
import numpy as np
import pytest
import torch

from orthograd_fast.unlearning import datasets, models, training


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits()


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
        training.default_configs("digits", "vit")


@pytest.mark.parametrize("hw", [(28, 28), (8, 8), (7, 9), (1, 1)])
def test_strided_cnn_shapes_and_stride(hw):
    """Each stride-2 conv (padding 1) halves a side rounding up: 28 -> 14 -> 7, 7 -> 4 -> 2."""
    m = models.build_model(models.ModelConfig("strided_cnn", channels=(4, 6)), (1, *hw), 10, seed=0)
    assert m(torch.randn(3, 1, *hw)).shape == (3, 10)
    h2, w2 = (-(-(-(-hw[0] // 2)) // 2), -(-(-(-hw[1] // 2)) // 2))
    assert m[-1].in_features == 6 * h2 * w2
    assert [c.stride for c in m if isinstance(c, torch.nn.Conv2d)] == [(2, 2), (2, 2)]


def test_recipes(digits):
    """The named recipes load their data; digits-mlp memorises (train ≈ 100 %) on seed 0."""
    assert set(training.RECIPES) == {"fashion-mnist-cnn", "digits-mlp"}
    with pytest.raises(ValueError, match="unknown recipe 'x'"):
        training.recipe("x")
    r = training.recipe("digits-mlp")
    ds = r.load_data()
    assert ds.fingerprint == digits.fingerprint
    tm = training.get_trained("original", ds, np.arange(len(ds.y_train)), r.model, r.train, seed=0, cache=False)
    with torch.no_grad():
        train_acc = float((tm.model(ds.x_train).argmax(1) == ds.y_train).float().mean())
        test_acc = float((tm.model(ds.x_test).argmax(1) == ds.y_test).float().mean())
    assert train_acc >= 0.995 and 0.9 < test_acc < train_acc
    fm = training.recipe("fashion-mnist-cnn")
    assert (fm.dataset, fm.train_subset, fm.model.arch) == ("fashion-mnist", 5000, "strided_cnn")


def test_training_learns_and_reinitialize(digits):
    cfg = models.ModelConfig("mlp", (64,))
    model = models.build_model(cfg, digits.input_shape, 10, seed=1)
    training.train_model(model, digits.x_train, digits.y_train, training.TrainConfig(epochs=5), seed=1)
    with torch.no_grad():
        acc = float((model(digits.x_test).argmax(1) == digits.y_test).float().mean())
    assert acc > 0.85
    before = [p.detach().clone() for p in model.parameters()]
    training.reinitialize(model, seed=1)
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="empty"):
        training.train_model(model, digits.x_train[:0], digits.y_train[:0], training.TrainConfig(epochs=1))


def test_cache_roundtrip(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHOGRAD_FAST_CACHE", str(tmp_path / "envcache"))
    assert training.cache_dir() == tmp_path / "envcache"
    cfg, tcfg = models.ModelConfig("mlp", (32,)), training.TrainConfig(epochs=2)
    idx = np.arange(200)
    a = training.get_trained("original", digits, idx, cfg, tcfg, seed=0)
    assert not a.cached and len(list((tmp_path / "envcache").glob("original-*.pt"))) == 1
    b = training.get_trained("original", digits, idx, cfg, tcfg, seed=0)
    assert b.cached and b.key == a.key and b.seconds == pytest.approx(a.seconds)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    # any change of seed, indices or recipe is a different model
    assert training.get_trained("original", digits, idx, cfg, tcfg, seed=1, cache=False).key != a.key
    assert training.get_trained("original", digits, idx[:-1], cfg, tcfg, seed=0, cache=False).key != a.key
    other = training.get_trained("original", digits, idx, cfg, training.TrainConfig(epochs=3), seed=0, cache=False)
    assert other.key != a.key
    # a corrupt cache file is retrained, not fatal
    path = next((tmp_path / "envcache").glob("original-*.pt"))
    path.write_bytes(b"garbage")
    c = training.get_trained("original", digits, idx, cfg, tcfg, seed=0)
    assert not c.cached and all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


def test_model_registry_is_the_cli_choice_list():
    """A file in models/ registers a builder by name; build_model and the CLI's --model use it."""
    from orthograd_fast.unlearning import cli

    assert models.names() == ("mlp", "cnn", "strided_cnn")
    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["compare"]._actions
                  if a.dest == "model")
    assert tuple(action.choices) == models.names()
    with pytest.raises(ValueError, match="registered twice"):
        models.register("mlp")(lambda cfg, shape, n: None)

    @models.register("test-linear")
    def _build(cfg, input_shape, num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), num_classes))

    try:
        m = models.build_model(models.ModelConfig("test-linear"), (1, 8, 8), 10, seed=3)
        assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        assert "test-linear" in models.names()
    finally:
        del models.REGISTRY["test-linear"]
