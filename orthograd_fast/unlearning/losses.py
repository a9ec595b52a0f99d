"""Losses of the unlearning methods.

* ``distill_kl``: SCRUB's distillation loss KL(teacher_T ‖ student_T)·T², batch mean.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(teacher_T ‖ student_T)·T², batch mean (SCRUB's DistillKL). Logits (N, C)."""
    return F.kl_div(
        F.log_softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1), reduction="batchmean"
    ) * T * T
