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


SWEEP_METRICS = (("uis", "UIS (lower is better)"), ("avg_gap", "Avg. Gap to retrain (lower is better)"),
                 ("test_acc", "test accuracy"))


def _variant_style(variants: Sequence[str]) -> dict:
    """{variant: plot kwargs}: OrthoGrad thick, its ablations dashed in its colour family."""
    colors = _colors([v for v in variants if not v.startswith("orthograd")] + ["orthograd"])
    style = {}
    for v in variants:
        if v == "orthograd":
            style[v] = {"color": colors["orthograd"], "lw": 2.6, "zorder": 5}
        elif v.startswith("orthograd"):
            style[v] = {"color": colors["orthograd"], "lw": 1.4, "ls": "--" if "mean" in v else ":"}
        else:
            style[v] = {"color": colors[v], "lw": 1.3}
    return style


def plot_retain_sweep(
    cells: Mapping[str, Mapping[int, Mapping[str, Mapping[str, Mapping[str, float]]]]],
    references: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    path: str | Path,
    *,
    variants: Sequence[str],
    metrics: Sequence[tuple[str, str]] = SWEEP_METRICS,
    title: str = "",
) -> Path:
    """The retain-size figure of ``bench/unlearning_study.py`` (PNG): one row per forgetting
    kind, one column per metric, one line per variant (mean over seeds) with its 95 %
    band; the retrain oracle dashed black (its noise floor for Avg. Gap) and the
    original model dotted grey, each with its band.

    cells: {kind: {retain size: {variant: {metric: {"mean", "lo", "hi"}}}}} (sizes as int
    or str keys); references: {kind: {"original"/"retrain": {metric: {"mean", "lo", "hi"}}}}.
    """
    from matplotlib.figure import Figure

    kinds = list(cells)
    fig = Figure(figsize=(5.2 * len(metrics), 4.2 * len(kinds)), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=10)
    style = _variant_style(variants)
    for i, kind in enumerate(kinds):
        sizes = sorted(cells[kind], key=int)
        xs = np.array([int(s) for s in sizes], dtype=float)
        for j, (key, label) in enumerate(metrics):
            ax = fig.add_subplot(len(kinds), len(metrics), i * len(metrics) + j + 1)
            for v in variants:
                c = [cells[kind][s][v][key] for s in sizes]
                mean = np.array([x["mean"] for x in c], dtype=float)
                lo = np.array([x["lo"] for x in c], dtype=float)
                hi = np.array([x["hi"] for x in c], dtype=float)
                ax.plot(xs, mean, marker="o", ms=3, label=v, **style[v])
                ax.fill_between(xs, lo, hi, color=style[v]["color"], alpha=0.12, lw=0)
            for who, ls, color in (("retrain", "--", "k"), ("original", ":", "0.5")):
                ref = references.get(kind, {}).get(who, {}).get(key)
                if ref is None or not np.isfinite(ref["mean"]) or (who == "original" and key != "test_acc"):
                    continue
                ax.axhline(ref["mean"], ls=ls, color=color, lw=1,
                           label=f"{who}{' (noise floor)' if key == 'avg_gap' and who == 'retrain' else ''}")
                if np.isfinite(ref["lo"]):
                    ax.axhspan(ref["lo"], ref["hi"], color=color, alpha=0.08, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(int(x)) for x in xs])
            ax.set(xlabel="retain-set size", ylabel=label, title=f"{kind} forgetting: {label.split(' (')[0]}")
            ax.grid(alpha=0.3)
            if i == 0 and j == len(metrics) - 1:
                ax.legend(fontsize=7, loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def plot_ablation(
    paired: Mapping[str, Mapping[int, Mapping[str, Mapping[str, Mapping[str, float]]]]],
    path: str | Path,
    *,
    ablations: Sequence[str],
    reference: str = "orthograd",
    metrics: Sequence[tuple[str, str]] = SWEEP_METRICS,
) -> Path:
    """Paired differences ``reference`` − ablation against the retain size (PNG): one row
    per forgetting kind, one column per metric, mean with its 95 % band, 0 marked.

    paired: {kind: {retain size: {ablation: {metric: {"mean", "lo", "hi"}}}}}.
    """
    from matplotlib.figure import Figure

    kinds = list(paired)
    fig = Figure(figsize=(5.2 * len(metrics), 3.8 * len(kinds)), layout="constrained")
    style = _variant_style([reference, *ablations])
    for i, kind in enumerate(kinds):
        sizes = sorted(paired[kind], key=int)
        xs = np.array([int(s) for s in sizes], dtype=float)
        for j, (key, label) in enumerate(metrics):
            ax = fig.add_subplot(len(kinds), len(metrics), i * len(metrics) + j + 1)
            ax.axhline(0.0, color="k", lw=0.8)
            for v in ablations:
                c = [paired[kind][s][v][key] for s in sizes]
                ax.plot(xs, [x["mean"] for x in c], marker="o", ms=3, label=f"{reference} − {v}", **style[v])
                ax.fill_between(xs, [x["lo"] for x in c], [x["hi"] for x in c], color=style[v]["color"],
                                alpha=0.15, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(int(x)) for x in xs])
            ax.set(xlabel="retain-set size", ylabel=f"difference in {label.split(' (')[0]}",
                   title=f"{kind} forgetting")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
