"""The runner behind ``unlearn``: the NeurIPS-2023 unlearning-challenge entry point, with stopping rules.

    unlearn(model, retain_loader, forget_loader, val_loader=None, *, method="orthograd",
            steps=None, epochs=None, lr=None, stop=None, task="classification",
            loss_fn=None, pad_id=None, return_result=False, **method_kw) -> model

The model is modified **in place** and returned (the challenge signature); pass a copy to
keep the original. ``return_result=True`` returns an :class:`UnlearnResult` instead (the
model, why the run stopped, the evaluation history, the final metrics, the time).

Promises:

* nothing of the model changes before every check has passed: arguments, the method's
  options, the first batch of each loader, the model's weights and outputs at step 0;
  if anything raises during the run, the weights and buffers of the last evaluated good
  step are restored (the model as passed in, when that is step 0) before the error
  propagates;
* each module's train/eval mode comes back as it was (module by module: a model with
  BatchNorm frozen in eval inside a training model stays so); OrthoGrad's own step runs
  in eval mode (``OrthoGrad(eval_mode=True)``, ``orthograd_fast.modes``), the baselines in
  train mode;
* the caller's global RNG (CPU, and the CUDA devices the model is on) is not changed: the
  whole run, loader iteration included, runs inside ``torch.random.fork_rng``, seeded
  with ``seed`` before the first step.

Batches and losses (``task``, see ``orthograd_fast.unlearning.tasks``):
``"classification"`` (default): loaders yield (inputs, targets) batches (inputs a tensor,
or a tuple of tensors passed as ``model(*inputs)``) or dicts with ``labels`` (a collator's
batch, the model called as ``model(**other entries)``; ``orthograd_fast.batches``); loss
``loss_fn(outputs, targets) -> (N,)`` per-sample losses, default cross-entropy on the
logits (a tensor or an output's ``.logits``, as Hugging Face models return). ``"lm"``:
causal language models, rows = sequences: loaders yield dicts with ``input_ids`` (and
``attention_mask``, ``labels``) or tuples; loss = mean next-token NLL of each sequence,
labels == -100 ignored; forget and retain batches of different lengths are padded on the
right with ``pad_id`` (exact for a causal model). Every batch is checked: NaN/Inf in the
data is reported as such, and forget/retain inputs whose shapes cannot be aligned are
refused with both shapes named.

A step draws the next forget batch and the next retain batch (both loaders cycle,
reshuffling as they are built to) and calls the method's stepper
(``orthograd_fast.unlearning.methods``). Budget: ``steps``, else ``epochs`` passes over
the forget loader, else the method's default.

Stopping (``StopRule``), checked every ``eval_every`` steps on the *whole* forget loader
and the val loader (accuracy = class accuracy, or next-token accuracy for ``task="lm"``):

* forget accuracy ≤ ``forget_target`` -> stop. "auto": class forgetting (no forget label
  occurs in the retain loader) -> 0.0, the retrain level; otherwise (random forgetting,
  language models) -> the original model's val accuracy (the paper's rule, val standing
  in for test) when a val loader is given, else no target;
* ``max_val_drop``: val accuracy below (start − max_val_drop) -> stop and restore the last
  evaluated weights that were within budget;
* the step budget;
* NaN/Inf in a loss, the Gram or an update (detected before the optimizer steps), or in the
  weights or forget-set outputs after a step -> stop, restore the last good (evaluated)
  weights, warn (RuntimeWarning).

``method="retrain"`` re-initialises the model and trains it on the retain loader for
``epochs`` (SGD, momentum 0.9, wd 5e-4, cosine lr): the oracle when that loader holds all
of D_r. It ignores the forget loader and the stopping rules, and refuses (before any
change) a model with a trainable parameter that no ``reset_parameters`` re-initialises.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..batches import call, check_dtype, param_dtype
from ..modes import eval_modes, module_modes, restore_modes
from . import methods as _methods
from .tasks import Task, make_task
from .training import reinitialize, uninitializable


@dataclass
class StopRule:
    """When to stop (module doc). forget_target: float, "auto", "val" (original val acc) or
    None; max_val_drop: allowed drop of val accuracy (fraction), None = no budget;
    eval_every: evaluate every this many steps."""

    forget_target: float | str | None = "auto"
    max_val_drop: float | None = None
    eval_every: int = 1

    def __post_init__(self):
        t = self.forget_target
        if not (t is None or t in ("auto", "val") or (isinstance(t, (int, float)) and 0 <= t <= 1)):
            raise ValueError(f"forget_target must be a fraction in [0, 1], 'auto', 'val' or None, got {t!r}")
        if self.max_val_drop is not None and not 0 <= self.max_val_drop <= 1:
            raise ValueError(f"max_val_drop must be a fraction in [0, 1] or None, got {self.max_val_drop!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be a positive int, got {self.eval_every!r}")


# a step's own losses (its batches, before the step) beside the evaluated ones (whole loaders, after)
_STAT_KEYS = {"forget_loss": "batch_forget_loss", "retain_loss": "batch_retain_loss"}
STOPPED_BY = ("target", "already_at_target", "budget", "val_drop", "non_finite", "trained")


@dataclass
class UnlearnResult:
    """What a run did (``unlearn(..., return_result=True)``).

    model: the unlearned model (the one passed in, modified in place). method, task: names.
    steps: optimizer steps whose weights the model holds (after a roll-back: the restored
    step). stop_reason: why it ended, in words; stopped_by: the same as a key of
    ``STOPPED_BY`` ("target", "already_at_target", "budget", "val_drop", "non_finite";
    retrain: "trained"). seconds: wall time without the monitor. history: one dict per
    evaluation: step, forget_acc and forget_loss (mean per-row loss) over the whole forget
    loader after the step, val_acc/val_loss with a val loader, the step's numeric stats
    (e.g. OrthoGrad's rank, orthogonality; its batch losses before the step as
    batch_forget_loss, batch_retain_loss), and the monitor's values (retrain: step and
    retain_loss per epoch). metrics: the evaluation of
    the weights the model holds at the end (a history entry). restored: weights were
    rolled back. forget_target: the accuracy target in force (None: no target).
    """

    model: nn.Module
    method: str
    steps: int
    stop_reason: str
    seconds: float
    history: list[dict] = field(default_factory=list)
    restored: bool = False
    forget_target: float | None = None
    task: str = "classification"
    stopped_by: str = "budget"
    metrics: dict = field(default_factory=dict)


def _cycle(loader, what: str):
    """(batch index, batch) forever, pass after pass."""
    while True:
        got = False
        for i, batch in enumerate(loader):
            got = True
            yield i, batch
        if not got:
            raise ValueError(f"the {what} loader yielded no batches")


@torch.no_grad()
def evaluate_loader(net: nn.Module, loader, task: Task, what: str) -> dict:
    """Mean accuracy and loss of ``net`` over every batch of ``loader``, in eval mode (each
    module's mode restored after). Returns {acc (None if the task has none), loss (mean
    per-row loss), finite (every loss and logit finite), rows}; ValueError on bad data."""
    correct = total = rows = 0
    loss_sum, finite, has_acc = 0.0, True, True
    dtype = param_dtype(net)
    with eval_modes(net):
        for i, batch in enumerate(loader):
            x, y = task.prepare(batch, f"{what} loader, batch {i}")
            check_dtype(x, dtype, f"{what} loader, batch {i}")
            out = call(net, x)
            losses = task.row_losses(out, y)
            finite = finite and bool(torch.isfinite(losses).all())
            logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
            if isinstance(logits, torch.Tensor):
                finite = finite and bool(torch.isfinite(logits).all())
            loss_sum += float(losses.double().sum())
            rows += losses.shape[0]
            counts = task.accuracy_counts(out, y) if has_acc else None
            if counts is None:
                has_acc = False
            else:
                correct, total = correct + counts[0], total + counts[1]
    acc = (correct / total if total else float("nan")) if has_acc else None
    return {"acc": acc, "loss": loss_sum / rows if rows else float("nan"), "finite": finite, "rows": rows}


def loader_accuracy(model: nn.Module, loader, *, return_finite: bool = False, task: Task | None = None):
    """Accuracy of ``model`` over every batch of ``loader`` (eval mode, each module's mode
    restored after); ``task`` default classification.

    return_finite: also return whether every output was finite (a diverged model can have
    finite weights and still produce Inf/NaN logits)."""
    task = make_task("classification", model) if task is None else task
    r = evaluate_loader(task.wrap(model), loader, task, "the")
    return (r["acc"], r["finite"]) if return_finite else r["acc"]


def _labels(loader, task: Task, what: str) -> set[int] | None:
    out: set[int] = set()
    for i, batch in enumerate(loader):
        labels = task.class_labels(task.prepare(batch, f"{what} loader, batch {i}")[1])
        if labels is None:
            return None
        out |= labels
    return out


def _check_loader(loader, what: str) -> None:
    if loader is None:
        raise ValueError(f"{what} loader is required")
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError):
        n = None
    if n == 0:
        raise ValueError(f"the {what} set is empty")


def _explain_mismatch(task: Task, forget_loader, retain_loader, error: Exception) -> None:
    """Raise the task's alignment error for the first forget and retain batches, if they
    cannot be aligned (called when the model fails on the forget data)."""
    try:
        forget = task.prepare(next(iter(forget_loader)), "forget loader, batch 0")
        retain = task.prepare(next(iter(retain_loader)), "retain loader, batch 0")
    except (StopIteration, ValueError):
        return
    try:
        task.align(forget, retain)
    except ValueError as mismatch:
        raise mismatch from error


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers())
                   if t.device.type == "cuda"})


def _as_stop(stop) -> StopRule:
    if isinstance(stop, StopRule):
        return stop
    if isinstance(stop, dict):
        return StopRule(**stop)
    if stop is None or isinstance(stop, str):
        return StopRule() if stop is None else StopRule(forget_target=stop)
    if isinstance(stop, (int, float)) and not isinstance(stop, bool):
        return StopRule(forget_target=float(stop))
    raise ValueError(f"stop must be a StopRule, a dict, a target forget accuracy or None, got {stop!r}")


def run_unlearning(
    model: nn.Module,
    retain_loader,
    forget_loader,
    val_loader=None,
    *,
    method: str = "orthograd",
    steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    stop: StopRule | dict | float | None = None,
    task: str | Task = "classification",
    loss_fn: Callable | None = None,
    pad_id: int | None = None,
    max_grad_norm: float | None | str = "default",
    seed: int = 0,
    monitor: Callable[[nn.Module], dict] | None = None,
    progress: bool = False,
    **method_kw,
) -> UnlearnResult:
    """:func:`unlearn` returning an :class:`UnlearnResult` (history, stop reason, metrics, time).

    monitor(model) -> dict: called at every evaluation, its values recorded in the history
    (e.g. test accuracy for plots); never used for decisions and not timed.
    """
    _methods.check_method(method)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, v in (("steps", steps), ("epochs", epochs)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ValueError(f"{name} must be positive, got {v!r}")
    if steps is not None:
        if not isinstance(steps, numbers.Integral):
            raise ValueError(f"steps must be an int, got {steps!r}")
        steps = int(steps)
    if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    task = make_task(task, model, loss_fn=loss_fn, pad_id=pad_id)
    task.check_method(method)
    defaults = _methods.DEFAULTS[method]
    lr = defaults["lr"] if lr is None else float(lr)
    if max_grad_norm == "default":
        max_grad_norm = defaults.get("max_grad_norm")
    _methods._trainable(model)
    _check_loader(retain_loader, "retain")
    if method == "retrain":
        unknown = sorted(set(method_kw) - {"momentum", "weight_decay"})
        if unknown:
            raise ValueError(f"method 'retrain' got unknown option(s) {unknown}; it accepts lr, momentum, weight_decay")
        missing = uninitializable(model)
        if missing:
            raise ValueError(
                f"method 'retrain' cannot re-initialise {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                "no module's reset_parameters() covers them (freeze them, or give their module a "
                "reset_parameters method); the model was not changed"
            )
    else:
        _check_loader(forget_loader, "forget")
        stop = _as_stop(stop)
        if stop.max_val_drop is not None and val_loader is None:
            raise ValueError("stop.max_val_drop needs a val_loader")
        if stop.forget_target == "val" and val_loader is None:
            raise ValueError("stop.forget_target='val' needs a val_loader")
        if steps is None:
            steps = math.ceil(epochs * len(forget_loader)) if epochs is not None else defaults["steps"]

    modes = module_modes(model)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            if method == "retrain":
                return _retrain(model, task, retain_loader, epochs=epochs or defaults["epochs"], steps=steps,
                                lr=lr, seed=seed, progress=progress, **method_kw)
            stepper = _methods.make_method(method, model, task=task, lr=lr, max_grad_norm=max_grad_norm,
                                           seed=seed, **method_kw)
            try:
                return _run(stepper, model, task, retain_loader, forget_loader, val_loader, method=method,
                            steps=steps, stop=stop, seed=seed, monitor=monitor, progress=progress)
            finally:
                stepper.close()
    finally:
        restore_modes(modes)


def _run(stepper, model, task, retain_loader, forget_loader, val_loader, *, method, steps, stop, seed,
         monitor, progress) -> UnlearnResult:
    """The stepping loop of :func:`run_unlearning` (module doc), inside its forked RNG."""
    from tqdm.auto import tqdm

    net = stepper.net
    t_start = time.perf_counter()
    t_monitor = 0.0
    history: list[dict] = []

    def evaluate(step: int, stats: dict) -> dict | None:
        """Record one evaluation; None if the model's outputs are not finite."""
        nonlocal t_monitor
        f = evaluate_loader(net, forget_loader, task, "forget")
        if not f["finite"]:
            return None
        rec = {"step": step, "forget_acc": f["acc"], "forget_loss": f["loss"]}
        if val_loader is not None:
            v = evaluate_loader(net, val_loader, task, "val")
            rec["val_acc"], rec["val_loss"] = v["acc"], v["loss"]
        rec.update({_STAT_KEYS.get(k, k): v for k, v in stats.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if monitor is not None:
            t0 = time.perf_counter()
            rec.update(monitor(model))
            t_monitor += time.perf_counter() - t0
        history.append(rec)
        return rec

    if not _finite_params(model):
        raise ValueError("the model's weights hold NaN or Inf before unlearning")
    try:
        rec = evaluate(0, {})
    except Exception as e:  # the model cannot run on the forget data: is it shaped unlike the retain data?
        _explain_mismatch(task, forget_loader, retain_loader, e)
        raise
    if rec is None:
        raise ValueError("the model's outputs on the (finite) forget set are NaN or Inf before unlearning")
    has_acc = rec["forget_acc"] is not None
    if not has_acc and (isinstance(stop.forget_target, (int, float)) or stop.forget_target == "val"
                        or stop.max_val_drop is not None):
        raise ValueError(
            "the stopping rules need accuracies, which this task cannot compute (targets are not "
            "class indices of (N, C) logits): pass stop={'forget_target': None} (step budget only)"
        )
    val0 = rec.get("val_acc")
    target = stop.forget_target
    if target == "auto":
        forget_labels = _labels(forget_loader, task, "forget") if has_acc else None
        if forget_labels is not None and not (forget_labels & (_labels(retain_loader, task, "retain") or set())):
            target = 0.0
        else:
            target = val0
    elif target == "val":
        target = val0
    if not has_acc:
        target = None

    good, good_step, good_rec = _snapshot(model), 0, rec
    reason, stopped_by, restored, done = "step budget", "budget", False, 0
    if target is not None and rec["forget_acc"] <= target:
        reason = f"forget acc {rec['forget_acc']:.4f} <= target {target:.4f} before any step"
        stopped_by, steps = "already_at_target", 0

    forget_it, retain_it = _cycle(forget_loader, "forget"), _cycle(retain_loader, "retain")
    dtype = param_dtype(model)
    model.train()
    torch.manual_seed(seed)  # loaders without their own generator shuffle from this
    try:
        with tqdm(total=steps, desc=method, disable=None if progress else True, leave=False, unit="step") as bar:
            for step in range(1, steps + 1):
                (i, fb), (j, rb) = next(forget_it), next(retain_it)
                fb = task.prepare(fb, f"forget loader, batch {i}")
                rb = task.prepare(rb, f"retain loader, batch {j}")
                check_dtype(rb[0], dtype, f"retain loader, batch {j}")
                fb, rb = task.align(fb, rb)
                try:
                    stats = stepper.step(fb, rb)
                except FloatingPointError as e:
                    model.load_state_dict(good)
                    reason = f"stopped at step {step}: {e}; restored the weights of step {good_step}"
                    warnings.warn(f"{method}: {reason}", RuntimeWarning, stacklevel=3)
                    stopped_by, restored, done = "non_finite", True, good_step
                    break
                done = step
                bar.update(1)
                if step % stop.eval_every and step != steps:
                    continue
                rec = evaluate(step, stats) if _finite_params(model) else None
                if rec is None:
                    model.load_state_dict(good)
                    reason = (f"non-finite weights or outputs after step {step} (diverged: lower lr or set "
                              f"max_grad_norm); restored the weights of step {good_step}")
                    warnings.warn(f"{method}: {reason}", RuntimeWarning, stacklevel=3)
                    stopped_by, restored, done = "non_finite", True, good_step
                    break
                if has_acc:
                    bar.set_postfix(forget_acc=f"{rec['forget_acc']:.3f}", refresh=False)
                if stop.max_val_drop is not None and rec["val_acc"] < val0 - stop.max_val_drop:
                    model.load_state_dict(good)
                    reason = (f"val acc {rec['val_acc']:.4f} fell more than {stop.max_val_drop} below "
                              f"{val0:.4f} at step {step}; restored the weights of step {good_step}")
                    stopped_by, restored, done = "val_drop", True, good_step
                    break
                good, good_step, good_rec = _snapshot(model), step, rec
                if target is not None and rec["forget_acc"] <= target:
                    reason = f"forget acc {rec['forget_acc']:.4f} <= target {target:.4f}"
                    stopped_by = "target"
                    break
    except BaseException:
        model.load_state_dict(good)  # the last evaluated good weights (step 0: as passed in)
        raise
    seconds = time.perf_counter() - t_start - t_monitor
    return UnlearnResult(model, method, done, reason, seconds, history, restored,
                         None if target is None else float(target), task.name, stopped_by, dict(good_rec))


def _retrain(model, task, retain_loader, *, epochs, steps, lr, seed, progress,
             momentum: float = 0.9, weight_decay: float = 5e-4) -> UnlearnResult:
    """Re-initialise and train on the retain loader (module doc), inside the run's forked RNG."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    net = task.wrap(model)
    first = next(iter(_cycle(retain_loader, "retain")))[1]
    # the data is checked before the model changes
    check_dtype(task.prepare(first, "retain loader, batch 0")[0], param_dtype(model), "retain loader, batch 0")
    original = _snapshot(model)
    try:
        reinitialize(model, seed)
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            per_epoch = max(len(retain_loader), 1)
        except TypeError:
            per_epoch = sum(1 for _ in retain_loader)
        total = steps if steps is not None else math.ceil(epochs * per_epoch)
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
        model.train()
        it = _cycle(retain_loader, "retain")
        history = []
        torch.manual_seed(seed)
        bar = tqdm(range(1, total + 1), desc="retrain", disable=None if progress else True, leave=False, unit="step")
        for step in bar:
            i, batch = next(it)
            x, y = task.prepare(batch, f"retain loader, batch {i}")
            loss = task.row_losses(call(net, x), y).mean()
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"retrain diverged at step {step} (loss {float(loss.detach())}); lower lr; "
                                         "the model's original weights were restored")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % per_epoch == 0 or step == total:
                history.append({"step": step, "retain_loss": float(loss.detach())})
    except BaseException:
        model.load_state_dict(original)
        raise
    return UnlearnResult(model, "retrain", total, "trained from scratch on the retain loader",
                         time.perf_counter() - t0, history, task=task.name, stopped_by="trained",
                         metrics=dict(history[-1]) if history else {})


def unlearn(
    model: nn.Module,
    retain_loader,
    forget_loader,
    val_loader=None,
    *,
    method: str = "orthograd",
    steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    stop: StopRule | dict | float | None = None,
    task: str | Task = "classification",
    loss_fn: Callable | None = None,
    pad_id: int | None = None,
    return_result: bool = False,
    **method_kw,
):
    """Unlearn ``forget_loader`` from ``model`` in place and return it (module doc).

    method: one of ``orthograd_fast.unlearning.methods.METHODS``. steps/epochs: budget
    (epochs = passes over the forget loader; retrain: over the retain loader). lr: step
    size (None: the method's default). stop: a :class:`StopRule`, a dict of its fields, a
    target forget accuracy, or None (``StopRule()``). task: "classification", "lm" (causal
    language models, rows = sequences) or a ``tasks.Task``. loss_fn(outputs, targets) ->
    per-row losses (N,) (default: cross-entropy; "lm": mean token NLL per sequence).
    pad_id: token id that pads sequences for "lm" (default: the model's config).
    return_result: return an :class:`UnlearnResult` instead of the model. method_kw: the
    method's options (e.g. ``alpha``, ``granularity``, ``max_grad_norm``, ``seed``,
    ``monitor``, ``progress``; orthograd: ``eval_mode``, ``project_step``, ``measure``), among
    them ``optimizer``: "sgd" (default; ``momentum``, ``weight_decay``), "adam", "adamw", or a
    callable ``optimizer(params, lr) -> torch.optim.Optimizer`` called with the list of
    trainable parameters and ``lr`` (another arity: ValueError).

    Raises ValueError on bad arguments or data, before anything of the model changes.
    """
    if not isinstance(return_result, bool):
        raise ValueError(f"return_result must be True or False, got {return_result!r}")
    res = run_unlearning(
        model, retain_loader, forget_loader, val_loader, method=method, steps=steps,
        epochs=epochs, lr=lr, stop=stop, task=task, loss_fn=loss_fn, pad_id=pad_id, **method_kw,
    )
    return res if return_result else res.model
