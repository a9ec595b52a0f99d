"""bench/gpu_step_bench.py runs on the CPU with ``--device cpu --smoke`` (Triton through its
interpreter, tiny models), so that the one run on a lent GPU does not discover its bugs:
every code path but do_bench, CUDA events and the memory counters is the one the GPU runs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_step_bench  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in x.strip().strip("|").split("|")] for x in out.splitlines()
            if x.startswith("| ") and not x.startswith("| model")]


def test_gpu_step_bench_smoke(capsys):
    assert gpu_step_bench.main(["--device", "cpu", "--smoke", "--budget-s", "1e9"]) == 0
    out = capsys.readouterr().out
    got = rows(out)
    names = [m for m, _, _ in gpu_step_bench.models(smoke=True, blocks=1)]
    assert [r[:2] for r in got] == [[m, p] for m in names for p in gpu_step_bench.PATHS]
    have_torchjd = importlib.util.find_spec("torchjd") is not None
    for r in got:
        if r[1] == "torchjd" and not have_torchjd:
            assert r[2].startswith("not installed"), r
            continue
        assert float(r[2]) > 0 and r[3].endswith("x"), r  # timed: not an ERROR/MISMATCH/OOM row
        if r[1] in gpu_step_bench.ENGINE_PATHS or r[1] == "torchjd":
            assert r[6] == "reference" if r[1] == "torch" else r[6].startswith("Gram "), r  # the gate ran
    for m in names:
        assert f"{m}: torch/triton " in out


def test_gpu_step_bench_time_budget(capsys):
    """Rows not started within the budget are printed as such, not dropped."""
    assert gpu_step_bench.main(["--device", "cpu", "--smoke", "--budget-s", "-1", "--paths", "plain,triton"]) == 0
    got = rows(capsys.readouterr().out)
    assert len(got) == 2 * len(gpu_step_bench.models(smoke=True, blocks=1))
    assert all(r[2] == "not run (time budget)" for r in got)
