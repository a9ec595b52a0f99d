"""Plots of a ``compare`` run (PNG, matplotlib without pyplot: no global backend change).

Figure layout. Top row, per unlearning step (one colour per method, one line per seed,
curves of the first retain size): forget accuracy, test accuracy, and the trade-off
(test accuracy against forget accuracy along each run). Middle row, final metrics per
method (mean over seeds, error bars = std): forgetting metrics on [0, 1], utility (RA, TA)
on a zoomed axis, and Avg. Gap to retrain with the retrain seed-noise floor dashed. With a
retain-size sweep, a bottom row of forget accuracy, test accuracy and Avg. Gap against the
retain-set size.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

FORGET_METRICS = (("forget_acc", "forget acc"), ("mia_efficacy", "MIA-eff."), ("loss_mia_auc", "loss-MIA AUC"))
UTILITY_METRICS = (("retain_acc", "RA"), ("test_acc", "TA"))


def _colors(methods: Sequence[str]) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_compare(
    curves: Mapping[str, Sequence[Sequence[Mapping]]],
    summary: Mapping[str, Mapping[str, tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "",
    sweep: Mapping[str, Mapping[int, Mapping[str, tuple[float, float]]]] | None = None,
) -> Path:
    """Write the comparison figure to ``path`` (PNG) and return it.

    curves: {method: [history per seed]}, a history being a list of {step, forget_acc,
    test_acc}; summary: {row label: {metric: (mean, std)}} in display order; sweep:
    {method: {retain size: {metric: (mean, std)}}} (None or one size: no sweep row).
    """
    from matplotlib.figure import Figure

    rows = 3 if sweep and any(len(v) > 1 for v in sweep.values()) else 2
    fig = Figure(figsize=(16, 4.4 * rows), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=10)
    gs = fig.add_gridspec(rows, 3)
    colors = _colors(list(summary))

    def lines(ax, xkey, ykey):
        lo = 1.0
        for method, runs in curves.items():
            for i, hist in enumerate(runs):
                pts = [(h[xkey], h[ykey]) for h in hist if xkey in h and ykey in h]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                lo = min(lo, min(ys))
                ax.plot(xs, ys, color=colors.get(method), alpha=0.85, lw=1.4,
                        marker="." if len(xs) < 3 else None, label=method if i == 0 else None)
        ax.grid(alpha=0.3)
        return lo

    ax = fig.add_subplot(gs[0, 0])
    lines(ax, "step", "forget_acc")
    ax.set(xlabel="unlearning step", ylabel="forget accuracy", ylim=(-0.03, 1.03))
    ax.legend(fontsize=8)
    ax = fig.add_subplot(gs[0, 1])
    lo = lines(ax, "step", "test_acc")
    ax.set(xlabel="unlearning step", ylabel="test accuracy", ylim=(max(0.0, lo - 0.03), 1.0))
    ax = fig.add_subplot(gs[0, 2])
    lo = lines(ax, "forget_acc", "test_acc")
    ax.set(xlabel="forget accuracy", ylabel="test accuracy", ylim=(max(0.0, lo - 0.03), 1.0), xlim=(1.03, -0.03))
    ax.set_title("trade-off along each run (left to right = time)", fontsize=9)

    labels = list(summary)
    width = 0.8 / max(len(labels), 1)

    def bars(ax, metrics):
        x = np.arange(len(metrics))
        lo = 1.0
        for i, lab in enumerate(labels):
            means = np.array([summary[lab].get(k, (np.nan, np.nan))[0] for k, _ in metrics], dtype=float)
            stds = np.array([summary[lab].get(k, (np.nan, np.nan))[1] for k, _ in metrics], dtype=float)
            if np.isfinite(means).any():
                lo = min(lo, np.nanmin(means - np.nan_to_num(stds)))
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, means, width, yerr=stds,
                   color=colors.get(lab), label=lab, capsize=2)
        ax.set_xticks(x, [lab for _, lab in metrics])
        ax.grid(axis="y", alpha=0.3)
        return lo

    ax = fig.add_subplot(gs[1, 0])
    bars(ax, FORGET_METRICS)
    ax.set(ylim=(0, 1.05), title="forgetting")
    ax = fig.add_subplot(gs[1, 1])
    lo = bars(ax, UTILITY_METRICS)
    ax.set(ylim=(max(0.0, lo - 0.05), 1.0), title="utility (zoomed)")
    ax.legend(ncol=2, fontsize=8, loc="lower right")
    ax = fig.add_subplot(gs[1, 2])
    gaps = [summary[lab].get("avg_gap", (np.nan, np.nan)) for lab in labels]
    xs = np.arange(len(labels))
    ax.bar(xs, [g[0] for g in gaps], yerr=[g[1] for g in gaps], color=[colors[lab] for lab in labels], capsize=2)
    if "retrain" in summary and np.isfinite(summary["retrain"].get("avg_gap", (np.nan,))[0]):
        ax.axhline(summary["retrain"]["avg_gap"][0], ls="--", color="k", lw=1, label="retrain seed noise")
        ax.legend(fontsize=8)
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set(title="Avg. Gap to retrain (lower is better)")
    ax.grid(axis="y", alpha=0.3)

    if rows == 3:
        for col, (key, label) in enumerate(
            (("forget_acc", "forget accuracy"), ("test_acc", "test accuracy"), ("avg_gap", "Avg. Gap to retrain"))
        ):
            ax = fig.add_subplot(gs[2, col])
            for method, by_size in sweep.items():
                sizes = sorted(by_size)
                m = [by_size[s][key][0] for s in sizes]
                sd = [by_size[s][key][1] for s in sizes]
                ax.errorbar(sizes, m, yerr=sd, color=colors.get(method), marker="o", capsize=2, label=method)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("retain-set size")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
