"""SampleGram.segment_grads(): the per-segment gradients themselves, against the fp64
batch-size-1 loop on the engine's zoo (both record_grads settings, ghost and explicit
layers, ignored rows, an empty segment), per parameter, densified from (X, index).

Tolerance as test_sample_gram.py: fp64 1e-10, fp32 1e-4 relative Frobenius per tensor,
with a floor of 1e-6 of the whole for tensors whose gradient is zero in exact arithmetic.
"""
from __future__ import annotations

import pytest
import torch

from orthograd_fast.gram import SampleGram
from test_sample_gram import TOL, ZOO, ce_sum, random_segments, reference_segments, seed_torch


def dense(X, index, numel):
    if index is None:
        return X
    out = X.new_zeros((X.shape[0], numel))
    out[:, index] = X
    return out


@pytest.mark.parametrize("record_grads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(ZOO))
def test_segment_grads_match_the_loop(name, dtype, record_grads, gen):
    seed_torch(gen)
    model, make = ZOO[name]()
    model = model.to(dtype)
    x, y = make(13, gen)
    x = x.to(dtype) if x.is_floating_point() else x
    seg, S = random_segments(13, gen)
    sg = SampleGram(model, record_grads=record_grads)
    with sg.record(seg, num_segments=S):
        ce_sum(model(x), y).backward()
    got = sg.segment_grads()
    want = reference_segments(model, x, y, seg, S)
    total = sum(float(g.norm()) for g in want.values())
    for n, g in want.items():
        X, index = got[n]
        assert X.shape[0] == S
        Xd = dense(X, index, g[0].numel()).double()
        err = float((Xd - g.reshape(S, -1)).norm()) / max(float(g.norm()), 1e-6 * total)
        assert err < TOL[dtype], (n, err, sg.coverage()[n])
    # the Grams still come out the same afterwards
    K = sg.gram()
    assert torch.isfinite(K).all()


def test_segment_grads_refuses_unknown_names(gen):
    model, make = ZOO["mlp"]()
    x, y = make(4, gen)
    sg = SampleGram(model)
    with sg.record(torch.arange(4)):
        ce_sum(model(x), y).backward()
    with pytest.raises(ValueError, match="not served"):
        sg.segment_grads(["nope"])
