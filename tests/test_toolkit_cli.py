"""The orthograd-fast CLI end to end on tiny configs, and its error messages."""
import json
import subprocess
import sys

import numpy as np
import pytest

from orthograd_fast.cli import main
from orthograd_fast.unlearning import datasets, splits

TINY = ["--train-epochs", "4", "--steps", "8", "--no-progress"]


def _run(capsys, tmp_path, *argv):
    code = main([*argv, "--cache-dir", str(tmp_path / "cache"), *TINY])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_end_to_end(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = _run(capsys, tmp_path, "compare", "--data", "digits", "--forget", "class:3",
                          "--methods", "orthograd,neggrad_plus,retrain", "--seeds", "2",
                          "--retain-size", "8,16", "--out", str(out_dir))
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Method"))
    rows = [line.split()[0] for line in lines[header + 2 : header + 8]]
    assert rows == ["retrain", "original", "orthograd", "neggrad_plus", "orthograd", "neggrad_plus"]
    assert "|Dr|" in lines[header] and f"plot: {out_dir}/plot.png" in out
    res = json.loads((out_dir / "results.json").read_text())
    assert res["seeds"] == [0, 1] and len(res["runs"]) == 2 * 2 * 2
    assert {r["retain_size"] for r in res["runs"]} == {8, 16}
    for r in res["runs"]:
        assert r["metrics"]["forget_acc"] < 1.0 and r["history"][0]["step"] == 0 and "test_acc" in r["history"][-1]
        assert 1 <= r["metrics"]["steps"] <= 8
    ds = datasets.load_digits()
    np.testing.assert_array_equal(np.load(out_dir / "forget_idx_seed1.npy"),
                                  splits.make_split(ds, "class:3", seed=1).forget_idx)
    assert (out_dir / "plot.png").stat().st_size > 10_000
    # cached models are reused on a second run
    code, _, _ = _run(capsys, tmp_path, "compare", "--methods", "neggrad", "--seeds", "1",
                      "--out", str(tmp_path / "r2"))
    assert code == 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4  # original + retrain, 2 seeds


def test_unlearn_subcommand_random_forgetting(capsys, tmp_path):
    out_dir = tmp_path / "one"
    code, out, err = _run(capsys, tmp_path, "unlearn", "--forget", "random:60", "--method", "orthograd",
                          "--granularity", "per_tensor", "--alpha", "0.1", "--retain-size", "32",
                          "--out", str(out_dir), "--no-plot")
    assert code == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    assert (out_dir / "model.pt").is_file() and not (out_dir / "plot.png").exists()
    run = res["runs"][0]
    # random forgetting: the target is the original model's test accuracy (the paper's rule)
    assert run["forget_target"] == pytest.approx(res["references"]["0"]["original_metrics"]["test_acc"])
    assert "orthograd" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--methods", "orthograd,sgd"], "unknown method 'sgd'"),
        (["unlearn", "--method", "magic"], "unknown method 'magic'"),
        (["unlearn", "--forget", "class:12"], "not in the digits training set"),
        (["unlearn", "--forget", "random:0"], "empty"),
        (["unlearn", "--retain-size", "5000"], "larger than the retain data available"),
        (["compare", "--set", "neggrad.gamma=2"], "no option 'gamma'"),
        (["unlearn", "--data", "fashion-mnist", "--data-root", "/nonexistent"], "make data"),
        (["unlearn", "--data", "mnist"], "unknown dataset"),
        (["compare", "--recipe", "digits-mlp", "--model", "cnn"], "sets --model mlp, but --model cnn was given"),
        (["compare", "--recipe", "fashion-mnist-cnn", "--data", "digits"], "sets --data fashion-mnist"),
        (["compare", "--recipe", "digits-mlp", "--hidden", "64"], "drop --hidden"),
    ],
)
def test_cli_errors(capsys, tmp_path, argv, message):
    code, out, err = _run(capsys, tmp_path, *argv, "--out", str(tmp_path / "bad"))
    assert code == 2 and message in err and "Traceback" not in err


def test_recipe_preset(capsys, tmp_path):
    """--recipe takes the recipe's model and training config (--train-epochs still overrides);
    the reference rows carry the attack's own cross-validated balanced accuracy."""
    from orthograd_fast.unlearning import training

    out_dir = tmp_path / "rec"
    code, out, err = _run(capsys, tmp_path, "compare", "--recipe", "digits-mlp", "--data", "digits",
                          "--methods", "neggrad", "--seeds", "1", "--out", str(out_dir), "--no-plot")
    assert code == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    r = training.recipe("digits-mlp")
    assert res["model"]["hidden"] == list(r.model.hidden) and res["train"]["epochs"] == 4  # TINY's --train-epochs
    assert res["train"]["weight_decay"] == r.train.weight_decay and res["config"]["recipe"] == "digits-mlp"
    refs = res["references"]["0"]
    assert 0 <= refs["original_metrics"]["mia_bacc"] <= 1 and "mia_bacc" not in res["runs"][0]["metrics"]
    header = next(line for line in out.splitlines() if line.startswith("Method"))
    assert "AtkBAcc%" in header


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "orthograd_fast.cli", "compare", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--retain-size" in proc.stdout and "sweep" in proc.stdout


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed (make data)")
def test_fashion_mnist_cli(capsys, tmp_path):
    code, out, err = _run(capsys, tmp_path, "unlearn", "--data", "fashion-mnist", "--train-subset", "2000",
                          "--forget", "class:0", "--method", "orthograd", "--out", str(tmp_path / "fm"))
    assert code == 0, err
    assert "fashion-mnist[2000]" in out and (tmp_path / "fm" / "model.pt").is_file()


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_out_that_cannot_be_a_folder_is_one_line_before_any_work(capsys, tmp_path, where):
    (tmp_path / "taken").write_text("x")
    out = {"file": tmp_path / "taken", "under_file": tmp_path / "taken" / "run",
           "unwritable": "/proc/orthograd-fast-test/run"}[where]
    message = {"file": "a file of that name exists", "under_file": "is a file, so no folder can be made",
               "unwritable": "cannot create or write the folder"}[where]
    code, out_text, err = _run(capsys, tmp_path, "unlearn", "--out", str(out))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # no model was trained or loaded
    assert (tmp_path / "taken").read_text() == "x"


def test_failed_run_leaves_no_empty_out_folder(capsys, tmp_path):
    out = tmp_path / "new" / "run"
    code, _, err = _run(capsys, tmp_path, "unlearn", "--data", "fashion-mnist", "--data-root", str(tmp_path),
                        "--out", str(out))
    assert code == 2 and "make data" in err and not (tmp_path / "new").exists()
