"""The runner behind ``unlearn``: the NeurIPS-2023 unlearning-challenge entry point, with stopping rules.

    unlearn(model, retain_loader, forget_loader, val_loader=None, *, method="orthograd",
            steps=None, epochs=None, lr=None, stop=None, **method_kw) -> model

The model is modified **in place** and returned (the challenge signature); pass a copy to
keep the original. Its train/eval mode is restored; the caller's global RNG state is not
changed (the run seeds a forked RNG with ``seed``). Loaders yield (inputs, targets)
batches. A step draws the next forget batch and the next retain batch (both loaders
cycle, reshuffling as they are built to) and calls the method's stepper
(``orthograd_fast.unlearning.methods``). Budget: ``steps``, else ``epochs`` passes over the forget
loader, else the method's default.

Stopping (``StopRule``), checked every ``eval_every`` steps on the *whole* forget loader
and the val loader:

* forget accuracy ≤ ``forget_target`` -> stop. "auto": class forgetting (no forget label
  occurs in the retain loader) -> 0.0, the retrain level; random forgetting -> the
  original model's val accuracy (the paper's rule, val standing in for test) when a val
  loader is given, else no target;
* ``max_val_drop``: val accuracy below (start − max_val_drop) -> stop and restore the last
  evaluated weights that were within budget;
* the step budget;
* NaN/Inf in a loss, the Gram or an update (detected before the optimizer steps), or in the
  weights or forget-set outputs after a step -> stop, restore the last good (evaluated)
  weights, warn (RuntimeWarning).

``method="retrain"`` re-initialises the model and trains it on the retain loader for
``epochs`` (SGD, momentum 0.9, wd 5e-4, cosine lr): the oracle when that loader holds all
of D_r. It ignores the forget loader and the stopping rules.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from . import methods as _methods
from .training import reinitialize


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


@dataclass
class UnlearnResult:
    """What a run did. history: one dict per evaluation (step, forget_acc, val_acc, the last
    step's stats, and the monitor's values); stop_reason: why it ended; seconds: wall time
    of the run without the monitor; restored: weights were rolled back."""

    model: nn.Module
    method: str
    steps: int
    stop_reason: str
    seconds: float
    history: list[dict] = field(default_factory=list)
    restored: bool = False
    forget_target: float | None = None


@torch.no_grad()
def loader_accuracy(model: nn.Module, loader, *, return_finite: bool = False):
    """Accuracy of ``model`` over every batch of ``loader`` (eval mode, restored after).

    return_finite: also return whether every output was finite (a diverged model can have
    finite weights and still produce Inf/NaN logits)."""
    was = model.training
    model.eval()
    correct = total = 0
    finite = True
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            out = model(x)
            finite = finite and bool(torch.isfinite(out).all())
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    finally:
        model.train(was)
    acc = correct / total if total else float("nan")
    return (acc, finite) if return_finite else acc


def _labels(loader) -> set[int]:
    out: set[int] = set()
    for batch in loader:
        out.update(batch[1].reshape(-1).tolist())
    return out


def _loader_len(loader, what: str) -> int:
    if loader is None:
        raise ValueError(f"{what} loader is required")
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError):
        n = sum(len(b[1]) for b in loader)
    if n == 0:
        raise ValueError(f"the {what} set is empty")
    return n


def _cycle(loader):
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise ValueError("a loader yielded no batches")


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
    max_grad_norm: float | None | str = "default",
    seed: int = 0,
    monitor: Callable[[nn.Module], dict] | None = None,
    progress: bool = False,
    **method_kw,
) -> UnlearnResult:
    """:func:`unlearn` returning an :class:`UnlearnResult` (history, stop reason, time).

    monitor(model) -> dict: called at every evaluation, its values recorded in the history
    (e.g. test accuracy for plots); never used for decisions and not timed.
    """
    _methods.check_method(method)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, v in (("steps", steps), ("epochs", epochs)):
        if v is not None and (isinstance(v, bool) or not v > 0):
            raise ValueError(f"{name} must be positive, got {v!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    defaults = _methods.DEFAULTS[method]
    lr = defaults["lr"] if lr is None else float(lr)
    if max_grad_norm == "default":
        max_grad_norm = defaults.get("max_grad_norm")
    _loader_len(retain_loader, "retain")
    if method == "retrain":
        unknown = sorted(set(method_kw) - {"momentum", "weight_decay"})
        if unknown:
            raise ValueError(f"method 'retrain' got unknown option(s) {unknown}; it accepts lr, momentum, weight_decay")
        return _retrain(model, retain_loader, epochs=epochs or defaults["epochs"], steps=steps,
                        lr=lr, seed=seed, progress=progress, **method_kw)
    _loader_len(forget_loader, "forget")
    if isinstance(stop, dict):
        stop = StopRule(**stop)
    elif stop is None or isinstance(stop, str):
        stop = StopRule() if stop is None else StopRule(forget_target=stop)
    elif isinstance(stop, (int, float)) and not isinstance(stop, bool):
        stop = StopRule(forget_target=float(stop))
    elif not isinstance(stop, StopRule):
        raise ValueError(f"stop must be a StopRule, a dict, a target forget accuracy or None, got {stop!r}")
    if stop.max_val_drop is not None and val_loader is None:
        raise ValueError("stop.max_val_drop needs a val_loader")
    if stop.forget_target == "val" and val_loader is None:
        raise ValueError("stop.forget_target='val' needs a val_loader")
    if steps is None:
        steps = math.ceil(epochs * len(forget_loader)) if epochs is not None else defaults["steps"]

    stepper = _methods.make_method(method, model, lr=lr, max_grad_norm=max_grad_norm, seed=seed, **method_kw)
    was_training = model.training
    try:
        t_start = time.perf_counter()
        t_monitor = 0.0
        val0 = loader_accuracy(model, val_loader) if val_loader is not None else None
        target = stop.forget_target
        if target == "auto":
            if not (_labels(forget_loader) & _labels(retain_loader)):
                target = 0.0
            else:
                target = val0
        elif target == "val":
            target = val0
        history: list[dict] = []

        def evaluate(step: int, stats: dict) -> dict | None:
            """Record one evaluation; None if the model's outputs are not finite."""
            nonlocal t_monitor
            acc, finite = loader_accuracy(model, forget_loader, return_finite=True)
            if not finite:
                return None
            rec = {"step": step, "forget_acc": acc}
            if val_loader is not None:
                rec["val_acc"] = loader_accuracy(model, val_loader)
            rec.update({k: v for k, v in stats.items() if isinstance(v, (int, float))})
            if monitor is not None:
                t0 = time.perf_counter()
                rec.update(monitor(model))
                t_monitor += time.perf_counter() - t0
            history.append(rec)
            return rec

        rec = evaluate(0, {})
        if rec is None or not _finite_params(model):
            raise ValueError("the model's weights or outputs on the forget set are not finite before unlearning")
        good, good_step = _snapshot(model), 0
        reason, restored, done = "step budget", False, 0
        if target is not None and rec["forget_acc"] <= target:
            reason = f"forget acc {rec['forget_acc']:.4f} <= target {target:.4f} before any step"
            steps = 0
        from tqdm.auto import tqdm

        forget_it, retain_it = _cycle(forget_loader), _cycle(retain_loader)
        model.train()
        with torch.random.fork_rng(devices=[]), \
                tqdm(total=steps, desc=method, disable=None if progress else True, leave=False, unit="step") as bar:
            torch.manual_seed(seed)  # loaders without their own generator; the caller's RNG is restored
            for step in range(1, steps + 1):
                try:
                    stats = stepper.step(next(forget_it), next(retain_it))
                except FloatingPointError as e:
                    model.load_state_dict(good)
                    reason = f"stopped at step {step}: {e}; restored the weights of step {good_step}"
                    warnings.warn(f"{method}: {reason}", RuntimeWarning, stacklevel=2)
                    restored, done = True, good_step
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
                    warnings.warn(f"{method}: {reason}", RuntimeWarning, stacklevel=2)
                    restored, done = True, good_step
                    break
                bar.set_postfix(forget_acc=f"{rec['forget_acc']:.3f}", refresh=False)
                if stop.max_val_drop is not None and rec["val_acc"] < val0 - stop.max_val_drop:
                    model.load_state_dict(good)
                    reason = (f"val acc {rec['val_acc']:.4f} fell more than {stop.max_val_drop} below "
                              f"{val0:.4f} at step {step}; restored the weights of step {good_step}")
                    restored, done = True, good_step
                    break
                good, good_step = _snapshot(model), step
                if target is not None and rec["forget_acc"] <= target:
                    reason = f"forget acc {rec['forget_acc']:.4f} <= target {target:.4f}"
                    break
        seconds = time.perf_counter() - t_start - t_monitor
    finally:
        stepper.close()
        model.train(was_training)
    return UnlearnResult(model, method, done, reason, seconds, history, restored,
                         None if target is None else float(target))


def _retrain(model, retain_loader, *, epochs, steps, lr, seed, progress,
             momentum: float = 0.9, weight_decay: float = 5e-4) -> UnlearnResult:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    reinitialize(model, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    per_epoch = max(len(retain_loader), 1)
    total = steps if steps is not None else math.ceil(epochs * per_epoch)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    was_training = model.training
    model.train()
    it = _cycle(retain_loader)
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(range(1, total + 1), desc="retrain", disable=None if progress else True, leave=False, unit="step")
        for step in bar:
            x, y = next(it)[:2]
            loss = F.cross_entropy(model(x), y)
            if not bool(torch.isfinite(loss)):
                model.train(was_training)
                raise FloatingPointError(f"retrain diverged at step {step} (loss {float(loss.detach())}); lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % per_epoch == 0 or step == total:
                history.append({"step": step, "retain_loss": float(loss.detach())})
    model.train(was_training)
    return UnlearnResult(model, "retrain", total, "trained from scratch on the retain loader",
                         time.perf_counter() - t0, history)


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
    **method_kw,
) -> nn.Module:
    """Unlearn ``forget_loader`` from ``model`` in place and return it (module doc).

    method: one of ``orthograd_fast.unlearning.methods.METHODS``. steps/epochs: budget (epochs =
    passes over the forget loader; retrain: over the retain loader). lr: step size (None:
    the method's default). stop: a :class:`StopRule`, a dict of its fields, a target forget
    accuracy, or None (``StopRule()``). method_kw: the method's options (e.g. ``alpha``,
    ``granularity``, ``max_grad_norm``, ``seed``, ``monitor``, ``progress``).
    """
    return run_unlearning(
        model, retain_loader, forget_loader, val_loader, method=method, steps=steps,
        epochs=epochs, lr=lr, stop=stop, **method_kw,
    ).model

