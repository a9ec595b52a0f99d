"""Plots of the peer benchmark: step time vs B and peak extra memory vs B, per workload.

``python bench/plot_peers.py bench/results/<machine>-<commit>.json`` writes
``<same stem>-time.png`` and ``<same stem>-memory.png`` beside the JSON (log-log axes,
one panel per workload, one line per peer). Only measured points are drawn: a peer that
is unsupported or failed a correctness check on a workload is listed in the panel's
legend as such instead of a line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

STYLE = {  # peer -> (label, colour, marker)
    "ours": ("this package", "#d62728", "o"),
    "authors": ("authors (vmap + QR)", "#1f77b4", "s"),
    "opacus": ("Opacus hooks + QR", "#2ca02c", "^"),
    "backpack": ("BackPACK + QR", "#9467bd", "v"),
    "loop": ("B=1 loop + QR", "#8c564b", "D"),
    "plain": ("plain fwd+bwd (floor)", "#7f7f7f", "x"),
}


def _series(data: dict, workload: str, peer: str, what: str):
    """([B], [value]) of measured points and the set of statuses that kept others out."""
    xs, ys, missing = [], [], set()
    for case in data["cases"]:
        if case["workload"] != workload:
            continue
        row = case["peers"].get(peer)
        if row is None:
            continue
        if what == "time":
            if row["status"] == "ok":
                xs.append(case["B"])
                ys.append(row["time_s"]["median"] * 1e3)
            else:
                missing.add(row["status"])
        else:
            mem = row.get("memory", {})
            if "mib" in mem:
                xs.append(case["B"])
                ys.append(max(mem["mib"], 0.05))  # 0 MiB (below a page) drawn at the axis floor
            elif mem:
                missing.add("unsupported" if "unsupported" in mem else "failed")
    return xs, ys, missing


def plot(json_path) -> list[Path]:
    """Write the two PNGs for one results file; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    meta = data["meta"]
    workloads = list(data["workloads"])
    peers = meta["peers"]
    out = []
    for what, ylabel, suffix in (("time", "step time (ms, median)", "time"),
                                 ("memory", "peak extra RSS of one step (MiB)", "memory")):
        cols = min(2, len(workloads))
        rows = (len(workloads) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
        for ax, wl in zip(axes.flat, workloads):
            info = data["workloads"][wl]
            for peer in peers:
                label, colour, marker = STYLE.get(peer, (peer, None, "."))
                xs, ys, missing = _series(data, wl, peer, what)
                if xs:
                    ax.plot(xs, ys, marker=marker, color=colour, label=label)
                elif missing:
                    ax.plot([], [], color=colour, linestyle="none", marker=marker,
                            label=f"{label}: {'/'.join(sorted(missing))}")
            ax.set_xscale("log", base=2)
            sizes = sorted({c["B"] for c in data["cases"] if c["workload"] == wl})
            ax.set_xticks(sizes)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.set_title(f"{info['title']} (P={info['params']:,})", fontsize=10)
            ax.set_xlabel("retain batch B (forget batch F = B)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(workloads):]:
            ax.set_visible(False)
        fig.suptitle(
            f"One OrthoGrad step ({meta['granularity']}), {what}: {meta['machine']}, {meta['threads']} thread(s), "
            f"torch {meta['torch']}, commit {meta['commit']}", fontsize=10)
        fig.tight_layout()
        path = json_path.with_name(f"{json_path.stem}-{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/plot_peers.py bench/results/<machine>-<commit>.json")
    for p in plot(sys.argv[1]):
        print(p)
