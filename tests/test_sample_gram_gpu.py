"""SampleGram and OrthoGrad on a CUDA device (run by bench/gpu_check.sh; skipped without
one). The zoo's Grams and combinations against the fp64 batch-size-1 loop reference on the
CPU, and OrthoGrad's written direction against fp64 per-sample gradients. What only a
device can break: index_add_ and segment plans on CUDA, the anchored first convolution,
the solve's trip to the CPU and back, TF32 leaking into the Grams (conftest turns TF32 off
for the model's own passes; the engine turns it off while it forms Grams).

``ORTHOGRAD_GPU_TEST_DEVICE=cpu`` runs the same tests on the CPU, to check this file
where there is no GPU.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from test_sample_gram import TOL, ZOO, random_segments, reference_segments, rel, run, seed_torch

from orthograd_fast import OrthoGrad
from orthograd_fast import reference as ref

DEVICE = os.environ.get("ORTHOGRAD_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


def _zoo_case(name, dtype, gen, N=17):
    seed_torch(gen)
    model, make = ZOO[name]()
    model = model.to(dtype)
    x, y = make(N, gen)
    x = x.to(dtype) if x.is_floating_point() else x
    seg, S = random_segments(N, gen)
    return model, x, y, seg, S


@pytest.mark.parametrize("record_grads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_on_device(name, dtype, record_grads, gen):
    model, x, y, seg, S = _zoo_case(name, dtype, gen)
    gs = reference_segments(model, x, y, seg, S)  # CPU, fp64
    dev = torch.device(DEVICE)
    on_dev = copy.deepcopy(model).to(dev)
    sg = run(on_dev, x.to(dev), y.to(dev), seg.to(dev), S, record_grads=record_grads)
    K = sg.gram()
    assert K.device.type == dev.type and K.dtype == torch.float64
    Kref = ref.gram_from_grads(gs)
    assert rel(K.cpu(), Kref) < TOL[dtype], rel(K.cpu(), Kref)
    w = torch.randn(S, generator=gen, dtype=torch.float64)
    sg.combine(w.to(dev))
    for n, p in on_dev.named_parameters():
        if n in gs:
            expected = torch.einsum("s,s...->...", w, gs[n])
            assert p.grad is not None and p.grad.device.type == dev.type, n
            assert rel(p.grad.cpu(), expected) < TOL[dtype], (n, rel(p.grad.cpu(), expected))
    sg.close()


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_orthograd_step_on_device(name, granularity, gen):
    """fp64 model on the device, one step with lr 0: the direction written into .grad is
    orthogonal to every fp64 per-sample retain gradient (per tensor for per_tensor)."""
    seed_torch(gen)
    model, make = ZOO[name]()
    model = model.double()
    xf, yf = make(5, gen)
    xr, yr = make(6, gen)
    xf, xr = [t.double() if t.is_floating_point() else t for t in (xf, xr)]
    per = ref.per_sample_grads_loop(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), xr, yr)
    dev = torch.device(DEVICE)
    on_dev = copy.deepcopy(model).to(dev)
    with OrthoGrad(on_dev, torch.optim.SGD(on_dev.parameters(), lr=0.0), granularity=granularity) as og:
        stats = og.step((xf.to(dev), yf.to(dev)), (xr.to(dev), yr.to(dev)))
    assert stats["rank"] > 0
    names = [n for n, p in on_dev.named_parameters() if p.grad is not None]
    d = {n: dict(on_dev.named_parameters())[n].grad.cpu() for n in names}
    if granularity == "global":
        assert ref.orthogonality([d[n] for n in names], [per[n] for n in names]) < 1e-9
    else:  # a tensor whose forget gradient lies in its retain span is projected to ~0 whole
        params = dict(model.named_parameters())
        gu = dict(zip(names, torch.autograd.grad(F.cross_entropy(model(xf), yf), [params[n] for n in names])))
        checked = [n for n in names if float(d[n].norm()) > 1e-8 * float(gu[n].norm())]
        assert checked
        for n in names:
            if n in checked:
                assert ref.orthogonality([d[n]], [per[n]]) < 1e-9, n
            else:  # legitimately ~0: the fp64 SVD projection of g_u leaves nothing either
                assert float(ref.project_svd(gu[n], per[n], 1e-7).norm()) <= 1e-6 * float(gu[n].norm()), n
