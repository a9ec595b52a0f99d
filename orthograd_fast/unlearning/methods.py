"""Unlearning methods: OrthoGrad, its mean ablation and the usual baselines.

Every method is a stepper: ``step(forget_batch, retain_batch) -> stats`` updates the
model in place with one optimizer step (SGD, lr ``lr``, momentum ``momentum``), clips the
update to ``max_grad_norm`` and raises ``NonFiniteGradientError`` *before* stepping when a
loss or the update is NaN/Inf. CE = the task's loss, averaged over the batch rows: mean
cross-entropy for classification (or the mean of ``loss_fn``), the mean per-sequence
token NLL for ``task="lm"`` (``orthograd_fast.unlearning.tasks``). Batches arrive as
prepared (x, y) pairs, forget and retain aligned (the runner does it).

* ``orthograd``: ascend CE(D_f) orthogonally to every per-sample retain gradient, plus
  α·descent on the mean retain gradient (:class:`~orthograd_fast.orthograd.OrthoGrad`).
* ``orthograd_mean``: the same, projecting against the *mean* retain gradient only (the
  paper's unstable ablation).
* ``neggrad``: gradient ascent, loss −CE(forget).
* ``neggrad_plus``: α·CE(retain) − (1−α)·CE(forget) (SCRUB's NegGrad+).
* ``finetune``: CE(retain) only (forgetting by catastrophic forgetting).
* ``random_label``: CE on forget samples relabelled uniformly among the *other* classes,
  concatenated with the retain batch (SalUn's RL). Classification with class-index
  targets only.
* ``scrub``: teacher = frozen copy of the model at the start, student = the model. Each
  step: a max-step on the forget batch (ascend KL(teacher ‖ student), temperature T)
  while step < ``msteps`` (None: always), then a min-step on the retain batch,
  γ·CE + β·KL(teacher ‖ student) (SCRUB's notebook: γ 0.99, β 0.001, T 4).
  Classification only (KL over the classes of (N, C) logits).
* ``retrain``: re-initialise and train on the retain loader (the oracle; run by
  :func:`orthograd_fast.unlearn`, not a stepper).

``DEFAULTS`` holds the step size, clip and step budget each method ships with; they were
tuned on digits class forgetting with a 64-sample retain set (the demo).
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from ..batches import call, cat_rows
from ..orthograd import NonFiniteGradientError, OrthoGrad
from .losses import distill_kl, logits_of
from .tasks import Classification, Task

METHODS = (
    "retrain", "orthograd", "orthograd_mean", "neggrad", "neggrad_plus",
    "finetune", "random_label", "scrub",
)

# lr, max_grad_norm and step budget per method (digits MLP; see module doc).
DEFAULTS: dict[str, dict] = {
    "orthograd": {"lr": 0.1, "max_grad_norm": 1.0, "steps": 300},
    "orthograd_mean": {"lr": 0.1, "max_grad_norm": 1.0, "steps": 300},
    "neggrad": {"lr": 0.1, "max_grad_norm": 1.0, "steps": 300},
    "neggrad_plus": {"lr": 0.1, "max_grad_norm": 1.0, "steps": 300},
    "finetune": {"lr": 0.1, "max_grad_norm": 1.0, "steps": 300},
    "random_label": {"lr": 0.1, "max_grad_norm": 1.0, "steps": 300},
    "scrub": {"lr": 0.1, "max_grad_norm": 1.0, "steps": 300},
    "retrain": {"lr": 0.05, "max_grad_norm": None, "epochs": 30},
}


#: optimizer names of ``unlearn(..., optimizer=...)`` (or pass a callable(params, lr) -> Optimizer)
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _make_optimizer(factory, params: list, lr: float) -> torch.optim.Optimizer:
    """``factory(params, lr)``: the caller's optimizer over the trainable parameters, e.g.
    ``lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)`` (an
    optimizer class such as ``torch.optim.Adagrad`` works as is). A callable that cannot
    take the two arguments is refused with the signature it needs."""
    try:
        inspect.signature(factory).bind(params, lr)
    except TypeError as e:
        name = getattr(factory, "__name__", factory)
        raise ValueError(
            f"optimizer={name!r} cannot be called as optimizer(params, lr) ({e}): a callable optimizer gets "
            "the list of trainable parameters and the learning rate and returns a torch.optim.Optimizer, e.g. "
            "lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)"
        ) from None
    except ValueError:  # no signature to inspect (a builtin): call it and see
        pass
    opt = factory(params, lr)
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"optimizer(params, lr) returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True): nothing to unlearn")
    return params


def _check_finite_loss(loss: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(loss)):
        raise NonFiniteGradientError(f"non-finite {what} loss ({float(loss.detach())}): the model diverged")


class Method:
    """Base stepper: an optimizer on the trainable parameters (``optimizer``: "sgd" with
    ``momentum``/``weight_decay``, "adam", "adamw", or a callable ``optimizer(params, lr) ->
    torch.optim.Optimizer`` called with the list of trainable parameters and the step size;
    OrthoGrad makes the step of each orthogonal, orthograd.py "Optimizer-aware");
    subclasses define ``step``.

    task: the :class:`~orthograd_fast.unlearning.tasks.Task` (default classification);
    ``self.net`` is the module the steps call with a batch's x (the model, or the task's
    adapter around it)."""

    name = "method"

    def __init__(self, model: nn.Module, *, lr: float, max_grad_norm: float | None = 1.0,
                 momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0, task: Task | None = None,
                 optimizer="sgd"):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not (callable(optimizer) or optimizer in OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable(params, lr) -> "
                             f"torch.optim.Optimizer, got {optimizer!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
        self.task = Classification() if task is None else task
        self.task.check_method(self.name)
        self.model = model
        self.net = self.task.wrap(model)
        self.params = _trainable(model)
        if callable(optimizer):
            self.optimizer = _make_optimizer(optimizer, self.params, lr)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            if momentum:
                raise ValueError(f"momentum is an SGD option; {optimizer} has betas")
            self.optimizer = OPTIMIZERS[optimizer](self.params, lr=lr, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def _loss(self, batch) -> tuple[torch.Tensor, object]:
        """(mean row loss, raw output) of the model on a prepared batch (x, y)."""
        out = call(self.net, batch[0])
        return self.task.row_losses(out, batch[1]).mean(), out

    def _apply(self, loss: torch.Tensor, what: str = "unlearning") -> float:
        _check_finite_loss(loss, what)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.params if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf")))
        if not torch.isfinite(torch.tensor(norm)):
            raise NonFiniteGradientError(f"the {self.name} update has a non-finite norm ({norm})")
        self.optimizer.step()
        return norm

    def step(self, forget_batch, retain_batch) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        """Release hooks/resources (no-op for plain methods)."""


class NegGrad(Method):
    """Gradient ascent on the forget batch: loss −CE(forget)."""

    name = "neggrad"
    uses_retain = False

    def step(self, forget_batch, retain_batch) -> dict:
        lf, _ = self._loss(forget_batch)
        norm = self._apply(-lf)
        return {"forget_loss": float(lf.detach()), "grad_norm": norm}


class NegGradPlus(Method):
    """α·CE(retain) − (1−α)·CE(forget)."""

    name = "neggrad_plus"

    def __init__(self, model, *, alpha: float = 0.5, **kw):
        super().__init__(model, **kw)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.alpha = alpha

    def step(self, forget_batch, retain_batch) -> dict:
        lf, _ = self._loss(forget_batch)
        lr, _ = self._loss(retain_batch)
        norm = self._apply(self.alpha * lr - (1 - self.alpha) * lf)
        return {"forget_loss": float(lf.detach()), "retain_loss": float(lr.detach()), "grad_norm": norm}


class Finetune(Method):
    """CE(retain) only."""

    name = "finetune"

    def step(self, forget_batch, retain_batch) -> dict:
        lr, _ = self._loss(retain_batch)
        norm = self._apply(lr)
        return {"retain_loss": float(lr.detach()), "grad_norm": norm}


class RandomLabel(Method):
    """CE over [forget with random other-class labels; retain]."""

    name = "random_label"

    def step(self, forget_batch, retain_batch) -> dict:
        xf, yf = forget_batch[0], forget_batch[1]
        xr, yr = retain_batch[0], retain_batch[1]
        if yf.dim() != 1 or yf.is_floating_point():
            raise ValueError(f"random_label needs class-index targets (N,), got {yf.dtype} {tuple(yf.shape)}")
        out = call(self.net, cat_rows(xf, xr))
        C = logits_of(out).shape[1]
        if C < 2:
            raise ValueError("random_label needs at least 2 classes")
        shift = torch.randint(1, C, yf.shape, generator=self.generator).to(yf.device)
        y_rand = (yf + shift) % C
        loss = self.task.row_losses(out, torch.cat([y_rand, yr])).mean()
        norm = self._apply(loss)
        return {"loss": float(loss.detach()), "grad_norm": norm}


class Scrub(Method):
    """SCRUB: max-steps on forget (ascend KL to the teacher), min-steps on retain."""

    name = "scrub"

    def __init__(self, model, *, T: float = 4.0, gamma: float = 0.99, beta: float = 0.001,
                 msteps: int | None = None, **kw):
        super().__init__(model, **kw)
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = self.task.wrap(teacher)
        self.T, self.gamma, self.beta, self.msteps = T, gamma, beta, msteps

    def step(self, forget_batch, retain_batch) -> dict:
        stats = {}
        if self.msteps is None or self.steps < self.msteps:
            xf = forget_batch[0]
            with torch.no_grad():
                tf = logits_of(call(self.teacher, xf))
            kl_f = distill_kl(logits_of(call(self.net, xf)), tf, self.T)
            stats["forget_kl"] = float(kl_f.detach())
            self._apply(-kl_f, "SCRUB max-step")
        xr = retain_batch[0]
        with torch.no_grad():
            tr = logits_of(call(self.teacher, xr))
        ce, out = self._loss(retain_batch)
        loss = self.gamma * ce + self.beta * distill_kl(logits_of(out), tr, self.T)
        stats["grad_norm"] = self._apply(loss, "SCRUB min-step")
        stats["retain_loss"] = float(ce.detach())
        self.steps += 1
        return stats


class OrthoGradMethod(Method):
    """OrthoGrad (see :class:`~orthograd_fast.orthograd.OrthoGrad`) with the method's optimizer
    (``optimizer``: "sgd", "adam", "adamw", or a callable(params, lr) -> Optimizer; any other optimizer's
    step is projected with ``project_step=True``), the task's per-row losses as its loss, the
    step in eval mode unless ``eval_mode=False``; ``measure=True`` measures every step's
    orthogonality on the actual weight change."""

    name = "orthograd"
    retain_grads = "per_sample"

    def __init__(self, model, *, alpha: float = 0.0, granularity: str = "global",
                 rtol: float | None = None, backend: str = "auto", engine=None, eval_mode: bool = True,
                 project_step: bool = False, measure: bool = False, **kw):
        max_grad_norm = kw.get("max_grad_norm")
        super().__init__(model, **kw)
        self.og = OrthoGrad(
            self.net, self.optimizer, loss_fn=self.task.row_losses, granularity=granularity, alpha=alpha,
            retain_grads=self.retain_grads, rtol=rtol, max_grad_norm=max_grad_norm,
            backend=backend, engine=engine, eval_mode=eval_mode, project_step=project_step, measure=measure,
        )

    def step(self, forget_batch, retain_batch) -> dict:
        return self.og.step(forget_batch, retain_batch)

    def close(self) -> None:
        self.og.close()


class OrthoGradMean(OrthoGradMethod):
    """OrthoGrad projecting against the mean retain gradient only (the paper's ablation)."""

    name = "orthograd_mean"
    retain_grads = "mean"


STEPPERS: dict[str, type[Method]] = {
    "orthograd": OrthoGradMethod,
    "orthograd_mean": OrthoGradMean,
    "neggrad": NegGrad,
    "neggrad_plus": NegGradPlus,
    "finetune": Finetune,
    "random_label": RandomLabel,
    "scrub": Scrub,
}
_NOT_OPTIONS = ("task",)  # passed by the runner, not a user option


def method_options(name: str) -> list[str]:
    """Keyword options a method accepts (beyond the budget/stop arguments of ``unlearn``)."""
    if name == "retrain":
        return ["lr", "momentum", "weight_decay"]
    cls = STEPPERS[name]
    opts = []
    for klass in cls.__mro__:
        if klass in (object,):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind == p.KEYWORD_ONLY and p.name not in opts and p.name not in _NOT_OPTIONS:
                opts.append(p.name)
    return opts


def check_method(name: str) -> str:
    """Validate a method name (ValueError listing the choices)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return name


def make_method(name: str, model: nn.Module, *, task: Task | None = None, **kw) -> Method:
    """Instantiate the stepper ``name`` on ``model`` (ValueError on unknown names/options)."""
    check_method(name)
    if name == "retrain":
        raise ValueError("retrain is not a stepper: call orthograd_fast.unlearn(..., method='retrain')")
    allowed = method_options(name)
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} got unknown option(s) {unknown}; it accepts {allowed}")
    return STEPPERS[name](model, task=task, **kw)
