"""Unlearning metrics, as the unlearning literature computes them.

All accuracies and rates are fractions in [0, 1] here (tables print percentages).
Notation: D_f forget set, D_r retain set (all training data outside D_f), D_test test set.

* forget_acc = Acc(D_f); UA (unlearning accuracy) = 1 - forget_acc.
* retain_acc (RA) = Acc(D_r), on the *whole* D_r (the methods only see a small subset).
* test_acc (TA) = Acc(D_test) for random forgetting; for class forgetting, accuracy on
  the test samples of the classes that remain (SalUn/Sparse convention).
* mia_efficacy (SalUn / Unlearn-Sparse ``SVC_MIA_forget_efficacy['confidence']``): an RBF
  SVC (C=3, gamma="auto") is fit on the correct-class softmax confidence of members = a
  random D_r subset of size |D_test| (label 1) and non-members = D_test (label 0); the
  score is the fraction of D_f it labels non-member. Higher = D_f looks less trained-on.
  (The SVC is fit on at most ``mia_max`` members and non-members, random subsets, default
  2000 each: an RBF SVC is quadratic in its training set; digits is below the cap.)
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


def mia_efficacy(conf_forget, conf_members, conf_nonmembers, *, C: float = 3.0) -> float:
    """SalUn's SVC MIA efficacy (module doc): fraction of D_f an RBF SVC labels non-member.

    conf_*: correct-class confidences (N_*,); the SVC is fit on members (1) vs non-members (0).
    """
    from sklearn.svm import SVC

    conf_forget, conf_members, conf_nonmembers = (
        np.asarray(a, dtype=np.float64).reshape(-1, 1) for a in (conf_forget, conf_members, conf_nonmembers)
    )
    if len(conf_forget) == 0:
        raise ValueError("mia_efficacy: the forget set is empty")
    if len(conf_members) == 0 or len(conf_nonmembers) == 0:
        raise ValueError("mia_efficacy needs at least one member and one non-member sample")
    X = np.concatenate([conf_members, conf_nonmembers])
    Y = np.concatenate([np.ones(len(conf_members)), np.zeros(len(conf_nonmembers))])
    clf = SVC(C=C, gamma="auto", kernel="rbf")
    clf.fit(X, Y)
    return float(1.0 - clf.predict(conf_forget).mean())


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
    mia_max: int | None = 2000,
) -> dict:
    """All per-model metrics of the module doc for ``model`` on ``split`` of ``dataset``.

    Returns forget_acc, ua, retain_acc, test_acc, test_acc_forgotten (test acc on the
    forgotten classes; class forgetting only, else nan), mia_efficacy, loss_mia_auc, and
    uis/aus when ``original_test_acc`` is given. retain_eval_size: evaluate RA on a random
    subset of D_r of that size (None: all of D_r). mia_max: cap on the SVC's members and
    non-members (None: |D_test| each, as SalUn). ``seed`` fixes the random subsets.
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
    n_nonmembers = len(yt) if mia_max is None else min(len(yt), mia_max)
    nonmembers = torch.from_numpy(np.sort(rng.choice(len(yt), n_nonmembers, replace=False)))
    n_members = min(len(yt), len(split.retain_idx), n_nonmembers)
    members = torch.from_numpy(np.sort(rng.choice(split.retain_idx, n_members, replace=False)))
    lm = predict(model, dataset.x_train[members])
    out["mia_efficacy"] = mia_efficacy(
        correct_class_confidence(lf, yf),
        correct_class_confidence(lm, dataset.y_train[members]),
        correct_class_confidence(lt[nonmembers], yt[nonmembers]),
    )
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
