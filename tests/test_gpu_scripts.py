"""The GPU check's two scripts (bench/peers_gpu.py, bench/gpu_bench.py) run on the CPU with
``--device cpu`` and tiny sizes, so that the one run on a lent GPU does not discover their
bugs: every code path but do_bench and the CUDA memory counters is the one the GPU runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_bench  # noqa: E402
import peers_gpu  # noqa: E402

SMOKE = ["--device", "cpu", "--rep-ms", "5", "--warmup-ms", "1"]


def test_peers_gpu_smoke(tmp_path, capsys):
    out_json = tmp_path / "peers.json"
    rc = peers_gpu.main([*SMOKE, "--workloads", "digits-mlp", "--batch-sizes", "4",
                         "--peers", "ours,authors,loop,plain", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| digits MLP 64-128-10 | 4 | " in out
    row = json.loads(out_json.read_text())["rows"][0]["peers"]
    for name in ("ours", "authors", "loop", "plain"):
        assert row[name]["status"] == "ok", row[name]
        assert row[name]["ms"]["median"] > 0 and row[name]["memory_mib"] is None
    for name in ("ours", "authors", "loop"):  # the correctness gate ran for each projecting peer
        assert row[name]["check"]["orthogonality"] < 1e-3


def test_peers_gpu_time_budget(capsys):
    """Rows not started within the budget are printed as such, not dropped."""
    rc = peers_gpu.main([*SMOKE, "--workloads", "digits-mlp", "--batch-sizes", "4,8", "--peers", "ours,plain",
                         "--budget-s", "-1"])
    assert rc == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| digits")]
    assert len(lines) == 2 and all("not run (time budget)" in x for x in lines)


def test_gpu_bench_smoke(capsys):
    assert gpu_bench.main(["--device", "cpu", "--sizes", "2000", "--batch-sizes", "3", "--dtypes", "float32"]) == 0
    cells = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert cells[:3] == ["2e+03", "3", "float32"]
    # floor (a number; 0.000 ms at this size), triton, triton high, torch and QR all timed:
    # numbers, not FAILED/ERROR/OOM
    assert float(cells[3]) >= 0, cells
    for i in (4, 6, 7, 8):
        assert float(cells[i]) > 0, cells
