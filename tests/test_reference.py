"""The reference must itself be right: its pieces cross-checked against each other and
against facts that hold by construction."""
import torch
import torch.nn.functional as F
from torch import nn

from orthograd_fast import reference as ref


def _mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_per_sample_loop_and_vmap_agree(gen):
    model = _mlp(gen)
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    loop = ref.per_sample_grads_loop(model, F.cross_entropy, x, y)
    vm = ref.per_sample_grads_vmap(model, F.cross_entropy, x, y)
    assert loop.keys() == vm.keys()
    for k in loop:
        assert torch.allclose(loop[k], vm[k], rtol=1e-12, atol=1e-14)
    # the per-sample gradients sum to the gradient of the summed loss
    total = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), list(model.parameters()))
    for (k, _), t in zip(model.named_parameters(), total):
        assert torch.allclose(loop[k].sum(0), t, rtol=1e-12, atol=1e-14)


def test_frozen_parameters_are_left_out(gen):
    model = _mlp(gen)
    model[0].weight.requires_grad_(False)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=gen)
    vm = ref.per_sample_grads_vmap(model, F.cross_entropy, x, y)
    assert "0.weight" not in vm and "0.bias" in vm
    assert torch.allclose(vm["2.weight"], ref.per_sample_grads_loop(model, F.cross_entropy, x, y)["2.weight"])


def test_segment_grads_and_gram(gen):
    per = {"w": torch.randn(5, 2, 3, generator=gen, dtype=torch.float64), "b": torch.randn(5, 4, generator=gen, dtype=torch.float64)}
    seg = torch.tensor([0, 2, 0, -1, 2])
    out = ref.segment_grads(per, seg, 3)
    assert torch.allclose(out["w"][0], per["w"][0] + per["w"][2])
    assert torch.equal(out["w"][1], torch.zeros(2, 3, dtype=torch.float64))
    assert torch.allclose(out["b"][2], per["b"][1] + per["b"][4])
    flat = torch.cat([out["w"].reshape(3, -1), out["b"]], 1)
    assert torch.allclose(ref.gram_from_grads(out), flat @ flat.T)
    per_t = ref.gram_from_grads(out, per_tensor=True)
    assert torch.allclose(per_t["w"] + per_t["b"], flat @ flat.T)


def test_svd_projection_facts(gen):
    G = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    in_span = torch.randn(5, generator=gen, dtype=torch.float64) @ G
    assert float(ref.project_svd(in_span, G, 1e-10).norm()) <= 1e-12 * float(in_span.norm())
    Q, _ = torch.linalg.qr(torch.cat([G.T, torch.randn(40, 1, generator=gen, dtype=torch.float64)], 1))
    ortho = Q[:, -1]  # orthogonal to every row
    assert torch.allclose(ref.project_svd(ortho, G, 1e-10), ortho, atol=1e-13)
    g = torch.randn(40, generator=gen, dtype=torch.float64)
    r = ref.project_svd(g, G, 1e-10)
    assert ref.orthogonality(r, G) <= 1e-14
    assert torch.allclose(r, ref.project_qr(g, G), atol=1e-12)  # full rank: QR agrees
    _, rank = ref.project_svd(g, torch.cat([G, G[:2] * 3.0]), 1e-10, return_rank=True)
    assert rank == 5


def test_qr_over_projects_rank_deficient_inputs(gen):
    """Why the rank rule exists: Householder QR of a rank-deficient G returns extra
    orthonormal columns outside the span, and removes those directions too.

    Rank 2 in B = 20 rows of P = 30: QR's 18 extra columns are set by rounding noise, so
    independent of g; they take a Beta(9, 5) share of the exact residual's energy (mean
    0.64), and below 0.0975 (norm ratio above 0.95) with probability under 1e-6. (With 6
    rows the share was Beta(2, 12) and the test failed about 3% of the time.)"""
    W = torch.randn(2, 30, generator=gen, dtype=torch.float64)
    G = torch.randn(20, 2, generator=gen, dtype=torch.float64) @ W
    g = torch.randn(30, generator=gen, dtype=torch.float64)
    exact = ref.project_svd(g, G, 1e-10)
    assert float(ref.project_qr(g, G).norm()) < 0.95 * float(exact.norm())


def test_authors_direction_is_per_tensor_qr(gen):
    model = _mlp(gen)
    xf, yf = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)
    xr, yr = torch.randn(3, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (3,), generator=gen)
    d = ref.authors_orthograd_direction(model, F.cross_entropy, xf, yf, xr, yr)
    per = ref.per_sample_grads_loop(model, F.cross_entropy, xr, yr)
    for name in d:
        if d[name].numel() > 3:
            assert ref.orthogonality(d[name], per[name]) <= 1e-12
    # biases of the last layer (3 entries <= B = 3 rows) lose their whole gradient
    assert float(d["2.bias"].norm()) <= 1e-12
