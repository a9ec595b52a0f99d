"""`make mutate`'s configuration (bench/mutation.toml) and its result parsing (bench/mutate.py)
stay in step with the tree: every module and test file it names exists (a core module it
does not list is reported as a warning), and a cosmic-ray session dump is counted as the
tool records it."""
import importlib.util
import json
import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_mutate():
    spec = importlib.util.spec_from_file_location("bench_mutate", ROOT / "bench" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_names_existing_files_and_every_core_module():
    conf = tomllib.loads((ROOT / "bench" / "mutation.toml").read_text())
    for module, spec in conf["modules"].items():
        assert (ROOT / module).is_file(), module
        assert spec["tests"], module
        for t in spec["tests"]:
            path, _, name = t.partition("::")
            assert (ROOT / path).is_file(), (module, t)
            if name:
                assert f"def {name}(" in (ROOT / path).read_text(), (module, t)
    core = ["orthograd_fast/projection.py", "orthograd_fast/linalg.py", "orthograd_fast/_torch_projection.py",
            "orthograd_fast/orthograd.py"]
    core += [str(p.relative_to(ROOT)) for p in (ROOT / "orthograd_fast" / "gram").rglob("*.py")
             if p.name != "__init__.py"]
    missing = sorted(set(core) - set(conf["modules"]))
    if missing:  # a new module is not an error, but `make mutate` skips it until it is listed
        warnings.warn(f"core modules without an entry in bench/mutation.toml (make mutate skips them): {missing}")


def test_summary_counts_a_session_dump():
    mutate = _load_mutate()

    def line(outcome, test_outcome, output="", diff=""):
        item = {"job_id": "x", "mutations": [{"module_path": "m.py", "operator_name": "core/AddNot",
                                              "occurrence": 0, "start_pos": [7, 4], "end_pos": [7, 9]}]}
        result = None if outcome is None else {"worker_outcome": outcome, "test_outcome": test_outcome,
                                               "output": output, "diff": diff}
        return json.dumps([item, result])

    diff = "--- a/m.py\n+++ b/m.py\n@@ -7 +7 @@\n-if x:\n+if not x:\n"
    dump = "\n".join([
        line("normal", "killed", "1 failed"),
        line("normal", "killed", "timeout"),
        line("normal", "survived", "1 passed", diff),
        line("normal", "incompetent"),
        line("skipped", None, "Filtered operator"),
        line("skipped", None, mutate.UNSAMPLED),
        line(None, None),
    ])
    s = mutate._summarise("m.py", ["t.py"], "abc", dump, 1.0, 30.0, 2.0)
    assert (s["killed"], s["timeout"], s["survived"], s["incompetent"], s["pending"]) == (1, 1, 1, 1, 1)
    assert s["not_sampled"] == 1 and s["mutants"] == 6 and s["score"] == round(2 / 3, 4)
    assert s["survivors"][0]["line"] == 7 and s["survivors"][0]["change"] == "if x: -> if not x:"
