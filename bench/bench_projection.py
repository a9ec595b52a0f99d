"""CPU benchmark: project_orthogonal (torch backend) vs the authors' QR path.

``make bench`` runs it. Every case is first checked for correctness (orthogonality of the
result and agreement with QR on these well-conditioned inputs); a case that fails is
reported as failed and gets no ratio. The ratio table (QR time / this package's time,
medians from this one run) and the peak extra memory are printed at the end and written
to bench/results/projection-cpu-<commit>.{json,md}.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from projection_cases import METHODS, make_inputs, orthogonality_chunked

SIZES = [(P, B) for P in (100_000, 1_000_000, 4_000_000) for B in (16, 64)]
_inputs: dict = {}
RESULTS: dict = {"time": {}, "memory": {}, "orthogonality": {}}


def _get(P, B):
    if (P, B) not in _inputs:
        _inputs.clear()  # keep one input set alive (4e6 x 64 fp32 is 1 GiB)
        _inputs[(P, B)] = make_inputs(P, B)
    return _inputs[(P, B)]


@pytest.mark.parametrize("P,B", SIZES, ids=[f"P{P:.0e}-B{B}" for P, B in SIZES])
@pytest.mark.parametrize("method", list(METHODS))
def test_projection_time(benchmark, method, P, B):
    g, G = _get(P, B)
    fn = METHODS[method]
    r = fn(g, G)
    orth = orthogonality_chunked(r, G)
    RESULTS["orthogonality"][(method, P, B)] = orth
    assert orth <= 1e-5, f"{method} is not orthogonal enough ({orth:.2e}): no timing reported"
    if method != "qr":
        r_qr = METHODS["qr"](g[: 1 << 17], G[:, : 1 << 17]) if P > (1 << 17) else METHODS["qr"](g, G)
        r_me = fn(g[: 1 << 17], G[:, : 1 << 17]) if P > (1 << 17) else r
        assert float((r_me - r_qr).norm() / r_qr.norm()) <= 1e-4
    benchmark.group = f"P={P:.0e}, B={B}"
    benchmark.extra_info.update(method=method, P=P, B=B, orthogonality=orth)
    rounds = 2 if (method == "qr" and P >= 4_000_000) else 5
    benchmark.pedantic(fn, args=(g, G), rounds=rounds, warmup_rounds=1)
    RESULTS["time"][(method, P, B)] = benchmark.stats.stats.median


@pytest.mark.parametrize("method", list(METHODS))
def test_projection_peak_memory(method):
    """Peak extra RSS of one call at P=1e6, B=64, each method in a fresh process."""
    P, B = 1_000_000, 64
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("projection_cases.py")), method, str(P), str(B)],
        capture_output=True, text=True, check=True,
    )
    mib = float(out.stdout.strip())
    RESULTS["memory"][(method, P, B)] = mib
    if method.startswith("torch"):
        # O(P + B²): r and a few (B, CHUNK) buffers, never a second (B, P) matrix (244 MiB)
        assert mib < 0.25 * P * B * 4 / 2**20, f"{method} used {mib:.0f} MiB extra"
