"""bench/bench_sample_gram.py's TorchJD peer, tiny: its segment Gram must pass the check
against this package's before it is timed, and the check must reject a wrong Gram. (The
table itself is not run in tests: it takes minutes.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_sample_gram as bsg  # noqa: E402


@pytest.fixture
def small_batch(monkeypatch):
    monkeypatch.setattr(bsg, "B", 4)


def test_help():
    out = subprocess.run([sys.executable, str(BENCH / "bench_sample_gram.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--paths" in out


def test_torchjd_peer_step_and_check(small_batch):
    pytest.importorskip("torchjd")
    r = bsg.worker("mlp", "torchjd", reps=1, budget_s=0.0, threads=1)
    assert r["best_s"] > 0 and r["plain_best_s"] > 0
    assert r["gram_rel_err"] < 1e-4  # measured ~2e-5 at this size; the gate's bound is 4·u·sqrt(P·S)
    step = bsg.make_step("mlp", "torchjd")
    K = step.gram()
    step.gram = lambda: K * torch.linspace(0.9, 1.1, K.shape[0], dtype=K.dtype)  # one row scaled by 10 %
    with pytest.raises(RuntimeError, match="differs from ours"):
        bsg.check_gram("mlp", step)


def test_torchjd_step_writes_the_combination(small_batch):
    """After a TorchJD step .grad is Σ_s w_s g_s with the weights of its own Gram: the same
    as this package's combine with those weights."""
    pytest.importorskip("torchjd")
    from orthograd_fast.gram import SampleGram

    step = bsg.make_step("mlp", "torchjd")
    K = step.gram()
    step()
    got = [p.grad.clone() for p in step.model.parameters()]
    model, xf, yf, xr, yr = bsg.build("mlp")
    B = bsg.B
    seg = torch.cat([torch.full((B,), B), torch.arange(B)])
    with SampleGram(model) as sg:
        with sg.record(seg, num_segments=B + 1):
            bsg.ce_sum(model(torch.cat([xf, xr])), torch.cat([yf, yr])).backward()
        c = torch.linalg.lstsq(K[:B, :B], K[:B, B:]).solution.flatten()
        sg.combine(torch.cat([-c, torch.ones(1, dtype=torch.float64)]))
    for g, p in zip(got, model.parameters()):
        assert float((g - p.grad).norm() / p.grad.norm()) < 1e-3
