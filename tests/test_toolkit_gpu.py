"""unlearn() with the model and data on a CUDA device (run by bench/gpu_check.sh; skipped
without one): the BatchNorm CNN and the tiny causal LM of test_toolkit_unlearn against the
CPU fp64 reference, and the caller's CPU and CUDA RNG states untouched by a run whose
baselines draw dropout masks on the device.

``ORTHOGRAD_GPU_TEST_DEVICE=cpu`` runs the same tests on the CPU, to check this file where
there is no GPU.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from test_toolkit_unlearn import (FREEZE, TinyCausalLM, _assert_direction, _bn_cnn, _ce_item, _delta, _lm_case,
                                  _loader, _params, _reference_perp, _seq_nll, _warm_bn)
from torch import nn

from orthograd_fast import unlearn

DEVICE = os.environ.get("ORTHOGRAD_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


def _on(batches):
    return [{k: v.to(DEVICE) for k, v in b.items()} for b in batches]


def test_batchnorm_cnn_on_device(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = _bn_cnn(torch.float64)
    _warm_bn(model, gen, torch.float64)
    model.train()
    B, NF = 8, 6
    xr, yr = torch.randn(B, 2, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    xf, yf = torch.randn(NF, 2, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (NF,), generator=gen)
    original = copy.deepcopy(model)
    model = model.to(DEVICE)
    before, lr = _params(model), 0.5
    unlearn(model, _loader(xr.to(DEVICE), yr.to(DEVICE), B), _loader(xf.to(DEVICE), yf.to(DEVICE), NF),
            steps=1, lr=lr, max_grad_norm=None, stop=FREEZE)
    got = {n: d.cpu() for n, d in _delta(before, model, lr).items()}
    want, _ = _reference_perp(original, _ce_item, list(zip(xf, yf)), list(zip(xr, yr)))
    _assert_direction(got, want)


def test_tiny_causal_lm_on_device(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = TinyCausalLM(23).double()
    forget, retain, fl, rl = _lm_case(gen, 23)
    original = copy.deepcopy(model)
    model = model.to(DEVICE)
    before, lr = _params(model), 0.5
    unlearn(model, _on(rl), _on(fl), task="lm", steps=1, lr=lr, max_grad_norm=None, stop=FREEZE)
    got = {n: d.cpu() for n, d in _delta(before, model, lr).items()}

    def loss_of(m, item):
        return _seq_nll(m(item[0][None])[0], item[1])

    want, _ = _reference_perp(original, loss_of, forget, retain)
    _assert_direction(got, want)


@pytest.mark.parametrize("method", ["orthograd", "neggrad", "retrain"])
def test_device_rng_untouched(gen, method):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DEVICE)
    x, y = torch.randn(40, 6, device=DEVICE), torch.randint(0, 3, (40,), device=DEVICE)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if DEVICE == "cuda" else None
    unlearn(model, _loader(x[:30], y[:30], 10), _loader(x[30:], y[30:], 5), method=method, steps=3, stop=FREEZE)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
