"""The unlearning study (bench/unlearning_study.py) in its smoke size: every number on the
page must follow from the runs it records, by the definitions of the metrics module."""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import unlearning_study as U  # noqa: E402

from orthograd_fast.unlearning import metrics as M  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = replace(U.SMOKE, cache=str(tmp / "cache"))
    results = U.run_study(cfg, jobs=1, log=lambda m: None)
    paths = U.write_outputs(results, out_dir=tmp / "results", page=tmp / "UNLEARNING.md", log=lambda m: None)
    return cfg, results, paths


def test_every_run_is_there_and_obeys_the_stop_rule(study):
    cfg, res, _ = study
    keys = sorted((r["kind"], r["size"], r["seed"], r["variant"]) for r in res["runs"])
    assert keys == sorted((k, n, s, v) for k in cfg.kinds for n in cfg.sizes for s in range(cfg.seeds)
                          for v in cfg.variants)
    o_t = {(r["kind"], r["seed"]): r["original"]["test_acc"] for r in res["references"]}
    for r in res["runs"]:
        assert 0 <= r["steps"] <= cfg.steps and r["lr"] == res["lrs"][r["kind"]][r["variant"]]
        target = 0.0 if r["kind"] == "class" else o_t[r["kind"], r["seed"]]
        if r["stopped_by"] in ("target", "already_at_target"):
            assert r["forget_acc"] <= target + 1e-12
        else:
            assert r["stopped_by"] == "budget" and r["steps"] == cfg.steps
        # UIS as the paper defines it, from the run's own accuracies
        want = M.uis(o_t[r["kind"], r["seed"]], r["test_acc"], r["forget_acc"], r["kind"])
        assert r["uis"] == pytest.approx(want, abs=1e-12)


def test_tuning_picks_the_lowest_validation_uis(study):
    cfg, res, _ = study
    assert len(res["tuning"]) == len(cfg.kinds) * len(cfg.variants) * len(cfg.lr_grid) * len(cfg.tune_seeds)
    for kind in cfg.kinds:
        for v in cfg.variants:
            score = {lr: np.mean([t["val_uis"] for t in res["tuning"]
                                  if (t["kind"], t["variant"], t["lr"]) == (kind, v, lr)]) for lr in cfg.lr_grid}
            best = min(score.values())
            assert score[res["lrs"][kind][v]] == best
            assert res["lrs"][kind][v] == min(lr for lr in cfg.lr_grid if score[lr] == best)
    for t in res["tuning"]:  # val-UIS from the run's own val accuracy
        assert t["val_uis"] == pytest.approx(M.uis(t["original_val_acc"], t["val_acc"], t["forget_acc"], t["kind"]))
        assert t["seed"] in cfg.tune_seeds


def test_summary_follows_from_the_runs(study):
    cfg, res, _ = study
    summ = res["summary"]
    for kind in cfg.kinds:
        refs = sorted((r for r in res["references"] if r["kind"] == kind), key=lambda r: r["seed"])
        retrain = {k: np.mean([r["retrain"][k] for r in refs]) for k in M.GAP_KEYS}
        for n in cfg.sizes:
            rows = {v: sorted((r for r in res["runs"] if (r["kind"], r["size"], r["variant"]) == (kind, n, v)),
                              key=lambda r: r["seed"]) for v in cfg.variants}
            for v, rr in rows.items():
                for r in rr:  # Avg. Gap to the mean retrain oracle (SalUn)
                    assert r["avg_gap"] == pytest.approx(np.mean([abs(r[k] - retrain[k]) for k in M.GAP_KEYS]))
                for key in ("uis", "avg_gap", "test_acc"):
                    x = np.array([r[key] for r in rr])
                    c = summ["cells"][kind][str(n)][v][key]
                    assert c["mean"] == pytest.approx(x.mean())
                    if x.std() > 0:
                        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
                        assert (c["lo"], c["hi"]) == pytest.approx((lo, hi))
                if v == U.REFERENCE:
                    continue
                for key in U.VERDICT_METRICS:
                    d = np.array([a[key] - b[key] for a, b in zip(rows[U.REFERENCE], rr)])
                    p = summ["paired"][kind][str(n)][v][key]
                    assert p["mean"] == pytest.approx(d.mean(), abs=1e-12)
                    better = {"uis": "low", "avg_gap": "low", "test_acc": "high"}[key]
                    assert p["verdict"] == U.verdict(p["lo"], p["hi"], better)


def test_verdict_rule():
    assert U.verdict(-0.3, -0.1, "low") == "wins" and U.verdict(-0.3, -0.1, "high") == "loses"
    assert U.verdict(0.1, 0.3, "low") == "loses" and U.verdict(0.1, 0.3, "high") == "wins"
    assert U.verdict(-0.1, 0.1, "low") == "ties" and U.verdict(0.0, 0.0, "low") == "ties"
    assert U.verdict(float("nan"), float("nan"), "low") == "ties"


def test_page_plots_and_rerender(study, tmp_path):
    cfg, res, paths = study
    page = paths["page"].read_text()
    for p in ("json", "sweep", "ablation"):
        assert paths[p].is_file() and paths[p].name in page
    assert paths["sweep"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{res['timings']['total']['wall'] / 60:.1f} min wall" in page and res["environment"]["commit"] in page
    # the W/T/L counts on the page are those of the paired verdicts
    for kind in cfg.kinds:
        vs = [res["summary"]["paired"][kind][str(n)]["neggrad"]["uis"]["verdict"] for n in cfg.sizes]
        counts = f"{vs.count('wins')}W {vs.count('ties')}T {vs.count('loses')}L"
        row = next(line for line in page.splitlines() if line.startswith(f"| {kind} | UIS |"))
        assert row.split(" | ")[2] == counts
    # the page is a function of the JSON alone
    again = json.loads(paths["json"].read_text())
    assert U.render(again, {k: f"results/{paths[k].name}" for k in ("json", "sweep", "ablation")}) == page
    out = ["--out-dir", str(tmp_path / "results"), "--page", str(tmp_path / "UNLEARNING.md")]
    assert U.main(["--render", str(paths["json"]), *out]) == 0
    assert (tmp_path / "UNLEARNING.md").read_text() == page


def test_config_checks():
    with pytest.raises(ValueError, match="unknown variant"):
        U.StudyConfig(variants=("orthograd", "sgd"))
    with pytest.raises(ValueError, match="must include 'orthograd'"):
        U.StudyConfig(variants=("neggrad",))
    with pytest.raises(ValueError, match="at least 2"):
        U.StudyConfig(seeds=1)
    with pytest.raises(ValueError, match="overlap the evaluated seeds"):
        U.StudyConfig(seeds=5, tune_seeds=(3,))
    with pytest.raises(ValueError, match="unknown recipe"):
        U.StudyConfig(recipe="imagenet")
    assert not math.isnan(U.SMOKE.steps)


def test_degradation_follows_from_the_runs(study):
    """The paper's claim as the page tests it: per seed, metric at the smallest retain size
    minus at the largest (signed so that positive = worse), paired against OrthoGrad's."""
    cfg, res, paths = study
    small, large = min(cfg.sizes), max(cfg.sizes)
    deg = res["summary"]["degradation"]
    for kind in cfg.kinds:
        for metric, sign in (("uis", 1.0), ("test_acc", -1.0)):
            per = {}
            for v in cfg.variants:
                at = {(r["size"], r["seed"]): r[metric] for r in res["runs"] if r["kind"] == kind and r["variant"] == v}
                per[v] = np.array([sign * (at[small, s] - at[large, s]) for s in range(cfg.seeds)])
                assert deg[kind][metric]["per_variant"][v]["mean"] == pytest.approx(per[v].mean(), abs=1e-12)
            for v, cell in deg[kind][metric]["paired"].items():
                d = per[U.REFERENCE] - per[v]
                assert cell["mean"] == pytest.approx(d.mean(), abs=1e-12)
                if d.std(ddof=1) > 0:
                    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
                    assert (cell["lo"], cell["hi"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-9)
                    assert cell["verdict"] == U.verdict(cell["lo"], cell["hi"], "low")
    page = Path(paths["page"]).read_text()
    assert "In plain words" in page and "The paper's claim" in page


def test_claim_leaves_out_baselines_that_cannot_degrade(study):
    """neggrad uses no retain data: its runs are the same at every retain size, so a paired
    degradation test against it only asks whether OrthoGrad's own degradation is 0. The
    claim must leave it out (and say so); once its runs differ it is compared again."""
    import copy

    cfg, res, _ = study
    small = min(cfg.sizes)
    for kind in cfg.kinds:
        assert U._same_at_both_ends(res, kind, "neggrad")
    lines = U.plain_words(res)
    for line in lines:
        claim = line.split("As the retain set shrinks", 1)[1]
        assert "neggrad left out of this comparison" in claim
        assert "than neggrad" not in claim and "neggrad's" not in claim
    moved = copy.deepcopy(res)
    run = next(r for r in moved["runs"] if r["variant"] == "neggrad" and r["kind"] == cfg.kinds[0]
               and r["size"] == small and r["seed"] == 0)
    run["test_acc"] -= 0.25
    assert not U._same_at_both_ends(moved, cfg.kinds[0], "neggrad")
    assert "neggrad left out" not in U.plain_words(moved)[0]


def test_claim_names_baselines_that_ran_out_of_budget(study):
    """A baseline that stopped on the budget forgot less than the target: the claim says how
    many of its runs did, as it does for OrthoGrad."""
    import copy

    cfg, res, _ = study
    kind = cfg.kinds[0]
    marked = copy.deepcopy(res)
    for r in marked["runs"]:
        if r["variant"] == "neggrad":
            r["stopped_by"] = "budget" if (r["kind"] == kind and r["seed"] == 0) else "target"
    n = sum(1 for r in marked["runs"] if r["variant"] == "neggrad" and r["kind"] == kind)
    lines = U.plain_words(marked)
    assert f"neggrad {len(cfg.sizes)}/{n}" in lines[0]
    assert all("baselines ran out of the budget" not in line for line in lines[1:])
