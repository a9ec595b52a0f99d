"""Prints the ratio table of bench_projection.py and stores it under bench/results/."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    import os

    return f"{model}, {os.cpu_count()} cores"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def pytest_terminal_summary(terminalreporter):
    try:
        from bench_projection import RESULTS
    except ImportError:
        return
    times, mem = RESULTS["time"], RESULTS["memory"]
    if not times and not mem:
        return
    import torch

    lines = [f"machine: {_machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; commit {_commit()}", ""]
    if times:
        lines += ["| P | B | QR (ms) | torch fast (ms) | QR/fast | torch high (ms) | QR/high |", "|---|---|---|---|---|---|---|"]
        for P, B in sorted({(p, b) for (_, p, b) in times}):
            qr = times.get(("qr", P, B))
            row = [f"{P:.0e}", str(B), f"{qr * 1e3:.1f}" if qr else "failed"]
            for m in ("torch_fast", "torch_high"):
                t = times.get((m, P, B))
                row += [f"{t * 1e3:.1f}" if t else "failed", f"{qr / t:.1f}x" if (t and qr) else "-"]
            lines.append("| " + " | ".join(row) + " |")
    if mem:
        lines += ["", "| method (P=1e6, B=64) | peak extra memory (MiB) |", "|---|---|"]
        lines += [f"| {m} | {v:.0f} |" for (m, _, _), v in sorted(mem.items())]
    text = "\n".join(lines)
    terminalreporter.write_sep("=", "projection: QR time / this package's time (medians, one run)")
    terminalreporter.write_line(text)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stem = out / f"projection-cpu-{_commit()}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({
        "machine": _machine(), "torch": torch.__version__, "commit": _commit(),
        "time_s": {f"{m}|{p}|{b}": t for (m, p, b), t in times.items()},
        "peak_extra_mib": {f"{m}|{p}|{b}": t for (m, p, b), t in mem.items()},
        "orthogonality": {f"{m}|{p}|{b}": t for (m, p, b), t in RESULTS["orthogonality"].items()},
    }, indent=1))
