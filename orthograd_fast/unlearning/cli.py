"""``orthograd-fast``: run unlearning experiments from the command line.

    orthograd-fast unlearn --data digits --forget class:3 --method orthograd
    orthograd-fast compare --data digits --forget class:3 --methods all --seeds 3 --retain-size 64
    orthograd-fast compare --data digits --forget class:3 --methods orthograd,neggrad_plus --retain-size sweep
    orthograd-fast compare --recipe fashion-mnist-cnn --forget random:500 --seeds 5 --retain-size 8,32,128

``--recipe NAME`` takes the data set, training subset, model and training config of an
original model from ``training.RECIPES`` (recipes that memorise their training set, as the
paper's models do; ``--train-epochs`` still overrides the epochs); ``--data``, ``--model``,
``--train-subset`` or ``--hidden`` given beside it must agree with it.

Protocol (per seed s): the original model is trained on all of D_train and the retrain
oracle on D_r with the same recipe and seed (both cached on disk, ``--cache-dir``); D_f
and the retain subset the methods see are drawn with seed s; every method starts from a
copy of the original model. Stopping: forget accuracy ≤ the retrain level (class
forgetting: mean retrain forget accuracy over the seeds) or ≤ the original model's test
accuracy (random forgetting, the paper's rule), the step budget, and optionally a val
accuracy drop budget (``--max-val-drop``; the val set is only used then). Metrics:
``orthograd_fast.unlearning.metrics``, on the final models. The test accuracy recorded along each run
(the plot's curves) uses a fixed subset of at most 2000 test samples.

Outputs in ``--out`` (default ``runs/<timestamp>-<config hash>``; the folder is made before
any work, or refused in one line: an existing file, a path under a file, a place where no
folder can be made or written): results.json (config, per-run metrics and curves, the
summary), forget_idx_seed<s>.npy, plot.png, and for ``unlearn`` the unlearned weights
(model.pt). The results table is printed last.
Also runnable as ``python -m orthograd_fast.cli`` (a shim for this module).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from . import datasets as _datasets
from . import metrics as _metrics
from . import models as _models
from . import splits as _splits
from . import training as _training
from .methods import METHODS, check_method, method_options
from .runner import StopRule, run_unlearning

SWEEP_SIZES = (8, 16, 32, 64, 128)
TABLE_NOTES = (
    "Forget = forget-set acc (UA = 100 - Forget); RA/TA = retain/test acc (class forgetting: TA on\n"
    "the remaining classes); AvgGap = mean |diff| to retrain over UA, MIA-eff, RA, TA (retrain row:\n"
    "retrain-vs-retrain seed noise floor); AtkBAcc = the MIA's own cross-validated balanced accuracy on\n"
    "retain vs test (reference models; near 50: MIA-eff means nothing); Time = unlearning wall time\n"
    "(retrain: its training time)."
)
CURVE_TEST_SAMPLES = 2000  # test accuracy along the runs (plots) uses at most this many samples
AUTO_EVAL_FORGET = 2000  # --eval-every auto: every step up to this forget-set size, else every 5
ORTHOGRAD_METHODS = ("orthograd", "orthograd_mean")
TABLE_COLUMNS = (
    ("forget_acc", "Forget%", 100), ("retain_acc", "RA%", 100), ("test_acc", "TA%", 100),
    ("mia_efficacy", "MIA-eff%", 100), ("mia_bacc", "AtkBAcc%", 100), ("loss_mia_auc", "LossAUC", 1), ("uis", "UIS", 1),
    ("aus", "AUS", 1), ("avg_gap", "AvgGap%", 100), ("steps", "Steps", None), ("seconds", "Time s", None),
)


# --------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------
def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def _per_method(text: str | None, what: str, cast=float) -> dict:
    """'0.1' -> {"*": 0.1}; 'orthograd=0.2,neggrad=0.05' -> per method."""
    if text is None:
        return {}
    out = {}
    for part in text.split(","):
        if "=" in part:
            m, _, v = part.partition("=")
            check_method(m.strip())
            key = m.strip()
        else:
            key, v = "*", part
        try:
            out[key] = cast(v)
        except ValueError:
            raise ValueError(f"--{what}: cannot read {v!r} as a number") from None
    return out


def _parse_sets(items: list[str] | None) -> dict:
    out: dict[str, dict] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set expects method.option=value, got {item!r}")
        key, _, value = item.partition("=")
        method, _, opt = key.partition(".")
        check_method(method)
        if opt not in method_options(method):
            raise ValueError(f"--set {item}: {method} has no option {opt!r} (options: {method_options(method)})")
        out.setdefault(method, {})[opt] = _parse_value(value)
    return out


def _parse_sizes(text: str | None) -> list[int | None]:
    if text is None or text.strip().lower() == "all":
        return [None]
    if text.strip().lower() == "sweep":
        return list(SWEEP_SIZES)
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--retain-size must be an int, a comma list, 'sweep' or 'all', got {text!r}") from None
    if any(s <= 0 for s in sizes):
        raise ValueError(f"--retain-size values must be positive, got {text!r}")
    return sorted(set(sizes))


def _parse_methods(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return list(METHODS)
    methods = [check_method(m.strip()) for m in text.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty")
    return sorted(set(methods), key=METHODS.index)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and models")
    a = g.add_argument
    a("--recipe", default=None, choices=tuple(_training.RECIPES),
      help="a named original-model recipe (data, training subset, model, training config) that memorises")
    a("--data", default=None, help=f"one of {', '.join(_datasets.names())} (digits: bundled, default; "
      "fashion-mnist: `make data`)")
    a("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    a("--train-subset", type=int, default=None, help="fashion-mnist: train on a stratified subset of this size")
    a("--forget", default="class:3", help="class:K[,K2], random:FRACTION or random:COUNT (default class:3)")
    a("--model", default=None, choices=_models.names(), help="architecture (default mlp)")
    a("--hidden", default=None, help="MLP hidden widths, e.g. 256 or 256,128")
    a("--train-epochs", type=int, default=None, help="epochs of the original/retrain recipe")
    a("--cache-dir", default=None, help="model cache (default $ORTHOGRAD_FAST_CACHE or ~/.cache/orthograd_fast)")
    a("--no-cache", action="store_true", help="always train the original and retrain models")
    a("--no-retrain", action="store_true", help="skip the retrain oracle (no Avg. Gap; class target 0)")
    g = p.add_argument_group("unlearning")
    a = g.add_argument
    a("--lr", default=None, help="step size: one value, or method=value,... (default: each method's own)")
    a("--steps", type=int, default=None, help="step budget per run (default: each method's own)")
    a("--max-grad-norm", default="default", help="clip the update norm (a float, or none)")
    a("--alpha", type=float, default=None, help="OrthoGrad retain-descent weight α (default 0)")
    a("--granularity", choices=("global", "per_tensor"), default=None, help="OrthoGrad projection granularity")
    a("--backend", default="auto", help="SampleGram backend for OrthoGrad")
    a("--set", action="append", metavar="METHOD.OPTION=VALUE",
      help="any method option, e.g. neggrad_plus.alpha=0.7 (repeatable)")
    a("--retain-batch", type=int, default=64, help="retain batch size B (capped at the retain-set size)")
    a("--forget-batch", type=int, default=32, help="forget batch size")
    a("--forget-target", default="auto", help="stop at forget acc <= this: a fraction, auto, or none")
    a("--max-val-drop", type=float, default=None, help="stop and roll back if val acc drops by more than this")
    a("--eval-every", default="auto",
      help=f"check the stopping rules every N steps (auto: 1, or 5 above {AUTO_EVAL_FORGET} forget samples)")
    g = p.add_argument_group("output")
    a = g.add_argument
    a("--out", default=None, help="output folder (default runs/<timestamp>-<config hash>)")
    a("--no-plot", action="store_true", help="do not write plot.png")
    a("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orthograd-fast",
        description="Machine unlearning with OrthoGrad and baselines, against the retrain-from-scratch oracle.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("unlearn", help="unlearn with one method and report the metrics")
    p.add_argument("--method", default="orthograd", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retain-size", default="64", help="retain-set size the method sees (int or 'all'; default 64)")
    _add_common(p)
    p = sub.add_parser("compare", help="compare methods over seeds (and retain-set sizes)")
    p.add_argument("--methods", default="all", help=f"'all' or a comma list of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--retain-size", default="64", help="int, comma list, 'sweep' (8,16,32,64,128) or 'all'")
    _add_common(p)
    return parser


# --------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------
def _resolve_recipe(args) -> argparse.Namespace:
    """A copy of ``args`` with data/model/train_subset filled from ``--recipe`` (or the
    defaults digits/mlp); ValueError when an explicit option disagrees with the recipe."""
    args = argparse.Namespace(**vars(args))
    if getattr(args, "recipe", None) is None:
        args.recipe = None
        args.data = args.data or "digits"
        args.model = args.model or "mlp"
        return args
    r = _training.recipe(args.recipe)
    if args.hidden is not None:
        raise ValueError(f"--recipe {r.name} sets the model ({r.model}): drop --hidden")
    for opt, given, value in (("data", args.data, r.dataset), ("model", args.model, r.model.arch),
                              ("train-subset", args.train_subset, r.train_subset)):
        if given is not None and (given != value and not (opt == "data" and _datasets.entry(given).name == value)):
            raise ValueError(f"--recipe {r.name} sets --{opt} {value}, but --{opt} {given} was given: drop one")
    args.data, args.model, args.train_subset = r.dataset, r.model.arch, r.train_subset
    return args


def _configs(args, ds):
    if args.recipe is not None:
        r = _training.recipe(args.recipe)
        tcfg = r.train
        if args.train_epochs is not None:
            if args.train_epochs <= 0:
                raise ValueError("--train-epochs must be positive")
            tcfg = _training.TrainConfig(args.train_epochs, tcfg.batch_size, tcfg.lr, tcfg.momentum,
                                         tcfg.weight_decay)
        return r.model, tcfg
    mcfg, tcfg = _training.default_configs(ds.name, args.model)
    if args.hidden is not None:
        try:
            hidden = tuple(int(h) for h in args.hidden.split(","))
        except ValueError:
            raise ValueError(f"--hidden must be comma-separated ints, got {args.hidden!r}") from None
        mcfg = _models.ModelConfig(mcfg.arch, hidden, mcfg.channels)
    if args.train_epochs is not None:
        if args.train_epochs <= 0:
            raise ValueError("--train-epochs must be positive")
        tcfg = _training.TrainConfig(args.train_epochs, tcfg.batch_size, tcfg.lr, tcfg.momentum, tcfg.weight_decay)
    return mcfg, tcfg


def _method_kwargs(args, method: str, sets: dict, lrs: dict) -> dict:
    kw = dict(sets.get(method, {}))
    if method in lrs or "*" in lrs:
        kw["lr"] = lrs.get(method, lrs.get("*"))
    if method == "retrain":
        return kw
    if args.steps is not None:
        if args.steps <= 0:
            raise ValueError("--steps must be positive")
        kw["steps"] = args.steps
    if args.max_grad_norm != "default":
        kw["max_grad_norm"] = _parse_value(args.max_grad_norm)
    if method in ORTHOGRAD_METHODS:
        if args.alpha is not None:
            kw["alpha"] = args.alpha
        if args.granularity is not None:
            kw["granularity"] = args.granularity
        kw["backend"] = args.backend
    return kw


def _tensor_idx(idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(idx, dtype=np.int64))


def _config_hash(args) -> str:
    items = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "no_progress")}
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()[:8]


def _check_options(args) -> dict:
    """Parse and validate every option before any data is loaded or model trained."""
    single = args.command == "unlearn"
    opts = {
        "methods": [check_method(args.method)] if single else _parse_methods(args.methods),
        "seeds": [args.seed] if single else list(range(args.seeds)),
        "sizes": _parse_sizes(args.retain_size),
        "lrs": _per_method(args.lr, "lr"),
        "sets": _parse_sets(args.set),
    }
    if not opts["seeds"]:
        raise ValueError("--seeds must be at least 1")
    for n in ("retain_batch", "forget_batch"):
        if getattr(args, n) <= 0:
            raise ValueError(f"--{n.replace('_', '-')} must be positive")
    if str(args.eval_every) != "auto" and not (str(args.eval_every).isdigit() and int(args.eval_every) > 0):
        raise ValueError(f"--eval-every must be a positive int or auto, got {args.eval_every!r}")
    ft = args.forget_target.strip().lower()
    if ft not in ("auto", "none"):
        try:
            ft = float(ft)
        except ValueError:
            raise ValueError(f"--forget-target must be a fraction, auto or none, got {args.forget_target!r}") from None
    opts["forget_target"] = ft
    base = {"steps", "lr", "max_grad_norm"}
    for m in opts["methods"]:
        if m != "retrain":
            bad = sorted(set(_method_kwargs(args, m, opts["sets"], opts["lrs"])) - set(method_options(m)) - base)
            if bad:
                raise ValueError(f"method {m!r} has no option(s) {bad}")
    return opts


def _references(args, ds, spec, splits, seeds, mcfg, tcfg, out: Path) -> dict:
    """Per seed: the original and retrain models (cached) and their metrics; saves D_f indices."""
    cache = False if args.no_cache else args.cache_dir
    progress = not args.no_progress
    all_idx = np.arange(len(ds.y_train))
    refs = {}
    for s in seeds:
        split = splits[s]
        orig = _training.get_trained("original", ds, all_idx, mcfg, tcfg, seed=s, cache=cache, progress=progress)
        om = _metrics.evaluate(orig.model, ds, split, seed=s)
        o_t = om["test_acc"]
        om.update(seconds=orig.seconds, uis=_metrics.uis(o_t, o_t, om["forget_acc"], spec.kind),
                  aus=_metrics.aus(o_t, o_t, om["forget_acc"], spec.kind))
        refs[s] = {"original": orig, "original_metrics": om}
        if not args.no_retrain:
            ret = _training.get_trained("retrain", ds, split.retain_idx, mcfg, tcfg, seed=s,
                                      cache=cache, progress=progress)
            rm = _metrics.evaluate(ret.model, ds, split, seed=s, original_test_acc=o_t)
            rm["seconds"] = ret.seconds
            refs[s].update(retrain=ret, retrain_metrics=rm)
        np.save(out / f"forget_idx_seed{s}.npy", split.forget_idx)
    retrain_rows = [refs[s]["retrain_metrics"] for s in seeds if "retrain_metrics" in refs[s]]
    if retrain_rows:
        mean = _metrics.mean_metrics(retrain_rows)
        floor = _metrics.retrain_noise_floor(retrain_rows)
        for i, s in enumerate(seeds):
            refs[s]["retrain_metrics"]["avg_gap"] = floor[i] if floor else float("nan")
            refs[s]["original_metrics"]["avg_gap"] = _metrics.avg_gap(refs[s]["original_metrics"], mean)
    return refs


def _curve_monitor(ds, split, seed: int):
    """monitor(model) -> {"test_acc"} on a fixed subset of the evaluated test samples."""
    test_idx = np.flatnonzero(split.test_mask)
    if len(test_idx) > CURVE_TEST_SAMPLES:
        test_idx = np.sort(np.random.default_rng(seed).choice(test_idx, CURVE_TEST_SAMPLES, replace=False))
    x, y = ds.x_test[_tensor_idx(test_idx)], ds.y_test[_tensor_idx(test_idx)]
    return lambda model: {"test_acc": _metrics.accuracy(model, x, y)}


def _unlearning_runs(args, opts, ds, spec, splits_by_size, refs):
    """Every (retain size, seed, method) run; returns (runs, the last unlearned model)."""
    from tqdm.auto import tqdm

    progress = not args.no_progress
    seeds, sizes = opts["seeds"], opts["sizes"]
    steppers = [m for m in opts["methods"] if m != "retrain"]
    retrain_rows = [refs[s]["retrain_metrics"] for s in seeds if "retrain_metrics" in refs[s]]
    retrain_mean = _metrics.mean_metrics(retrain_rows) if retrain_rows else None
    retrain_forget = float(np.mean([r["forget_acc"] for r in retrain_rows])) if retrain_rows else 0.0
    runs, last = [], None
    with tqdm(total=len(steppers) * len(seeds) * len(sizes), desc="unlearning runs", disable=not progress,
              unit="run") as bar:
        for size in sizes:
            for s in seeds:
                split = splits_by_size[size][s]
                o_t = refs[s]["original_metrics"]["test_acc"]
                ft = opts["forget_target"]
                if ft == "auto":  # class: the retrain level (0 without retrain); random: original test acc
                    ft = retrain_forget if spec.kind == "class" else o_t
                if args.eval_every == "auto":
                    every = 1 if len(split.forget_idx) <= AUTO_EVAL_FORGET else 5
                else:
                    every = int(args.eval_every)
                stop = StopRule(forget_target=None if ft == "none" else ft, max_val_drop=args.max_val_drop,
                                eval_every=every)
                fi, ri = _tensor_idx(split.forget_idx), _tensor_idx(split.retain_subset_idx)
                monitor = _curve_monitor(ds, split, s)
                for m in steppers:
                    bar.set_postfix(method=m, seed=s, retain=len(ri))
                    model = _training.clone(refs[s]["original"].model)
                    loaders = (
                        _splits.loader(ds.x_train[ri], ds.y_train[ri], min(args.retain_batch, len(ri)),
                                     shuffle=True, seed=s),
                        _splits.loader(ds.x_train[fi], ds.y_train[fi], args.forget_batch, shuffle=True, seed=s),
                        _splits.loader(ds.x_val, ds.y_val, 2048) if args.max_val_drop is not None else None,
                    )
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", RuntimeWarning)
                        res = run_unlearning(model, *loaders, method=m, stop=stop, seed=s, monitor=monitor,
                                             progress=progress, **_method_kwargs(args, m, opts["sets"], opts["lrs"]))
                    for w in caught:
                        tqdm.write(f"warning: {w.message}")
                    met = _metrics.evaluate(model, ds, split, seed=s, original_test_acc=o_t, attack_folds=None)
                    met.update(steps=res.steps, seconds=res.seconds)
                    if retrain_mean is not None:
                        met["avg_gap"] = _metrics.avg_gap(met, retrain_mean)
                    runs.append({
                        "method": m, "seed": s, "retain_size": len(ri), "metrics": met,
                        "stop_reason": res.stop_reason, "restored": res.restored,
                        "forget_target": res.forget_target, "history": res.history,
                    })
                    last = model
                    bar.update(1)
    return runs, last


def _summary_rows(refs, runs, seeds, methods, sizes) -> list[tuple[str, int | None, dict]]:
    """[(label, retain size or None, {metric: (mean, std)})]: retrain, original, then methods."""
    def agg(rows):
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
        return {k: _metrics.mean_std([r[k] for r in rows]) for k in keys}

    out = []
    if all("retrain_metrics" in refs[s] for s in seeds):
        out.append(("retrain", None, agg([refs[s]["retrain_metrics"] for s in seeds])))
    out.append(("original", None, agg([refs[s]["original_metrics"] for s in seeds])))
    for size in sizes:
        for m in methods:
            rows = [r["metrics"] for r in runs if r["method"] == m and r["retain_size"] == size]
            if rows:
                out.append((m, size, agg(rows)))
    return out


def _make_out(args) -> tuple[Path, list[Path]]:
    """Create the output folder before any work: (folder, the folders created). A path at
    an existing file, under a file, or where no folder can be made or written is a one-line
    ValueError."""
    out = Path(args.out) if args.out else Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{_config_hash(args)}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file of that name exists; give a folder")
    missing, p = [], out
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"--out {out}: {p} is a file, so no folder can be made under it")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        _remove_empty(created)
        raise ValueError(f"--out {out}: cannot create or write the folder there ({e.strerror or e})") from None
    return out, created


def _remove_empty(folders: list[Path]) -> None:
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:
            return


def run_experiment(args) -> dict:
    """Run ``unlearn``/``compare`` as parsed by :func:`build_parser`; returns the results dict."""
    t_start = time.perf_counter()
    args = _resolve_recipe(args)
    opts = _check_options(args)
    out, created = _make_out(args)
    try:
        return _experiment(args, opts, out, t_start)
    except BaseException:
        _remove_empty(created)  # a run that failed before writing anything leaves no empty folder
        raise


def _experiment(args, opts, out: Path, t_start: float) -> dict:
    seeds = opts["seeds"]
    ds = _datasets.load_dataset(args.data, root=args.data_root, train_subset=args.train_subset)
    spec = _splits.parse_forget(args.forget)
    mcfg, tcfg = _configs(args, ds)
    splits_by_size = {size: {s: _splits.make_split(ds, spec, retain_size=size, seed=s) for s in seeds}
                      for size in opts["sizes"]}
    refs = _references(args, ds, spec, splits_by_size[opts["sizes"][0]], seeds, mcfg, tcfg, out)
    runs, last_model = _unlearning_runs(args, opts, ds, spec, splits_by_size, refs)
    sizes = [len(splits_by_size[size][seeds[0]].retain_subset_idx) for size in opts["sizes"]]
    steppers = [m for m in opts["methods"] if m != "retrain"]
    rows = _summary_rows(refs, runs, seeds, steppers, sizes)
    results = {
        "command": args.command,
        "config": dict(vars(args)),
        "dataset": repr(ds), "forget": str(spec), "seeds": seeds,
        "model": asdict(mcfg), "train": asdict(tcfg),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "references": {
            str(s): {
                "original_metrics": refs[s]["original_metrics"],
                "retrain_metrics": refs[s].get("retrain_metrics"),
                "original_cache_key": refs[s]["original"].key,
                "retrain_cache_key": refs[s]["retrain"].key if "retrain" in refs[s] else None,
                "forget_idx_file": f"forget_idx_seed{s}.npy",
            } for s in seeds
        },
        "splits": {f"{size or 'all'}/{s}": sp.to_json() for size, by_seed in splits_by_size.items()
                   for s, sp in by_seed.items()},
        "runs": runs,
        "summary": [{"row": lab, "retain_size": sz, **{k: list(v) for k, v in st.items()}} for lab, sz, st in rows],
        "table": format_table(rows, show_size=len(sizes) > 1, with_std=len(seeds) > 1),
    }
    if not args.no_plot:
        from .plots import plot_compare

        first = sizes[0]
        curves = {m: [r["history"] for r in runs if r["method"] == m and r["retain_size"] == first] for m in steppers}
        bar_rows = {lab: st for lab, sz, st in rows if sz in (None, first)}
        sweep = {m: {sz: st for lab, sz, st in rows if lab == m} for m in steppers} if len(sizes) > 1 else None
        title = (f"{ds.name}: forget {spec}, {args.model}, seeds {seeds}, retain size {args.retain_size} "
                 f"(curves and bars: retain size {first})")
        results["plot"] = str(plot_compare(curves, bar_rows, out / "plot.png", title=title, sweep=sweep))
    if args.command == "unlearn" and last_model is not None:
        torch.save(last_model.state_dict(), out / "model.pt")
        results["model_path"] = str(out / "model.pt")
    results["total_seconds"] = time.perf_counter() - t_start
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    results["out"] = str(out)
    return results


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _fmt(mean: float, std: float, scale, with_std: bool = True) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if scale is None:  # steps, seconds
        if float(mean).is_integer() or abs(mean) >= 100:
            return f"{mean:.0f}"
        return f"{mean:.1f}" if abs(mean) >= 10 else f"{mean:.2f}"
    if scale == 100:
        return f"{100 * mean:.1f}±{100 * std:.1f}" if with_std else f"{100 * mean:.1f}"
    return f"{mean:.3f}±{std:.3f}" if with_std else f"{mean:.3f}"


def format_table(rows, show_size: bool = False, with_std: bool = True) -> str:
    """Plain-text table: one row per (label, retain size, {metric: (mean, std)});
    with_std=False (one seed) prints means only."""
    header = ["Method"] + (["|Dr|"] if show_size else []) + [h for _, h, _ in TABLE_COLUMNS]
    body = []
    for label, size, st in rows:
        cells = [label] + ([str(size) if size else "-"] if show_size else [])
        for key, _, scale in TABLE_COLUMNS:
            if key in ("steps",) and label in ("retrain", "original"):
                cells.append("-")
                continue
            if key == "seconds" and label == "original":
                cells.append("-")
                continue
            mean, std = st.get(key, (float("nan"), float("nan")))
            cells.append(_fmt(mean, std, scale, with_std))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "-" * len(line(header))
    return "\n".join([line(header), sep] + [line(r) for r in body])


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``orthograd-fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        res = run_experiment(args)
    except (ValueError, OSError) as e:  # FileNotFoundError too: one line, no traceback
        print(f"orthograd-fast: error: {e}", file=sys.stderr)
        return 2
    head = f"{res['dataset']}, forget {res['forget']}, seeds {res['seeds']}, retain size {args.retain_size}"
    print()
    print(head)
    print(res["table"])
    print(("mean ± std over seeds. " if len(res["seeds"]) > 1 else "one seed. ") + TABLE_NOTES)
    print(f"total time: {res['total_seconds']:.1f} s; results: {res['out']}/results.json")
    if "plot" in res:
        print(f"plot: {res['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
