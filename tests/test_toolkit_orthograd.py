"""OrthoGrad on SampleGram against the fp64 reference (per-sample grads by vmap + SVD projection)."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from orthograd_fast import reference as R
from orthograd_fast.orthograd import NonFiniteGradientError, OrthoGrad

B, NF = 6, 5  # retain rows, forget rows


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 4)).to(dtype)


def _batches(gen, dtype=torch.float64):
    xr = torch.randn(B, 7, generator=gen, dtype=dtype)
    yr = torch.randint(0, 4, (B,), generator=gen)
    xf = torch.randn(NF, 7, generator=gen, dtype=dtype)
    yf = torch.randint(0, 4, (NF,), generator=gen)
    return (xf, yf), (xr, yr)


def _reference_direction(model, forget, retain, *, granularity, alpha, mean=False, rtol=1e-9):
    """d = α·mean_i g_i − (1−α)·(g_u − proj), per trainable tensor, fp64."""
    m = copy.deepcopy(model).double()
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    (xf, yf), (xr, yr) = forget, retain
    ce = lambda o, y: F.cross_entropy(o, y)  # noqa: E731
    ps = R.per_sample_grads_vmap(m, ce, xr.double(), yr)
    gu = dict(zip([n for n, _ in named], torch.autograd.grad(ce(m(xf.double()), yf), [p for _, p in named])))
    G = {n: ps[n] for n, _ in named}
    if mean:
        G = {n: g.sum(0, keepdim=True) for n, g in G.items()}
    names = [n for n, _ in named]
    if granularity == "global":
        proj = R.project_svd([gu[n] for n in names], [G[n] for n in names], rtol)
        perp = dict(zip(names, proj))
    else:
        perp = {n: R.project_svd(gu[n], G[n], rtol) for n in names}
    return {n: alpha * ps[n].mean(0) - (1 - alpha) * perp[n] for n in names}, G, gu


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("retain_grads", ["per_sample", "mean"])
def test_direction_matches_reference(gen, granularity, alpha, retain_grads):
    model = _mlp()
    forget, retain = _batches(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with OrthoGrad(model, opt, granularity=granularity, alpha=alpha, retain_grads=retain_grads) as og:
        stats = og.step(forget, retain)
    want, G, _ = _reference_direction(model, forget, retain, granularity=granularity, alpha=alpha,
                                      mean=retain_grads == "mean")
    got = _grads(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-11)
    nb = B if retain_grads == "per_sample" else 1
    if granularity == "global":
        assert stats["rank"] == nb
    assert stats["orthogonality"] < 1e-10 and stats["solve_orthogonality"] < 1e-10 and 0 < stats["kept"] <= 1
    assert stats["forget_loss"] > 0 and stats["retain_loss"] > 0 and stats["step_time"] > 0


def test_per_tensor_is_stricter(gen):
    """per_tensor removes B directions per tensor: the 4-entry output bias (≤ B) loses all of g_u."""
    model = _mlp()
    forget, retain = _batches(gen)
    kept = {}
    for gran in ("global", "per_tensor"):
        m = copy.deepcopy(model)
        with OrthoGrad(m, torch.optim.SGD(m.parameters(), lr=0.0), granularity=gran) as og:
            kept[gran] = og.step(forget, retain)["kept"]
        if gran == "per_tensor":
            assert float(m[2].bias.grad.abs().max()) < 1e-12
            assert float(m[0].weight.grad.abs().max()) > 1e-6
    assert kept["per_tensor"] < kept["global"]


def test_first_order_retain_losses_unchanged(gen):
    """One OrthoGrad step changes every retain sample's loss by far less than plain ascent
    with the same step length (first order: zero)."""
    model = _mlp()
    forget, retain = _batches(gen)
    (xf, yf), (xr, yr) = forget, retain

    def retain_losses(m):
        with torch.no_grad():
            return F.cross_entropy(m(xr), yr, reduction="none")

    base = retain_losses(model)
    step = 1e-3
    og_model = copy.deepcopy(model)
    params = list(og_model.parameters())
    before = [p.detach().clone() for p in params]
    with OrthoGrad(og_model, torch.optim.SGD(params, lr=1.0)) as og:
        og.step(forget, retain)
    # rescale the update to length `step`
    delta = [p.detach() - b for p, b in zip(params, before)]
    norm = torch.sqrt(sum((d * d).sum() for d in delta))
    with torch.no_grad():
        for p, b, d in zip(params, before, delta):
            p.copy_(b + d * (step / norm))
    asc = copy.deepcopy(model)
    loss = F.cross_entropy(asc(xf), yf)
    grads = torch.autograd.grad(loss, list(asc.parameters()))
    gnorm = torch.sqrt(sum((g * g).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(asc.parameters(), grads):
            p.add_(g * (step / gnorm))
    d_og = (retain_losses(og_model) - base).abs().max()
    d_asc = (retain_losses(asc) - base).abs().max()
    assert d_asc > 1e-5
    assert d_og < 1e-2 * d_asc, (float(d_og), float(d_asc))


def test_fp32_model_stays_orthogonal(gen):
    """fp32 model, near-duplicate retain rows (σ_min/σ_max ~ 1e-4, at the default rtol): the
    written update stays orthogonal to the fp64 per-sample gradients within the fp32
    combination bound eps32/rtol ≈ 6e-4 (orthograd module doc; 30 seeds: median 2e-5,
    max 3.6e-4)."""
    model = _mlp(torch.float32)
    forget, (xr, yr) = _batches(gen, torch.float32)
    xr = torch.cat([xr, xr + 1e-4 * torch.randn(xr.shape, generator=gen)])
    yr = torch.cat([yr, yr])
    with OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.0)) as og:
        stats = og.step(forget, (xr, yr))
    _, G, _ = _reference_direction(model, forget, (xr, yr), granularity="global", alpha=0.0)
    names = list(G)
    r = [_grads(model)[n].double() for n in names]
    assert R.orthogonality(r, [G[n] for n in names]) < 1e-3
    assert stats["rank"] <= 2 * B


def test_frozen_parameters_untouched(gen):
    model = _mlp()
    model[0].weight.requires_grad_(False)
    forget, retain = _batches(gen)
    w0 = model[0].weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    with OrthoGrad(model, torch.optim.SGD(trainable, lr=0.1)) as og:
        og.step(forget, retain)
    assert torch.equal(model[0].weight, w0) and model[0].weight.grad is None
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable))
    # the projection is over the trainable parameters only
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        for p, b in zip([p for p in m2.parameters() if p.requires_grad], before):
            p.copy_(b)
    with OrthoGrad(m2, torch.optim.SGD([p for p in m2.parameters() if p.requires_grad], lr=0.0)) as og:
        og.step(forget, retain)
    want, _, _ = _reference_direction(m2, forget, retain, granularity="global", alpha=0.0)
    for n, g in _grads(m2).items():
        torch.testing.assert_close(g, want[n], rtol=1e-9, atol=1e-11)


def test_any_optimizer_and_clipping(gen):
    model = _mlp()
    forget, retain = _batches(gen)
    before = [p.detach().clone() for p in model.parameters()]
    with OrthoGrad(model, torch.optim.Adam(model.parameters(), lr=1e-2), max_grad_norm=1e-3) as og:
        stats = og.step(forget, retain)
        total = torch.sqrt(sum((p.grad * p.grad).sum() for p in model.parameters()))
    assert float(total) == pytest.approx(1e-3, rel=1e-6) and stats["grad_norm"] > 1e-3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nan_raises_before_stepping(gen):
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    forget, retain = _batches(gen)
    before = [p.detach().clone() for p in model.parameters()]
    with OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1)) as og:
        with pytest.raises(NonFiniteGradientError):
            og.step(forget, retain)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()) if not a.isnan().any())


def test_bad_inputs(gen):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    forget, retain = _batches(gen)
    with pytest.raises(ValueError, match="granularity"):
        OrthoGrad(model, opt, granularity="layer")
    with pytest.raises(ValueError, match="retain_grads"):
        OrthoGrad(model, opt, retain_grads="sum")
    with pytest.raises(ValueError, match="alpha"):
        OrthoGrad(model, opt, alpha=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        OrthoGrad(model, "sgd")
    with pytest.raises(ValueError, match="not in the model"):
        OrthoGrad(model, torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    frozen = _mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        OrthoGrad(frozen, opt)
    with OrthoGrad(model, opt) as og:
        with pytest.raises(ValueError, match="forget batch is empty"):
            og.step((forget[0][:0], forget[1][:0]), retain)
        with pytest.raises(ValueError, match="retain batch"):
            og.step(forget, retain[0])
    with OrthoGrad(model, opt, loss_fn=lambda o, y: F.cross_entropy(o, y)) as og:
        with pytest.raises(ValueError, match="per-sample losses"):
            og.step(forget, retain)


def test_cnn_direction_matches_reference(gen):
    """The toolkit's SmallCNN (Conv2d rules of SampleGram) against the vmap reference."""
    from orthograd_fast.unlearning.models import ModelConfig, build_model

    model = build_model(ModelConfig("cnn", channels=(4, 6)), (1, 8, 8), 5, seed=0).double()
    xr = torch.randn(B, 1, 8, 8, generator=gen, dtype=torch.float64)
    xf = torch.randn(NF, 1, 8, 8, generator=gen, dtype=torch.float64)
    forget = (xf, torch.randint(0, 5, (NF,), generator=gen))
    retain = (xr, torch.randint(0, 5, (B,), generator=gen))
    with OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.0), alpha=0.25) as og:
        stats = og.step(forget, retain)
    want, _, _ = _reference_direction(model, forget, retain, granularity="global", alpha=0.25)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, want[n], rtol=1e-9, atol=1e-11)
    assert stats["rank"] == B


def _pinv_solve(K, b, gg, rtol):
    """The reference for OrthoGrad's solve: linalg.gram_pinv (eigh on the cosine matrix);
    also κ(C) on the kept directions, (σ_max/σ_min,kept)²."""
    from orthograd_fast.linalg import gram_pinv

    solve = gram_pinv(K, rtol)
    c = solve.coefficients(b)
    Gr = b - K @ c
    kappa = float(solve.sigma[0] / solve.sigma[solve.rank - 1]) ** 2 if solve.rank else 1.0
    return c, solve.rank, Gr, (gg - 2 * (c @ b) + c @ (K @ c)).clamp_min(0), kappa


def _solve_stacked(Ks, bs, ggs, rtol):
    from orthograd_fast.orthograd import _solve_batched

    return _solve_batched(torch.stack(Ks), torch.stack(bs), torch.stack(ggs), rtol)


def _assert_solves_match(Ks, bs, ggs, rtol, solved=None):
    """Same rank, and c, G r, ‖r‖² equal within what two backward-stable fp64 solvers of
    the same system differ by: ~n·κ(C)·u relative (x100 for the row scaling D^-1/2)."""
    c, rank, Gr, rr = solved or _solve_stacked(Ks, bs, ggs, rtol)
    for i in range(len(Ks)):
        c1, rank1, Gr1, rr1, kappa = _pinv_solve(Ks[i], bs[i], ggs[i], rtol)
        assert int(rank[i]) == rank1, i
        tol = max(1e-9, 100 * Ks[i].shape[0] * kappa * 2.0**-53)
        cn, Kn, bn = float(c1.norm()), float(torch.linalg.matrix_norm(Ks[i], 2)), float(bs[i].norm())
        assert float((c[i] - c1).norm()) <= tol * max(cn, 1.0), (i, tol)
        assert float((Gr[i] - Gr1).abs().max()) <= tol * (bn + Kn * cn + 1), (i, tol)
        assert abs(float(rr[i] - rr1)) <= tol * (float(ggs[i]) + bn * cn + Kn * cn * cn + 1), (i, tol)


@pytest.mark.parametrize("rtol", [1e-4, 1e-7])
def test_batched_per_tensor_solve_matches_gram_pinv(rtol, gen):
    """per_tensor solves all tensors' Grams in one batch (_solve_batched): it must agree with
    the single-matrix path (linalg.gram_pinv) on rank-deficient Grams, zero rows (a retain
    sample with zero gradient in that tensor), an all-zero Gram and a full-rank one."""
    nb, L = 9, 6
    Ks, bs, ggs = [], [], []
    for i in range(L):
        G = torch.randn(nb, 4 + 3 * i, generator=gen, dtype=torch.float64)  # rank <= 4 + 3i
        if i == 1:
            G[[2, 5]] = 0.0  # zero rows
        if i == 2:
            G[3] = G[0] * 1e-3 + G[1]  # near-duplicate direction
        if i == 4:
            G.zero_()
        g = torch.randn(G.shape[1], generator=gen, dtype=torch.float64)
        Ks.append(G @ G.T)
        bs.append(G @ g)
        ggs.append(g @ g)
    _assert_solves_match(Ks, bs, ggs, rtol)


def test_full_rank_grams_skip_the_eigh(gen, monkeypatch):
    """Cosine matrices certified full rank (Cholesky of C − 2·rtol²·ρ·I) are solved without
    eigh, and agree with gram_pinv; ones at or below the threshold still go to eigh, also
    near it (σ_min/σ_max from 30·rtol down to rtol/3), where the two must pick the same rank."""
    from orthograd_fast import orthograd as og

    nb, P, rtol = 12, 40, 1e-4
    Ks, bs, ggs = [], [], []
    for ratio in (1.0, 30 * rtol, 3 * rtol, 1.5 * rtol, rtol / 1.5, rtol / 3):
        U, _ = torch.linalg.qr(torch.randn(P, nb, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(nb, nb, generator=gen, dtype=torch.float64))
        s = torch.logspace(0, math.log10(ratio), nb, dtype=torch.float64)
        G = (V * s) @ U.T  # rows: singular values s (before the row normalisation)
        G = G * torch.rand(nb, 1, generator=gen, dtype=torch.float64).add(0.5)  # unequal row norms
        g = torch.randn(P, generator=gen, dtype=torch.float64)
        Ks.append(G @ G.T)
        bs.append(G @ g)
        ggs.append(g @ g)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: calls.append(A.shape[0]) or eigh(A))
    easy = _solve_stacked(Ks[:2], bs[:2], ggs[:2], rtol)
    assert calls == [], "two well-conditioned Grams still went through eigh"
    everything = _solve_stacked(Ks, bs, ggs, rtol)
    assert len(calls) == 1 and calls[0] <= 4, calls  # one eigh, of the uncertified ones only
    monkeypatch.undo()
    _assert_solves_match(Ks[:2], bs[:2], ggs[:2], rtol, easy)
    _assert_solves_match(Ks, bs, ggs, rtol, everything)




def test_rank_capped_by_tensor_size(gen):
    """A tensor of m entries spans at most m directions: with Gram rounding noise at
    1e-7·λ_max (the fp32-product Gram's level) the rule alone keeps noise directions of a
    rank-m Gram, the cap keeps m, and c matches the noiseless solve."""
    from orthograd_fast.orthograd import _solve_batched

    n, m, rtol = 16, 5, 1e-4
    X = torch.randn(n, m, generator=gen, dtype=torch.float64)
    K0 = X @ X.T
    E = torch.randn(n, n, generator=gen, dtype=torch.float64)
    K = K0 + 1e-7 * float(torch.linalg.eigvalsh(K0)[-1]) * (E + E.T) / (2 * n**0.5)
    b = X @ torch.randn(m, generator=gen, dtype=torch.float64)
    gg = torch.tensor(100.0, dtype=torch.float64)
    _, rank_free, _, _ = _solve_batched(K[None], b[None], gg[None], rtol)
    c, rank, _, _ = _solve_batched(K[None], b[None], gg[None], rtol, torch.tensor([m]))
    assert int(rank_free[0]) > m  # the noise passes the rule...
    assert int(rank[0]) == m  # ...not the cap
    # the projection is that of the noiseless system: K0 c = b (any solution of it gives
    # the same G r; gram_pinv's D^-1/2 C⁺ D^-1/2 is not the minimum-norm one), with a
    # coefficient norm of the noiseless solve's order
    c0 = torch.linalg.pinv(K0, hermitian=True, rtol=1e-10) @ b
    assert float((K0 @ c[0] - b).norm()) <= 1e-4 * float(b.norm())
    assert float(c[0].norm()) <= 10 * float(c0.norm())


def test_per_tensor_rank_at_most_tensor_size(gen):
    """A 3-class head's bias (3 entries) and B = 8 retain rows: its Gram is 8 x 8 of rank
    <= 2 (softmax gradients sum to zero), with fp32-product rounding on top; the reported
    per-tensor ranks are capped by each tensor's size."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    B = 8
    forget = (torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
    retain = (torch.randn(B, 6, generator=gen), torch.randint(0, 3, (B,), generator=gen))
    with OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.0), granularity="per_tensor") as og:
        stats = og.step(forget, retain)
    assert stats["rank"] <= sum(min(B, p.numel()) for p in model.parameters())
