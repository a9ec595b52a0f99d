"""What one optimizer step does to the parameters, as a function of the gradient written
into ``.grad``: so that OrthoGrad can choose that gradient to make the *step* orthogonal to
every retain per-sample gradient, not only the gradient (orthograd.py, "Optimizer-aware").

For the optimizers modelled here, one ``optimizer.step()`` moves each parameter by

    Δθ = −P(g) ⊙ (a·g + b) − c                                        (elementwise)

with g the gradient written into ``.grad``, a a scalar, b and c vectors fixed by θ and the
optimizer's state before the step, and P(g) > 0 the step's per-entry size. Read off
torch's own update rules (torch.optim.SGD / Adam / AdamW, single-tensor form; ``foreach``,
``fused`` and ``capturable`` compute the same), with s = −1 under ``maximize``, else 1:

SGD(lr, momentum μ, dampening τ, nesterov n, weight_decay λ):
    g' = s·g + λθ; without momentum Δθ = −lr·g':        P = lr, a = s, b = λθ
    momentum, first step (torch copies g' into the buffer): buf' = g',
        update u = g' + μ·n·buf' = (1 + μn)·g':         P = lr, a = s(1+μn), b = (1+μn)λθ
    momentum, later steps: buf' = μ·buf + (1−τ)·g'
        plain    u = buf':          a = s(1−τ),        b = μ·buf + (1−τ)λθ
        Nesterov u = g' + μ·buf':   a = s(1+μ(1−τ)),   b = (1+μ(1−τ))λθ + μ²·buf
    c = 0.
Adam / AdamW(lr, β1, β2, ε, λ, amsgrad; t = the step about to be taken):
    g' = s·g + λθ (Adam: weight decay in the gradient) or s·g (AdamW: decoupled, c = lr·λ·θ)
    m' = β1·m + (1−β1)·g',  v' = β2·v + (1−β2)·g'²  (amsgrad: v' ← max(v_max, v'))
    Δθ = −(lr/(1−β1ᵗ))·m' / (sqrt(v'/(1−β2ᵗ)) + ε) − c
    so P(g) = (lr/(1−β1ᵗ)) / (sqrt(v'(g)/(1−β2ᵗ)) + ε), a = s(1−β1), b = β1·m (+ (1−β1)λθ).

P depends on g only for Adam/AdamW (through v'): the orthogonal choice of g is then a
fixed point (orthograd.py). Anything else (another optimizer, a subclass that may change
``step``, mixed ``maximize`` between groups) is not modelled: ``describe`` says why.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: optimizer types whose step is modelled exactly (matched exactly: a subclass may override step)
MODELLED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass
class TensorStep:
    """The step of one parameter tensor: Δθ = −P(g)⊙(a·g + b) − c (module docstring).

    a: scalar; b, c: tensors like the parameter, or None for zero; lr: the group's step
    size; adam: None (P = lr) or the Adam constants (m, v, v_max, β1, β2, ε, t, λ, s,
    decoupled) giving P(g).
    """

    a: float
    b: torch.Tensor | None
    c: torch.Tensor | None
    lr: float
    adam: dict | None = None

    def scale(self, g: torch.Tensor | None) -> torch.Tensor | float:
        """P(g) (a float for SGD, where it does not depend on g)."""
        if self.adam is None:
            return self.lr
        A = self.adam
        gp = A["s"] * g.to(torch.float64).reshape(A["theta"].shape)
        if A["lam"] and not A["decoupled"]:
            gp = gp + A["lam"] * A["theta"]
        v = A["beta2"] * A["v"] + (1 - A["beta2"]) * gp * gp
        if A["v_max"] is not None:
            v = torch.maximum(A["v_max"], v)
        bc1 = 1 - A["beta1"] ** A["t"]
        bc2 = 1 - A["beta2"] ** A["t"]
        return (self.lr / bc1) / (v.sqrt() / bc2**0.5 + A["eps"])

    def delta(self, g: torch.Tensor) -> torch.Tensor:
        """The predicted Δθ (fp64) for the written gradient g."""
        g64 = g.to(torch.float64)
        if self.b is not None:
            g64 = g64.reshape(self.b.shape)
        u = self.a * g64
        if self.b is not None:
            u = u + self.b
        d = -self.scale(g) * u
        return d if self.c is None else d - self.c


def _f64(t) -> torch.Tensor:
    return t.detach().to(torch.float64)


def describe(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> tuple[dict, str | None]:
    """({name: TensorStep} for the parameters ``params`` ({name: tensor}) the optimizer
    holds, None) — or ({}, why not) when its step is not modelled."""
    kind = type(optimizer)
    if kind not in MODELLED:
        return {}, f"{kind.__name__} is not modelled (SGD, Adam and AdamW are)"
    by_id = {id(p): n for n, p in params.items()}
    out: dict[str, TensorStep] = {}
    signs = set()
    for group in optimizer.param_groups:
        s = -1.0 if group.get("maximize", False) else 1.0
        signs.add(s)
        lr = float(group["lr"])
        lam = float(group.get("weight_decay", 0.0) or 0.0)
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                continue
            st = optimizer.state.get(p, {})
            if kind is torch.optim.SGD:
                mu, tau, nest = float(group["momentum"]), float(group["dampening"]), bool(group["nesterov"])
                buf = st.get("momentum_buffer") if mu != 0 else None
                # θ in fp64 only where the step reads it: plain SGD, the common unlearning
                # step, makes no fp64 copy of the parameters
                theta = _f64(p) if lam or buf is not None else None
                if mu == 0:
                    a, b = s, (lam * theta if lam else None)
                elif buf is None:  # first step: the buffer is the gradient itself
                    f = 1.0 + (mu if nest else 0.0)
                    a, b = s * f, (f * lam * theta if lam else None)
                else:
                    buf = _f64(buf)
                    if nest:
                        f = 1.0 + mu * (1 - tau)
                        a, b = s * f, f * lam * theta + mu * mu * buf
                    else:
                        a, b = s * (1 - tau), mu * buf + (1 - tau) * lam * theta
                out[name] = TensorStep(a=a, b=b, c=None, lr=lr)
            else:  # Adam / AdamW (torch 2.x: AdamW is Adam with decoupled weight decay)
                theta = _f64(p)
                beta1, beta2 = (float(x) for x in group["betas"])
                decoupled = kind is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False))
                t = int(float(st["step"])) + 1 if "step" in st else 1
                m = _f64(st["exp_avg"]) if "exp_avg" in st else torch.zeros_like(theta)
                v = _f64(st["exp_avg_sq"]) if "exp_avg_sq" in st else torch.zeros_like(theta)
                v_max = None
                if group.get("amsgrad", False):
                    v_max = _f64(st["max_exp_avg_sq"]) if "max_exp_avg_sq" in st else torch.zeros_like(theta)
                b = beta1 * m
                if lam and not decoupled:
                    b = b + (1 - beta1) * lam * theta
                c = lr * lam * theta if (lam and decoupled) else None
                adam = {"s": s, "lam": lam, "decoupled": decoupled, "theta": theta, "v": v, "v_max": v_max,
                        "beta1": beta1, "beta2": beta2, "eps": float(group["eps"]), "t": t}
                out[name] = TensorStep(a=s * (1 - beta1), b=b, c=c, lr=lr, adam=adam)
    if len(signs) > 1:
        return {}, "param groups mix maximize=True and False"
    return out, None


def is_plain(steps: dict[str, TensorStep]) -> bool:
    """True when every step is P·a·g with one constant P·a for all tensors (SGD without
    momentum history or weight decay, one lr): the written gradient's orthogonality is the
    step's, no correction needed."""
    vals = {(st.lr * st.a) for st in steps.values()}
    return all(st.adam is None and st.b is None and st.c is None for st in steps.values()) and len(vals) <= 1
