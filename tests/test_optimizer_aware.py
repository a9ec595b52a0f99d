"""The step that moves the weights is the orthogonal one (issue 9): for each optimizer
people use, one or two OrthoGrad steps on a small MLP and a small CNN (fp32), then the
actual parameter change Δθ against fp64 per-sample retain gradients (a batch-size-1 loop
at the weights before the step): max_i |cos(g_i, Δθ)| <= 1e-5.

Why 1e-5: the retain gradients the engine projects against are fp32 computations
(relative error ~1e-6 of a gradient's norm at these sizes), the solve keeps directions
above rtol = 1e-4 of σ_max (orthograd.py, "Default rank tolerance"), and the fp32 update
θ − Δ rounds θ (u·‖θ‖/‖Δθ‖ ~ 1e-6 here); without the optimizer-aware solve the same steps
measure 1e-3..1e-1 (asserted below, so the test can fail).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthograd_fast import OrthoGrad


def seed_torch(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 4))


def data(kind, n, gen):
    x = torch.randn(n, 10, generator=gen) if kind == "mlp" else torch.randn(n, 2, 7, 7, generator=gen)
    return x, torch.randint(0, 4, (n,), generator=gen)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_dampening_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.3, weight_decay=5e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_wd_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def retain_grads64(model, x, y):
    """(B, P) fp64 per-sample gradients of the trainable parameters, in eval mode."""
    m = copy.deepcopy(model).double().eval()
    ps = [p for p in m.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(m(x[i : i + 1].double()), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]))
    return torch.stack(rows), [n for n, p in m.named_parameters() if p.requires_grad]


def max_cos(model, before, G, names):
    d = torch.cat([(dict(model.named_parameters())[n].detach().double() - before[n]).reshape(-1) for n in names])
    return float(((G @ d).abs() / (G.norm(dim=1) * d.norm())).max())


def run_steps(kind, opt_name, gen, steps=2, subset=False, granularity="global", **kw):
    seed_torch(gen)
    model = mlp() if kind == "mlp" else cnn()
    params = list(model.parameters())
    if subset:  # an optimizer over the last layer only (the others stay trainable)
        params = list(model[-1].parameters())
    opt = OPTIMIZERS[opt_name](params)
    og = OrthoGrad(model, opt, granularity=granularity, **kw)
    xr, yr = data(kind, 6, gen)
    xf, yf = data(kind, 3, gen)
    worst, stats = 0.0, None
    for _ in range(steps):  # the second step has momentum / Adam state from the first
        G, names = retain_grads64(model, xr, yr)
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        stats = og.step((xf, yf), (xr, yr))
        worst = max(worst, max_cos(model, before, G, names))
    og.close()
    return worst, stats


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_actual_step_is_orthogonal(kind, opt_name, granularity, gen):
    worst, stats = run_steps(kind, opt_name, gen, granularity=granularity, measure=True)
    assert worst <= 1e-5, (worst, stats)
    assert stats["step_cosine_max"] <= 1e-5  # the engine's own measurement agrees
    assert abs(stats["step_cosine_max"] - worst) <= 1e-5


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_momentum", "adam"])
def test_optimizer_over_a_subset(opt_name, gen):
    worst, stats = run_steps("mlp", opt_name, gen, subset=True)
    assert worst <= 1e-5, (worst, stats)


def test_per_group_learning_rates(gen):
    seed_torch(gen)
    model = mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.5},
                           {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 0.01}])
    og = OrthoGrad(model, opt, measure=True)
    xr, yr = data("mlp", 6, gen)
    xf, yf = data("mlp", 3, gen)
    G, names = retain_grads64(model, xr, yr)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    og.step((xf, yf), (xr, yr))
    assert max_cos(model, before, G, names) <= 1e-5


@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum", "adamw"])
def test_without_the_aware_solve_the_step_is_not_orthogonal(opt_name, gen):
    """The check above can fail: the plain projection under these optimizers."""
    worst, _ = run_steps("mlp", opt_name, gen, optimizer_aware=False)
    assert worst > 1e-4


def test_unmodelled_optimizer_warns_once(gen):
    seed_torch(gen)
    model = mlp()
    og = OrthoGrad(model, torch.optim.RMSprop(model.parameters(), lr=1e-3))
    xr, yr = data("mlp", 5, gen)
    xf, yf = data("mlp", 2, gen)
    with pytest.warns(RuntimeWarning, match="may not be"):
        og.step((xf, yf), (xr, yr))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        og.step((xf, yf), (xr, yr))
    with pytest.raises(ValueError, match="not modelled"):
        OrthoGrad(model, torch.optim.RMSprop(model.parameters(), lr=1e-3), optimizer_aware=True).step((xf, yf), (xr, yr))


def test_plain_sgd_bound_covers_the_measured_value(gen):
    """The cheap default figure is a bound: never below what the step achieved."""
    for _ in range(5):
        worst_bound = None
        seed_torch(gen)
        model = mlp()
        xr, yr = data("mlp", 6, gen)
        xf, yf = data("mlp", 3, gen)
        m2 = copy.deepcopy(model)
        s1 = OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.05)).step((xf, yf), (xr, yr))
        s2 = OrthoGrad(m2, torch.optim.SGD(m2.parameters(), lr=0.05), measure=True).step((xf, yf), (xr, yr))
        assert "step_orthogonality_bound" in s1 and "step_orthogonality" in s2
        assert s2["step_orthogonality"] <= s1["step_orthogonality_bound"], (s1, s2)


def test_project_step_makes_any_optimizer_orthogonal(gen):
    seed_torch(gen)
    model = mlp()
    og = OrthoGrad(model, torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.5), project_step=True)
    xr, yr = data("mlp", 6, gen)
    xf, yf = data("mlp", 3, gen)
    for _ in range(2):
        G, names = retain_grads64(model, xr, yr)
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        stats = og.step((xf, yf), (xr, yr))
        assert max_cos(model, before, G, names) <= 1e-5, stats
        assert stats["step_projected"] > 1e-4  # the projection did something


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "sgd_nesterov_wd"])
def test_clipping_with_momentum(opt_name, gen):
    worst, stats = run_steps("mlp", opt_name, gen, max_grad_norm=0.05, measure=True)
    assert worst <= 1e-5, stats
    assert stats["clip_factor"] < 1.0  # the clip was active


def test_batchnorm_dropout_cnn_with_adam(gen):
    """A BatchNorm + Dropout CNN in train mode: the step runs in eval mode (modes restored)
    and Adam's step is orthogonal to the eval-mode retain gradients."""
    seed_torch(gen)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                          nn.Flatten(), nn.Linear(4 * 7 * 7, 4))
    model.train()
    model[1].running_mean.uniform_(-0.2, 0.2)
    og = OrthoGrad(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    xr, yr = data("cnn", 6, gen)
    xf, yf = data("cnn", 3, gen)
    for _ in range(2):
        G, names = retain_grads64(model, xr, yr)
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        og.step((xf, yf), (xr, yr))
        assert max_cos(model, before, G, names) <= 1e-5
    assert model.training and model[1].training


def test_the_adam_model_predicts_torchs_step(gen):
    """optimizers.describe's Δθ(g) = −P(g)⊙(a·g + b) − c against torch's own step, for
    Adam/AdamW/amsgrad with weight decay, after a first step (state present)."""
    from orthograd_fast.optimizers import describe

    for name in ("adam", "adam_wd_amsgrad", "adamw", "sgd_nesterov_wd", "sgd_dampening_wd"):
        seed_torch(gen)
        model = mlp().double()
        opt = OPTIMIZERS[name](model.parameters())
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            steps, why = describe(opt, dict(model.named_parameters()))
            assert why is None
            pred = {n: steps[n].delta(p.grad) for n, p in model.named_parameters()}
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            for n, p in model.named_parameters():
                got = p.detach() - before[n]
                assert float((got - pred[n].view_as(got)).norm() / got.norm()) < 1e-10, (name, n)


def test_default_figure_bounds_the_true_orthogonality(gen):
    """Issue 8, item 8: the default ``orthogonality`` of an fp32 step is an honest bound on
    what the update achieved against fp64 per-sample gradients (the solve's own residual,
    ``solve_orthogonality``, reads ~1e-16 and is reported under its own name)."""
    for _ in range(3):
        seed_torch(gen)
        model = mlp()
        xr, yr = data("mlp", 6, gen)
        xf, yf = data("mlp", 3, gen)
        G, names = retain_grads64(model, xr, yr)
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        st = OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.05)).step((xf, yf), (xr, yr))
        d = torch.cat([(dict(model.named_parameters())[n].detach().double() - before[n]).reshape(-1) for n in names])
        true = float((G @ d).norm() / (torch.linalg.matrix_norm(G, 2) * d.norm()))
        assert true <= st["orthogonality"] == st["step_orthogonality_bound"], (true, st)
        assert st["solve_orthogonality"] < 1e-12 < true


def test_maximize_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="maximize"):
        OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))


def test_non_finite_step_restores_and_raises(gen):
    """An optimizer that turns a finite gradient into non-finite weights (simulated):
    OrthoGrad restores the weights it copied and raises."""
    from orthograd_fast.orthograd import NonFiniteGradientError

    seed_torch(gen)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    orig = opt.step

    def bad_step(closure=None):
        orig()
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")

    opt.step = bad_step
    og = OrthoGrad(model, opt)
    xr, yr = data("mlp", 5, gen)
    xf, yf = data("mlp", 2, gen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteGradientError, match="restored"):
        og.step((xf, yf), (xr, yr))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_data_dtype_mismatch_is_a_clear_error(gen):
    model = mlp()
    og = OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1))
    xr, yr = data("mlp", 5, gen)
    xf, yf = data("mlp", 2, gen)
    with pytest.raises(ValueError, match="float64 but the model"):
        og.step((xf.double(), yf), (xr.double(), yr))


def test_unmodelled_unmeasured_step_reports_unknown(gen):
    import math
    import warnings

    seed_torch(gen)
    model = mlp()
    og = OrthoGrad(model, torch.optim.Adagrad(model.parameters(), lr=1e-2))
    xr, yr = data("mlp", 5, gen)
    xf, yf = data("mlp", 2, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = og.step((xf, yf), (xr, yr))
    assert math.isnan(st["orthogonality"]) and "step_orthogonality_bound" not in st
