"""bench/gpu_gram_bench.py runs on the CPU with ``--device cpu --smoke`` (Triton through its
interpreter, tiny shapes), so that the one run on a lent GPU does not discover its bugs:
every code path but do_bench and the CUDA memory counters is the one the GPU runs."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_gram_bench  # noqa: E402


def test_gpu_gram_bench_smoke(capsys):
    assert gpu_gram_bench.main(["--device", "cpu", "--smoke", "--warmup-ms", "0", "--rep-ms", "1"]) == 0
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| ") and "---" not in x][1:]
    assert len(rows) == len(gpu_gram_bench.layers(smoke=True))
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(gpu_gram_bench.COLUMNS), row  # not an ERROR/MISMATCH/skipped row
        assert cells[-1].startswith("ok vs torch"), row  # the gate ran against the torch path
        for i in (6, 7, 8, 9, 10):  # plain, tri gram, tri comb, mm comb, torch gram: timed
            assert float(cells[i]) > 0, row


def test_gpu_gram_bench_time_budget(capsys):
    """Rows not started within the budget are printed as such, not dropped."""
    assert gpu_gram_bench.main(["--device", "cpu", "--smoke", "--budget-s", "-1"]) == 0
    out = capsys.readouterr().out
    assert out.count("not run (time budget)") == len(gpu_gram_bench.layers(smoke=True))
