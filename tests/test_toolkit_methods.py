"""Each unlearning method moves a trained digits model the expected way; the unlearn loop's
stopping rules, NaN roll-back and bad-input errors."""
import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from orthograd_fast.unlearning import datasets, methods, models, splits, training
from orthograd_fast.unlearning.runner import StopRule, loader_accuracy, run_unlearning, unlearn


@pytest.fixture(scope="module")
def setup():
    ds = datasets.load_digits()
    split = splits.make_split(ds, "class:3", retain_size=32, seed=0)
    mcfg = models.ModelConfig("mlp", (64,))
    model = training.get_trained("original", ds, np.arange(len(ds.y_train)), mcfg,
                                 training.TrainConfig(epochs=10), seed=0, cache=False).model
    fi, ri = torch.from_numpy(split.forget_idx), torch.from_numpy(split.retain_subset_idx)
    loaders = {
        "forget": splits.loader(ds.x_train[fi], ds.y_train[fi], 32, shuffle=True, seed=0),
        "retain": splits.loader(ds.x_train[ri], ds.y_train[ri], 32, shuffle=True, seed=0),
        "val": splits.loader(ds.x_val, ds.y_val, 512),
    }
    return ds, split, model, loaders


def _ce(model, loader):
    with torch.no_grad():
        return float(np.mean([F.cross_entropy(model(x), y).item() for x, y in loader]))


def _kl_to(teacher, model, loader):
    with torch.no_grad():
        kls = [F.kl_div(F.log_softmax(model(x), 1), F.softmax(teacher(x), 1), reduction="batchmean").item()
               for x, _ in loader]
    return float(np.mean(kls))


@pytest.mark.parametrize("method", ["orthograd", "orthograd_mean", "neggrad", "neggrad_plus", "random_label", "scrub"])
def test_forgetting_methods_forget(setup, method):
    _, _, original, L = setup
    model = copy.deepcopy(original)
    f0, ce0 = loader_accuracy(model, L["forget"]), _ce(model, L["forget"])
    res = run_unlearning(model, L["retain"], L["forget"], L["val"], method=method, steps=12, stop=None)
    assert res.model is model and res.steps >= 1 and res.history[0]["step"] == 0
    assert loader_accuracy(model, L["forget"]) < f0 - 0.2
    assert _ce(model, L["forget"]) > ce0
    assert loader_accuracy(model, L["val"]) > 0.6  # no collapse at the default step size
    if method == "scrub":
        assert _kl_to(original, model, L["forget"]) > _kl_to(original, original, L["forget"]) + 0.1


def test_finetune_descends_retain(setup):
    _, _, original, L = setup
    model = copy.deepcopy(original)
    ce0 = _ce(model, L["retain"])
    res = run_unlearning(model, L["retain"], L["forget"], method="finetune", steps=10, stop=None)
    assert res.stop_reason == "step budget" and res.steps == 10
    assert _ce(model, L["retain"]) < ce0


def test_orthograd_keeps_retain_better_than_neggrad(setup):
    """Same step size, clip and number of steps: the per-sample retain losses (the samples
    OrthoGrad projects against) move far less under OrthoGrad than under plain ascent."""
    _, _, original, L = setup
    x, y = next(iter(splits.loader(*L["retain"].dataset.tensors, 1000)))

    def losses(m):
        with torch.no_grad():
            return F.cross_entropy(m(x), y, reduction="none")

    base = losses(original)
    moved = {}
    for m in ("orthograd", "neggrad"):
        model = copy.deepcopy(original)
        run_unlearning(model, L["retain"], L["forget"], method=m, steps=3, lr=0.05, stop=None)
        moved[m] = float((losses(model) - base).abs().mean())
    assert moved["orthograd"] < 0.2 * moved["neggrad"], moved


def test_retrain_oracle(setup):
    ds, split, original, L = setup
    ri = torch.from_numpy(split.retain_idx)
    full = splits.loader(ds.x_train[ri], ds.y_train[ri], 64, shuffle=True, seed=0)
    model = copy.deepcopy(original)
    res = run_unlearning(model, full, L["forget"], method="retrain", epochs=4)
    assert res.method == "retrain" and res.steps == 4 * len(full)
    assert loader_accuracy(model, L["forget"]) == 0.0  # a class never seen is never predicted
    assert loader_accuracy(model, L["val"]) > 0.7
    with pytest.raises(ValueError, match="unknown option"):
        run_unlearning(copy.deepcopy(original), full, L["forget"], method="retrain", alpha=0.1)


def test_stop_at_target_and_auto_target(setup):
    _, _, original, L = setup
    model = copy.deepcopy(original)
    res = run_unlearning(model, L["retain"], L["forget"], L["val"], method="neggrad", steps=200,
                         stop=StopRule(forget_target=0.5))
    assert "target" in res.stop_reason and res.history[-1]["forget_acc"] <= 0.5 < res.history[-2]["forget_acc"]
    assert loader_accuracy(model, L["forget"]) == pytest.approx(res.history[-1]["forget_acc"])
    # auto: no forget label in the retain loader -> class forgetting -> target 0 (the retrain level)
    res = run_unlearning(copy.deepcopy(original), L["retain"], L["forget"], L["val"], method="neggrad", steps=300)
    assert res.forget_target == 0.0 and res.history[-1]["forget_acc"] == 0.0
    # already at target: no step at all
    res = run_unlearning(copy.deepcopy(original), L["retain"], L["forget"], method="neggrad", stop=1.0)
    assert res.steps == 0 and "before any step" in res.stop_reason


def test_unlearn_in_place_and_monitor(setup):
    _, _, original, L = setup
    model = copy.deepcopy(original)
    out = unlearn(model, L["retain"], L["forget"], L["val"], method="orthograd", steps=3, stop=None,
                  granularity="per_tensor", alpha=0.2)
    assert out is model and not all(torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters()))
    calls = []
    res = run_unlearning(copy.deepcopy(original), L["retain"], L["forget"], method="neggrad", steps=4,
                         stop=StopRule(forget_target=None, eval_every=2),
                         monitor=lambda m: calls.append(1) or {"x": 1.0})
    assert [h["step"] for h in res.history] == [0, 2, 4] and len(calls) == 3 and res.history[-1]["x"] == 1.0


def test_nan_stops_and_restores(setup):
    _, _, original, L = setup
    model = copy.deepcopy(original)
    with pytest.warns(RuntimeWarning, match="restored the weights of step 0"):
        res = run_unlearning(model, L["retain"], L["forget"], method="neggrad", lr=1e38, max_grad_norm=None,
                             steps=20, stop=StopRule(forget_target=None))
    assert res.restored and res.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters()))
    model = copy.deepcopy(original)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = run_unlearning(model, L["retain"], L["forget"], method="orthograd", lr=1e38, max_grad_norm=None,
                             steps=20, stop=StopRule(forget_target=None))
    assert res.restored and all(torch.isfinite(p).all() for p in model.parameters())


def test_val_drop_budget_rolls_back(setup):
    _, _, original, L = setup
    model = copy.deepcopy(original)
    v0 = loader_accuracy(model, L["val"])
    res = run_unlearning(model, L["retain"], L["forget"], L["val"], method="random_label", lr=0.5, steps=100,
                         stop=StopRule(forget_target=None, max_val_drop=0.02))
    assert res.restored and "fell more than" in res.stop_reason
    assert loader_accuracy(model, L["val"]) >= v0 - 0.02


def test_bad_inputs(setup):
    _, _, original, L = setup
    m = copy.deepcopy(original)
    with pytest.raises(ValueError, match="unknown method 'gradient_ascent'"):
        unlearn(m, L["retain"], L["forget"], method="gradient_ascent")
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(m, L["retain"], empty)
    with pytest.raises(ValueError, match="retain set is empty"):
        unlearn(m, empty, L["forget"])
    with pytest.raises(ValueError, match="unknown option"):
        unlearn(m, L["retain"], L["forget"], method="neggrad", alpha=0.5)
    with pytest.raises(ValueError, match="needs a val_loader"):
        unlearn(m, L["retain"], L["forget"], stop={"max_val_drop": 0.1})
    with pytest.raises(ValueError, match="forget_target"):
        unlearn(m, L["retain"], L["forget"], stop={"forget_target": 2.0})
    with pytest.raises(ValueError, match="steps"):
        unlearn(m, L["retain"], L["forget"], steps=0)
    with pytest.raises(ValueError, match="lr"):
        unlearn(m, L["retain"], L["forget"], lr=-1.0)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), original.parameters()))
    assert set(methods.METHODS) == {"retrain", "orthograd", "orthograd_mean", "neggrad", "neggrad_plus",
                                    "finetune", "random_label", "scrub"}
