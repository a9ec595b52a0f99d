"""Unlearning metrics, as the unlearning literature computes them.

All accuracies and rates are fractions in [0, 1] here (tables print percentages).
Notation: D_f forget set, D_r retain set (all training data outside D_f), D_test test set.

* forget_acc = Acc(D_f); UA (unlearning accuracy) = 1 - forget_acc.
* retain_acc (RA) = Acc(D_r), on the *whole* D_r (the methods only see a small subset).
* test_acc (TA) = Acc(D_test) for random forgetting; for class forgetting, accuracy on
  the test samples of the classes that remain (SalUn/Sparse convention).
* The membership-inference attack (``mia_attack``, SalUn / Unlearn-Sparse
  ``SVC_MIA_forget_efficacy['confidence']``): an RBF SVC (C=3, gamma="auto") fit on the
  correct-class softmax confidence of members = a random D_r subset (label 1) and as many
  non-members from D_test (label 0), at most ``mia_max`` (default 1000) each: an RBF SVC
  is quadratic in its training set (measured, 2 shared cores: 0.35 s per fit at 1000
  each, 1.5 s at 2000).
  - mia_bacc, mia_auc: the attack's *own* quality, the balanced accuracy and ROC AUC of
    its out-of-fold decisions on members vs non-members (stratified ``attack_folds``-fold
    cross-validation). Read them first: at 0.5 the attack cannot tell D_r from D_test
    and MIA-efficacy means nothing. That is how it degenerated on a model that does not
    memorise (train 89 %, test 87 %): the bulk of both classes sits at confidence ≈ 1, the
    SVC labels that bulk by whichever class has a little more mass there, and D_f's
    efficacy flips between ~0.1 and ~0.7 with the seed. On a memorising model (train
    ≈ 100 %) the bulk is members' and the attack keys on the low-confidence tail
    (Fashion-MNIST recipe: bAcc ≈ 0.60; efficacy 0.005 for the original model's D_f,
    0.2 for the retrain oracle's). A logistic regression on the logit-scaled confidence
    was tried instead and is worse there (bAcc 0.50, efficacy 0.55 vs 0.56): it places
    its threshold inside the bulk.
  - mia_efficacy: the fraction of D_f that the attack fit on all members and non-members
    labels non-member (SalUn's definition). Higher = D_f looks less trained-on; the
    retrain oracle is the target, not 1.
* loss_mia_auc: the loss-threshold attack "member iff loss < t", its ROC AUC for telling
  D_f (positives) from non-members drawn from the same classes (the test samples of the
  forgotten classes for class forgetting, D_test for random forgetting). 0.5 = D_f is
  indistinguishable from unseen data; the retrain oracle sits near 0.5; the original
  model above it.
* UIS (the OrthoGrad paper's Unlearning Impact Score, lower is better), with O_t the
  original model's test acc, U_t the unlearned test acc, U_u the unlearned forget acc:
  random: ½(|O_t−U_t|/O_t + |O_t−U_u|/O_t); class: ½(|O_t−U_t|/O_t + U_u/O_t).
* AUS (Cotogni et al.'s Adaptive Unlearning Score, higher is better), a_or original test
  acc, a_t test acc, a_f forget acc: random (1−(a_or−a_t))/(1+|a_f−a_t|); class
  (1−(a_or−a_t))/(1+a_f).
* avg_gap (SalUn's Avg. Gap): mean over {UA, MIA-efficacy, RA, TA} of |method − retrain|,
  the retrain value being the mean over the retrain seeds. Its noise floor is the same gap
  of each retrain seed to the mean of the *other* retrain seeds (``retrain_noise_floor``).
* seconds: wall time of the unlearning run (retrain: its training time).
* Confidence intervals (``ci95``, ``paired_ci95``): two-sided 95 % Student-t intervals
  over seeds, mean ± t_{0.975, n−1}·s/√n (s: sample std). Paired: over the per-seed
  differences of two methods run on the same seeds (same original model, forget set
  and retain subset), which removes the between-seed variance they share.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

GAP_KEYS = ("ua", "mia_efficacy", "retain_acc", "test_acc")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Logits (N, C) in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs).float()


def accuracy(logits_or_model, x_or_y, y=None) -> float:
    """Fraction of correct argmax predictions: ``accuracy(logits, y)`` or ``accuracy(model, x, y)``."""
    if y is None:
        logits, y = logits_or_model, x_or_y
    else:
        logits = predict(logits_or_model, x_or_y)
    if len(y) == 0:
        return float("nan")
    return float((logits.argmax(1) == y).float().mean())


def correct_class_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """softmax(logits)[i, y_i], (N,) float64."""
    return F.softmax(logits.double(), dim=1).gather(1, y[:, None]).squeeze(1).numpy()


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Cross-entropy of each sample, (N,) float64."""
    return F.cross_entropy(logits.double(), y, reduction="none").numpy()


def mia_attack(conf_members, conf_nonmembers, conf_targets, *, C: float = 3.0, folds: int | None = 5,
               seed: int = 0) -> dict:
    """SalUn's SVC membership-inference attack (module doc) on correct-class confidences.

    conf_members (N_m,), conf_nonmembers (N_n,): the attack's training data (label 1 / 0);
    conf_targets (N_t,): the samples to judge (D_f). Returns {"efficacy": fraction of the
    targets labelled non-member by the SVC fit on all members and non-members} and, unless
    ``folds`` is None, {"bacc", "auc"}: balanced accuracy and ROC AUC of the out-of-fold
    decisions (stratified ``folds``-fold cross-validation shuffled with ``seed``).
    ValueError when a set is empty, a class has fewer than ``folds`` samples, or a
    confidence is NaN.
    """
    from sklearn.svm import SVC

    m, n, t = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (conf_members, conf_nonmembers, conf_targets))
    if len(t) == 0:
        raise ValueError("mia_attack: the forget set is empty")
    if len(m) == 0 or len(n) == 0:
        raise ValueError("mia_attack needs at least one member and one non-member sample")
    if any(np.isnan(a).any() for a in (m, n, t)):
        raise ValueError("mia_attack: a confidence is NaN")
    X = np.concatenate([m, n])[:, None]
    Y = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    out = {}
    if folds is not None:
        from sklearn.metrics import balanced_accuracy_score, roc_auc_score
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        if min(len(m), len(n)) < folds:
            raise ValueError(f"mia_attack: {folds}-fold cross-validation needs at least {folds} members and "
                             f"non-members, got {len(m)} and {len(n)} (pass folds=None to skip it)")
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        score = cross_val_predict(SVC(C=C, gamma="auto", kernel="rbf"), X, Y, cv=cv, method="decision_function")
        out["bacc"] = float(balanced_accuracy_score(Y, score > 0))
        out["auc"] = float(roc_auc_score(Y, score))
    clf = SVC(C=C, gamma="auto", kernel="rbf").fit(X, Y)
    out["efficacy"] = float(1.0 - clf.predict(t[:, None]).mean())
    return out


def mia_efficacy(conf_forget, conf_members, conf_nonmembers, *, C: float = 3.0) -> float:
    """SalUn's MIA efficacy (module doc): the fraction of D_f that the RBF SVC fit on
    members (1) vs non-members (0) labels non-member; ``mia_attack(...)["efficacy"]``.

    conf_*: correct-class confidences (N_*,).
    """
    return mia_attack(conf_members, conf_nonmembers, conf_forget, C=C, folds=None)["efficacy"]


def loss_mia_auc(loss_forget, loss_nonmembers) -> float:
    """ROC AUC of the attack "member iff loss < t" for D_f (positives) vs non-members.

    = P(loss_f < loss_n) + ½ P(loss_f = loss_n) over all pairs (Mann-Whitney form).
    """
    lf = np.asarray(loss_forget, dtype=np.float64)
    ln = np.asarray(loss_nonmembers, dtype=np.float64)
    if len(lf) == 0 or len(ln) == 0:
        raise ValueError("loss_mia_auc needs non-empty forget and non-member sets")
    from sklearn.metrics import roc_auc_score

    labels = np.concatenate([np.ones(len(lf)), np.zeros(len(ln))])
    return float(roc_auc_score(labels, -np.concatenate([lf, ln])))


def uis(original_test_acc: float, test_acc: float, forget_acc: float, kind: str) -> float:
    """Unlearning Impact Score (module doc); lower is better. kind: "class" or "random"."""
    o = original_test_acc
    if o <= 0:
        raise ValueError("UIS needs a positive original test accuracy")
    if kind == "class":
        return 0.5 * (abs(o - test_acc) / o + abs(forget_acc) / o)
    if kind == "random":
        return 0.5 * (abs(o - test_acc) / o + abs(o - forget_acc) / o)
    raise ValueError(f"kind must be 'class' or 'random', got {kind!r}")


def aus(original_test_acc: float, test_acc: float, forget_acc: float, kind: str) -> float:
    """Adaptive Unlearning Score (module doc); higher is better. kind: "class" or "random"."""
    num = 1.0 - (original_test_acc - test_acc)
    if kind == "class":
        return num / (1.0 + abs(forget_acc))
    if kind == "random":
        return num / (1.0 + abs(forget_acc - test_acc))
    raise ValueError(f"kind must be 'class' or 'random', got {kind!r}")


def avg_gap(metrics: Mapping[str, float], reference: Mapping[str, float], keys: Sequence[str] = GAP_KEYS) -> float:
    """mean_k |metrics[k] − reference[k]| over ``keys`` (SalUn's Avg. Gap, as fractions)."""
    return float(np.mean([abs(metrics[k] - reference[k]) for k in keys]))


def mean_metrics(rows: Iterable[Mapping[str, float]], keys: Sequence[str] = GAP_KEYS) -> dict:
    """Per-key mean over rows."""
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to average")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def retrain_noise_floor(retrain_rows: Sequence[Mapping[str, float]], keys: Sequence[str] = GAP_KEYS) -> list[float]:
    """Avg. Gap of each retrain seed to the mean of the other seeds (needs >= 2 seeds, else [])."""
    if len(retrain_rows) < 2:
        return []
    out = []
    for i, row in enumerate(retrain_rows):
        others = [r for j, r in enumerate(retrain_rows) if j != i]
        out.append(avg_gap(row, mean_metrics(others, keys), keys))
    return out


def evaluate(
    model: nn.Module,
    dataset,
    split,
    *,
    seed: int = 0,
    original_test_acc: float | None = None,
    retain_eval_size: int | None = None,
    mia_max: int | None = 1000,
    attack_folds: int | None = 5,
    val: bool = False,
) -> dict:
    """All per-model metrics of the module doc for ``model`` on ``split`` of ``dataset``.

    Returns forget_acc, ua, retain_acc, test_acc, test_acc_forgotten (test acc on the
    forgotten classes; class forgetting only, else nan), mia_efficacy, mia_bacc and
    mia_auc (:func:`mia_attack`; the last two only when ``attack_folds`` is not None),
    loss_mia_auc, and uis/aus when ``original_test_acc`` is given; val=True adds val_acc
    (on the remaining classes for class forgetting, as test_acc). retain_eval_size:
    evaluate RA on a random subset of D_r of that size (None: all of D_r). mia_max: cap
    on the attack's members and non-members each (None: |D_test|, as SalUn). ``seed``
    fixes the random subsets and the folds.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x41A]))
    fi = torch.from_numpy(split.forget_idx)
    ri_np = split.retain_idx
    if retain_eval_size is not None and retain_eval_size < len(ri_np):
        ri_np = np.sort(rng.choice(ri_np, retain_eval_size, replace=False))
    ri = torch.from_numpy(ri_np)
    lf = predict(model, dataset.x_train[fi])
    yf = dataset.y_train[fi]
    lr = predict(model, dataset.x_train[ri])
    yr = dataset.y_train[ri]
    lt = predict(model, dataset.x_test)
    yt = dataset.y_test
    mask = torch.from_numpy(split.test_mask)
    out = {
        "forget_acc": accuracy(lf, yf),
        "retain_acc": accuracy(lr, yr),
        "test_acc": accuracy(lt[mask], yt[mask]),
        "test_acc_forgotten": accuracy(lt[~mask], yt[~mask]) if (~mask).any() else float("nan"),
    }
    out["ua"] = 1.0 - out["forget_acc"]
    if val:
        vmask = torch.from_numpy(~np.isin(dataset.y_val.numpy(), split.spec.classes))
        out["val_acc"] = accuracy(predict(model, dataset.x_val[vmask]), dataset.y_val[vmask])
    n_nonmembers = len(yt) if mia_max is None else min(len(yt), mia_max)
    nonmembers = torch.from_numpy(np.sort(rng.choice(len(yt), n_nonmembers, replace=False)))
    n_members = min(len(yt), len(split.retain_idx), n_nonmembers)
    members = torch.from_numpy(np.sort(rng.choice(split.retain_idx, n_members, replace=False)))
    lm, ym = predict(model, dataset.x_train[members]), dataset.y_train[members]
    ln, yn = lt[nonmembers], yt[nonmembers]
    attack = mia_attack(correct_class_confidence(lm, ym), correct_class_confidence(ln, yn),
                        correct_class_confidence(lf, yf), folds=attack_folds, seed=seed)
    out["mia_efficacy"] = attack["efficacy"]
    if attack_folds is not None:
        out.update(mia_bacc=attack["bacc"], mia_auc=attack["auc"])
    nonmember = ~mask if split.kind == "class" else torch.ones_like(mask)
    out["loss_mia_auc"] = loss_mia_auc(per_sample_loss(lf, yf), per_sample_loss(lt[nonmember], yt[nonmember]))
    if original_test_acc is not None:
        out["uis"] = uis(original_test_acc, out["test_acc"], out["forget_acc"], split.kind)
        out["aus"] = aus(original_test_acc, out["test_acc"], out["forget_acc"], split.kind)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1; 0 for one value), ignoring NaNs; (nan, nan) if none."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided 95 % Student-t interval of the mean over ``values``
    (module doc), NaNs ignored; one value: (v, nan, nan); none: (nan, nan, nan)."""
    from scipy.stats import t as student_t

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size == 1:
        return mean, float("nan"), float("nan")
    half = float(student_t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def paired_ci95(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """:func:`ci95` of the per-seed differences a_i − b_i (a and b: the same seeds, in
    order; ValueError if their lengths differ; a pair with a NaN is dropped)."""
    if len(a) != len(b):
        raise ValueError(f"paired_ci95 needs values for the same seeds, got {len(a)} and {len(b)}")
    return ci95([x - y for x, y in zip(a, b)])
