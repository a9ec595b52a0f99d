"""The unlearning toolkit, built on the core's public API (OrthoGrad, SampleGram).

    runner.py     unlearn() and run_unlearning(): the NeurIPS-2023 challenge entry point,
                  stopping rules, NaN roll-back (``orthograd_fast.unlearn`` is this unlearn)
    methods.py    the steppers: orthograd, orthograd_mean and the baselines
    tasks.py      how batches reach the model and become per-row losses: classification
                  (any loss_fn, outputs with .logits), causal language models (task="lm")
    losses.py     the losses: cross-entropy, per-sequence token NLL, SCRUB's KL
    metrics.py    UA, RA, TA, MIA efficacy, loss-MIA AUC, UIS, AUS, Avg. Gap
    datasets/     one file per data set, registered by name (``--data``)
    models/       one file per model, registered by name (``--model``)
    splits.py     forgetting splits (class / random) and the loaders the methods see
    training.py   the original and retrain models: recipe, training, disk cache
    cli.py        the ``orthograd-fast`` command (``compare``, ``unlearn``)
    plots.py      the figures of a ``compare`` run
    demo.py       the projection demo on real gradients (``make demo``)
"""
from .runner import StopRule, UnlearnResult, run_unlearning, unlearn
from .tasks import CausalLM, Classification, Task

__all__ = ["unlearn", "run_unlearning", "UnlearnResult", "StopRule", "Task", "Classification", "CausalLM"]
