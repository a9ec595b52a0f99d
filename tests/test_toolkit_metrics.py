"""Metrics against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from orthograd_fast.unlearning import metrics


def test_accuracy_confidence_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    assert metrics.accuracy(logits, y) == pytest.approx(1 / 3)
    conf = metrics.correct_class_confidence(logits, y)
    np.testing.assert_allclose(conf, [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(3))])
    np.testing.assert_allclose(metrics.per_sample_loss(logits, y), -np.log(conf))
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert metrics.accuracy(model, x, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
    assert math.isnan(metrics.accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))


def test_loss_mia_auc_by_hand():
    # pairs (forget loss < non-member loss): (1,3) yes, (1,0.5) no, (2,3) yes, (2,0.5) no
    assert metrics.loss_mia_auc([1.0, 2.0], [3.0, 0.5]) == pytest.approx(0.5)
    assert metrics.loss_mia_auc([0.1, 0.2], [1.0, 2.0]) == pytest.approx(1.0)  # forget looks trained-on
    assert metrics.loss_mia_auc([5.0], [1.0, 2.0]) == pytest.approx(0.0)
    assert metrics.loss_mia_auc([1.0], [1.0, 2.0]) == pytest.approx(0.75)  # tie counts one half
    with pytest.raises(ValueError):
        metrics.loss_mia_auc([], [1.0])


def test_mia_efficacy_separable():
    members = np.full(50, 0.99)
    nonmembers = np.full(50, 0.3)
    # forget samples with member-like confidence: none called non-member; low confidence: all
    assert metrics.mia_efficacy(np.full(10, 0.99), members, nonmembers) == pytest.approx(0.0)
    assert metrics.mia_efficacy(np.full(10, 0.3), members, nonmembers) == pytest.approx(1.0)
    assert metrics.mia_efficacy(np.r_[np.full(3, 0.99), np.full(1, 0.3)], members, nonmembers) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="forget set is empty"):
        metrics.mia_efficacy([], members, nonmembers)


def test_mia_attack_separable_and_known_fractions():
    members, nonmembers = np.full(50, 0.99), np.full(50, 0.3)
    out = metrics.mia_attack(members, nonmembers, np.r_[np.full(3, 0.99), np.full(1, 0.3)], folds=5)
    assert out["bacc"] == 1.0 and out["auc"] == 1.0 and out["efficacy"] == pytest.approx(0.25)
    assert set(metrics.mia_attack(members, nonmembers, [0.3], folds=None)) == {"efficacy"}
    with pytest.raises(ValueError, match="5-fold cross-validation needs at least 5"):
        metrics.mia_attack(members[:3], nonmembers, [0.5])
    with pytest.raises(ValueError, match="NaN"):
        metrics.mia_attack(members, nonmembers, [float("nan")])


def test_mia_attack_quality_near_chance_when_members_look_like_nonmembers(gen):
    """Members and non-members from one distribution: out-of-fold predictions are independent
    of the labels, so the balanced accuracy is 0.5 ± ~0.02 (sd of ½(TPR + TNR) with 400 of
    each); 0.5 ± 0.12 is more than 5 sd. A real gap in confidence is found."""
    n = 400
    same = torch.rand(2 * n, generator=gen, dtype=torch.float64).numpy() ** 0.2
    null = metrics.mia_attack(same[:n], same[n:], same[:10], folds=5, seed=int(torch.randint(1 << 30, (1,), generator=gen)))
    assert abs(null["bacc"] - 0.5) < 0.12 and abs(null["auc"] - 0.5) < 0.12
    # members all confident, 30 % of the non-members not: the attack keys on that tail
    nonmem = same[:n].copy()
    nonmem[: int(0.3 * n)] *= 0.3
    real = metrics.mia_attack(same[n:], nonmem, nonmem[: int(0.3 * n)], folds=5)
    assert real["bacc"] > 0.6 and real["efficacy"] > 0.9


def test_ci95_against_scipy(gen):
    from scipy import stats

    # by hand: [1, 2, 3] -> mean 2, s = 1; with 2 degrees of freedom the t CDF is
    # ½ + t / (2·sqrt(2 + t²)), so t_{0.975, 2} = sqrt(2·0.95² / (1 − 0.95²))
    half = math.sqrt(2 * 0.95**2 / (1 - 0.95**2)) / math.sqrt(3)
    assert metrics.ci95([1.0, 2.0, 3.0]) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-12)
    v = torch.randn(7, generator=gen, dtype=torch.float64).numpy()
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert metrics.ci95(list(v)) == pytest.approx((v.mean(), lo, hi), rel=1e-10, abs=1e-12)
    assert metrics.ci95(list(v) + [float("nan")]) == pytest.approx(metrics.ci95(list(v)))
    m, lo1, hi1 = metrics.ci95([0.3])
    assert m == 0.3 and math.isnan(lo1) and math.isnan(hi1)
    assert all(math.isnan(x) for x in metrics.ci95([]))
    w = torch.randn(7, generator=gen, dtype=torch.float64).numpy()
    assert metrics.paired_ci95(list(v), list(w)) == pytest.approx(metrics.ci95(list(v - w)))
    with pytest.raises(ValueError, match="same seeds"):
        metrics.paired_ci95([1.0, 2.0], [1.0])


def test_uis_aus_by_hand():
    # class: ½(|0.9-0.8|/0.9 + 0.1/0.9) = 1/9
    assert metrics.uis(0.9, 0.8, 0.1, "class") == pytest.approx(1 / 9)
    # random: ½(|0.9-0.8|/0.9 + |0.9-1.0|/0.9) = 1/9
    assert metrics.uis(0.9, 0.8, 1.0, "random") == pytest.approx(1 / 9)
    assert metrics.uis(0.9, 0.9, 0.9, "random") == 0.0
    # AUS class: (1-(0.9-0.8))/(1+0.1) = 0.9/1.1; random: 0.9/(1+|0.7-0.8|)
    assert metrics.aus(0.9, 0.8, 0.1, "class") == pytest.approx(0.9 / 1.1)
    assert metrics.aus(0.9, 0.8, 0.7, "random") == pytest.approx(0.9 / 1.1)
    with pytest.raises(ValueError, match="kind"):
        metrics.uis(0.9, 0.8, 0.1, "sample")


def test_avg_gap_and_noise_floor():
    a = {"ua": 1.0, "mia_efficacy": 0.8, "retain_acc": 0.9, "test_acc": 0.7}
    ref = {"ua": 0.9, "mia_efficacy": 1.0, "retain_acc": 0.9, "test_acc": 0.8}
    assert metrics.avg_gap(a, ref) == pytest.approx((0.1 + 0.2 + 0.0 + 0.1) / 4)
    r1 = {"ua": 1.0, "mia_efficacy": 1.0, "retain_acc": 0.98, "test_acc": 0.96}
    r2 = {"ua": 1.0, "mia_efficacy": 1.0, "retain_acc": 0.96, "test_acc": 0.94}
    # each seed against the other: (0 + 0 + 0.02 + 0.02) / 4
    assert metrics.retrain_noise_floor([r1, r2]) == pytest.approx([0.01, 0.01])
    assert metrics.retrain_noise_floor([r1]) == []
    assert metrics.mean_metrics([r1, r2])["retain_acc"] == pytest.approx(0.97)
    assert metrics.mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2)))
    assert metrics.mean_std([2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in metrics.mean_std([float("nan")]))


def test_evaluate_on_digits():
    from orthograd_fast.unlearning import datasets, models, splits, training

    ds = datasets.load_digits()
    split = splits.make_split(ds, "class:3", retain_size=32, seed=0)
    mcfg, tcfg = training.default_configs("digits")
    model = training.get_trained("original", ds, np.arange(len(ds.y_train)), mcfg,
                               training.TrainConfig(epochs=8), seed=0, cache=False).model
    out = metrics.evaluate(model, ds, split, seed=0, original_test_acc=0.9)
    assert out["forget_acc"] > 0.8 and out["retain_acc"] > 0.8 and out["test_acc"] > 0.8
    assert out["ua"] == pytest.approx(1 - out["forget_acc"])
    mask = torch.from_numpy(split.test_mask)
    assert out["test_acc"] == pytest.approx(metrics.accuracy(model, ds.x_test[mask], ds.y_test[mask]))
    assert out["uis"] == pytest.approx(metrics.uis(0.9, out["test_acc"], out["forget_acc"], "class"))
    for k in ("mia_efficacy", "mia_bacc", "mia_auc", "loss_mia_auc", "aus", "test_acc_forgotten"):
        assert 0.0 <= out[k] <= 1.5
    # the attack is fit on at most mia_max members and non-members; without folds, no quality
    quick = metrics.evaluate(model, ds, split, seed=0, attack_folds=None, val=True)
    assert "mia_bacc" not in quick and quick["mia_efficacy"] == pytest.approx(out["mia_efficacy"])
    vmask = ds.y_val != 3
    assert quick["val_acc"] == pytest.approx(metrics.accuracy(model, ds.x_val[vmask], ds.y_val[vmask]))
