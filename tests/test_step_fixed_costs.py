"""The fast paths that cut OrthoGrad.step's fixed per-step costs (issue 11) refuse and report
exactly what the per-tensor paths they replace did.

* finiteness: ``all_finite`` (one aminmax) against ``isfinite``; ``_finite_sq_norm`` (one
  fp64 norm per tensor) with a recheck where an fp64 norm overflows; input, parameter,
  Gram and weight refusals still name the rows or the parameter;
* the step's bound (``step_orthogonality_bound``), now from the stacked Grams and weights
  of the solve, against the formula of ``OrthoGrad._step_stats`` evaluated tensor by
  tensor in fp64 here (also after Adam's projected step, which moves θ again);
* the engine's reuse of a ``Segments`` (and its memoised plans) across record() calls
  only when the ids are equal.
"""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from orthograd_fast.gram import NonFiniteGramError, SampleGram
from orthograd_fast.gram.rules.base import all_finite
from orthograd_fast.orthograd import NonFiniteGradientError, OrthoGrad, _finite_sq_norm

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _poisoned(gen, n, dtype):
    """(tensor of n entries, possibly with NaN/±Inf at random places, as a strided view
    half of the time)."""
    x = (torch.randn(2 * n, generator=gen) * 100).to(dtype)
    kind = int(torch.randint(0, 4, (1,), generator=gen))
    if kind:
        where = torch.randint(0, 2 * n, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen)
        x[where] = (float("nan"), float("inf"), -float("inf"))[kind - 1]
    return x[::2] if bool(torch.randint(0, 2, (1,), generator=gen)) else x[:n]


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite_is_isfinite(gen, dtype):
    for n in (1, 2, 17, 63, 100, 4097):
        for _ in range(20):
            x = _poisoned(gen, n, dtype)
            assert all_finite(x) == bool(torch.isfinite(x).all())
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    z = torch.tensor([1 + 1j, complex(float("nan"), 0)])
    assert not all_finite(z) and all_finite(z[:1])


def test_finite_sq_norm(gen):
    ts = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen, dtype=torch.float64),
          torch.randn(4, generator=gen).half()]
    ok, sq = _finite_sq_norm(ts)
    want = sum(float((t.double() ** 2).sum()) for t in ts)
    assert ok and abs(sq - want) <= 1e-12 * want
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = [t.clone() for t in ts]
        poisoned[int(torch.randint(0, 3, (1,), generator=gen))].view(-1)[0] = bad
        assert not _finite_sq_norm(poisoned)[0]
    huge = [torch.full((3,), 1e200, dtype=torch.float64)]  # finite entries, the fp64 norm overflows
    assert _finite_sq_norm(huge)[0]
    assert _finite_sq_norm([])[0]


def _mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 3))


def test_input_refusals_name_rows(gen):
    model = _mlp(gen)
    og = OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1))
    xr, yr = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    xf, yf = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = xr.clone()
        x[[2, 5], 1] = bad
        with pytest.raises(ValueError, match=r"retain batch: the inputs hold NaN or Inf \(rows \[2, 5\]\)"):
            og.step((xf, yf), (x, yr))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    sg = SampleGram(_mlp(gen))
    x = torch.randn(5, 6, generator=gen)
    x[3, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"has NaN/Inf \(rows \[3\] of dim 0\)"):
        with sg.record(torch.arange(5)):
            sg.model(x).sum().backward()


def test_optimizer_overflow_refused(gen):
    model = _mlp(gen)
    og = OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=float("inf")))
    xr, yr = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    xf, yf = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    with pytest.raises(NonFiniteGradientError, match="made parameters non-finite"):
        og.step((xf, yf), (xr, yr))


def test_gram_and_weights_refusals_name_the_parameter(gen):
    model = _mlp(gen)
    sg = SampleGram(model)
    x = torch.randn(6, 6, generator=gen)

    def record():
        model.zero_grad(set_to_none=True)
        with sg.record(torch.tensor([0, 1, 2, 2, 1, 0])):
            model(x).square().sum().backward()

    names = [n for n, _ in model.named_parameters()]
    W = {n: torch.randn(3, generator=gen, dtype=torch.float64) for n in names}
    record()
    sg.combine(W)  # fp64 (S,) weights: checked at once
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    record()
    sg.combine({n: w.tolist() for n, w in W.items()})  # lists: checked one by one
    assert all(torch.equal(fast[n], p.grad) for n, p in model.named_parameters())
    bad = names[int(torch.randint(0, len(names), (1,), generator=gen))]
    W[bad] = W[bad].clone()
    W[bad][1] = float("nan")
    with pytest.raises(ValueError, match=rf"combine weights\[{bad!r}\] contain NaN or Inf"):
        sg.combine(W)
    sg._step.grams[bad][0, 1] = float("inf")  # as if that layer's activations overflowed
    for per_tensor in (True, False):
        with pytest.raises(NonFiniteGramError, match=bad.replace(".", r"\.")):
            sg.gram(per_tensor=per_tensor)


def test_segments_reused_only_for_equal_ids(gen):
    model = _mlp(gen)
    x = torch.randn(6, 6, generator=gen)

    def gram(sg, ids, S=None):
        with sg.record(ids, num_segments=S):
            model(x).square().sum().backward()
        return sg.gram()

    sg = SampleGram(model)
    a, b = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([2, 0, 1, -1, 1, 0])
    for ids, S in ((a, None), (b, None), (a, None), (a, 5), (a, None), (b.clone(), 3)):
        got = gram(sg, ids, S)
        with SampleGram(model) as fresh:
            want = gram(fresh, ids.clone(), S)
        assert got.shape == want.shape and torch.equal(got, want)


def _bound_reference(og, grams, weights, nb, B, N):
    """step_orthogonality_bound by the formula of OrthoGrad._step_stats, tensor by tensor in
    fp64 (weights: the solve's combination weights; the ascent part for alpha > 0)."""
    names = [n for n, _ in og.named]
    per_tensor = isinstance(weights, dict)
    w = {n: (weights[n] if per_tensor else weights).clone() for n in names}
    if og.alpha > 0:
        for n in names:
            w[n][:nb] -= og.alpha / B
    K = sum(grams[n][:nb, :nb] for n in names)
    if per_tensor:
        Gd = sum(grams[n][:nb] @ w[n] for n in names)
        dd = sum(float(w[n] @ grams[n] @ w[n]) for n in names)
        comb = sum(float((w[n].abs() * grams[n].diagonal().clamp_min(0).sqrt()).sum()) for n in names)
    else:
        Kt = sum(grams[n] for n in names)
        Gd, dd = Kt[:nb] @ w[names[0]], float(w[names[0]] @ Kt @ w[names[0]])
        comb = float((w[names[0]].abs() * Kt.diagonal().clamp_min(0).sqrt()).sum())
    lam = float(torch.linalg.eigvalsh(K)[-1])
    bound = float(Gd.norm()) / math.sqrt(lam * dd)
    u = max(torch.finfo(p.dtype).eps for _, p in og.named)
    dnorm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for _, p in og.named))
    theta = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for _, p in og.named))
    lr = max(float(g["lr"]) for g in og.optimizer.param_groups)
    return bound + u * math.sqrt(N) * comb / math.sqrt(dd) + u * theta / (lr * dnorm)


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("opt,alpha", [("sgd", 0.0), ("sgd", 0.3), ("adam", 0.3)])  # Adam at alpha = 0: measured, no bound
def test_bound_is_the_formula(gen, granularity, alpha, opt):
    model = _mlp(gen)
    optim = (torch.optim.SGD(model.parameters(), lr=0.05) if opt == "sgd"
             else torch.optim.Adam(model.parameters(), lr=1e-2))
    og = OrthoGrad(model, optim, granularity=granularity, alpha=alpha)
    solved = {}
    plain_solve = og._plain_solve

    def spy(*a, **k):
        out = plain_solve(*a, **k)
        solved["weights"] = out[0]
        return out

    og._plain_solve = spy
    B, Fn = 7, 5
    for step in range(3):
        xr, yr = torch.randn(B, 6, generator=gen), torch.randint(0, 3, (B,), generator=gen)
        xf, yf = torch.randn(Fn, 6, generator=gen), torch.randint(0, 3, (Fn,), generator=gen)
        stats = og.step((xf, yf), (xr, yr))
        want = _bound_reference(og, og.engine.gram(per_tensor=True), solved["weights"], B, B, B + Fn)
        got = stats["step_orthogonality_bound"]
        # the same sums in another order: fp64 rounding of a quotient of sums of ~B² terms
        assert abs(got - want) <= 1e-10 * want, (step, got, want)
