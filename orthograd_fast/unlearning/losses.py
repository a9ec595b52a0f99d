"""Losses of the unlearning methods, per row (the form OrthoGrad needs) and as batch means.

* ``logits_of(out)``: a model's output as logits: the tensor itself, ``out.logits`` (a
  Hugging Face ``ModelOutput`` or any object with a ``logits`` tensor) or ``out["logits"]``.
* ``cross_entropy_rows(logits (N, C), targets (N,)) -> (N,)``: per-sample cross-entropy;
  targets checked first (class indices in [0, C), or probabilities (N, C):
  ``orthograd_fast.batches.class_target_problem``), ValueError naming the fix.
* ``token_nll_rows(logits (N, T, V), labels (N, T)) -> (N,)``: the causal language-model
  loss of each sequence: the mean next-token negative log-likelihood over the sequence's
  labelled tokens. Token t predicts label t+1 (logits[:, :-1] against labels[:, 1:], the
  Hugging Face convention where labels are the input ids); labels equal to
  ``ignore_index`` (-100: padding, prompt tokens) count neither in the sum nor in the
  mean. A sequence with no labelled token has no loss: ValueError.
* ``token_correct(logits, labels) -> (correct, total)``: next-token top-1 hits over the
  labelled tokens (the language-model "accuracy" of the stopping rules).
* ``distill_kl``: SCRUB's distillation loss KL(teacher_T ‖ student_T)·T², batch mean.

Rows are sequences for a language model: OrthoGrad's retain "samples" are whole
sequences, and the forget loss is the mean of the per-sequence losses (each sequence
weighs the same whatever its length).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import batches as _batches

IGNORE_INDEX = -100


def logits_of(out) -> torch.Tensor:
    """The logits of a model output: ``out`` if it is a tensor, else ``out.logits`` or ``out["logits"]``."""
    logits = _batches.logits_of(out)
    if logits is None:
        raise ValueError(
            f"the model returned {type(out).__name__}; unlearning needs logits: a tensor, an "
            "object with a .logits tensor (Hugging Face ModelOutput) or a dict with 'logits'; or pass "
            "loss_fn(outputs, targets) -> per-sample losses (N,)"
        )
    return logits


def cross_entropy_rows(out, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (N,) of logits (N, C) (or an output with ``.logits``); the
    targets checked first (module doc)."""
    logits = logits_of(out)
    problem = _batches.class_target_problem(logits, targets, ignore_index=None)
    if problem is not None:
        raise ValueError(f"the default loss (cross-entropy): {problem}")
    return F.cross_entropy(logits, targets, reduction="none")


def _shifted(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"a language-model loss needs logits (N, T, vocab) and labels (N, T); got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    pred, tgt = logits[:, :-1], labels[:, 1:]  # [N, T-1, V], [N, T-1]
    valid = tgt != ignore_index
    vocab = logits.shape[-1]
    bad = valid & ((tgt < 0) | (tgt >= vocab))
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        raise ValueError(
            f"labels of sequence {row} hold {int(tgt[bad][0])}, outside the vocabulary "
            f"[0, {vocab}) and not ignore_index {ignore_index}"
        )
    return pred, tgt, valid


def token_nll_rows(out, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token NLL of each sequence (N,), over its labelled tokens (module doc)."""
    pred, tgt, valid = _shifted(logits_of(out), labels, ignore_index)
    count = valid.sum(1)  # [N]
    if bool((count == 0).any()):
        row = int((count == 0).nonzero()[0, 0])
        raise ValueError(
            f"sequence {row} has no labelled token to predict (all labels after the first are "
            f"{ignore_index} or it is one token long): it has no language-model loss"
        )
    nll = F.cross_entropy(pred.flatten(0, 1), tgt.flatten(), ignore_index=ignore_index, reduction="none")
    return nll.view(tgt.shape).sum(1) / count.to(nll.dtype)


@torch.no_grad()
def token_correct(out, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """(top-1 next-token hits, labelled tokens) over a batch of sequences."""
    pred, tgt, valid = _shifted(logits_of(out), labels, ignore_index)
    return int(((pred.argmax(-1) == tgt) & valid).sum()), int(valid.sum())


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(teacher_T ‖ student_T)·T², batch mean (SCRUB's DistillKL). Logits (N, C)."""
    return F.kl_div(
        F.log_softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1), reduction="batchmean"
    ) * T * T
