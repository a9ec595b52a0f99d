"""Mutation testing of the core with cosmic-ray (``make mutate``; config: bench/mutation.toml).

For each module: a snapshot of one commit (``git archive``, so edits in the working tree
never interfere and the score belongs to a commit), the unmutated run of the module's
test files (must pass; it sets the per-mutant timeout), then cosmic-ray over the kept
operators, each mutant against those test files only. Prints and writes, per module,
killed / survived / timeout / incompetent counts and every survivor (line, operator,
diff) to bench/results/mutation/<commit>-<module>.json.

    python bench/mutate.py                                  # every module of the config
    python bench/mutate.py orthograd_fast/linalg.py --jobs 2
    python bench/mutate.py --list                           # the modules and their tests

A run can be stopped and started again: the session database in the work folder keeps
the finished mutants (the module file is restored from the commit before resuming).
Modules run in parallel with --jobs (one snapshot each).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import io
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "mutation.toml"
RESULTS = ROOT / "bench" / "results" / "mutation"
BIN = Path(sys.executable).parent


def _git(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=check, capture_output=True, **kw)


def _slug(module: str) -> str:
    return module.removeprefix("orthograd_fast/").removesuffix(".py").replace("/", ".")


def _snapshot(commit: str, dest: Path) -> None:
    """The commit's tree in dest, with orthograd_fast/kernels -> ../kernels so that the
    package imported from dest finds dest's kernels (an editable install of the main
    tree would otherwise map orthograd_fast.kernels to its own folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    data = _git("archive", "--format=tar", commit).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    link = dest / "orthograd_fast" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")


def _restore(commit: str, tree: Path, module: str) -> None:
    (tree / module).write_bytes(_git("show", f"{commit}:{module}").stdout)


def _env(tree: Path) -> dict:
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _excluded_operators(keep: list[str]) -> list[str]:
    names = subprocess.run([str(BIN / "cosmic-ray"), "operators"], check=True, capture_output=True, text=True).stdout
    pats = [re.compile(p) for p in keep]
    return [re.escape(n) + "$" for n in names.split() if not any(p.fullmatch(n) for p in pats)]


def _write_config(path: Path, module: str, command: str, timeout: float, excluded: list[str]) -> None:
    q = json.dumps  # TOML basic strings are JSON strings
    lines = [
        "[cosmic-ray]",
        f"module-path = {q(module)}",
        f"timeout = {timeout:.1f}",
        "excluded-modules = []",
        f"test-command = {q(command)}",
        "",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "",
        "[cosmic-ray.filters.operators-filter]",
        "exclude-operators = [" + ", ".join(q(e) for e in excluded) + "]",
        "",
    ]
    path.write_text("\n".join(lines))


def _sample(db: Path, n: int, seed: int) -> None:
    """Keep a random n of the pending mutants (seeded), mark the rest skipped ("not
    sampled"): an estimate of a module's score where the full run takes too long."""
    import random

    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(db), WorkDB.Mode.open) as wdb:
        pending = sorted(item.job_id for item in wdb.pending_work_items)
        keep = set(random.Random(seed).sample(pending, min(n, len(pending))))
        for job in pending:
            if job not in keep:
                wdb.set_result(job, WorkResult(output=UNSAMPLED, worker_outcome=WorkerOutcome.SKIPPED))


UNSAMPLED = "not sampled"
NOT_RERUN = "not a survivor of the earlier run"


def _only(db: Path, keys: set[tuple[str, int]]) -> None:
    """Keep the pending mutants whose (operator, occurrence) is in keys, mark the rest
    skipped (NOT_RERUN): the survivors of an earlier run of the same module file."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(db), WorkDB.Mode.open) as wdb:
        for item in list(wdb.pending_work_items):
            m = item.mutations[0]
            if (m.operator_name, int(m.occurrence)) not in keys:
                wdb.set_result(item.job_id, WorkResult(output=NOT_RERUN, worker_outcome=WorkerOutcome.SKIPPED))


def _earlier_survivors(module: str, commit: str, earlier: str) -> tuple[set, dict]:
    """(operator, occurrence) of the survivors recorded for ``module`` at ``earlier``, and
    that run's summary; refuses when the module file differs between the two commits."""
    if _git("diff", "--quiet", earlier, commit, "--", module, check=False).returncode != 0:
        raise RuntimeError(f"{module} differs between {earlier[:12]} and {commit[:12]}: run it in full")
    path = RESULTS / f"{earlier[:7]}-{_slug(module)}.json"
    prev = json.loads(path.read_text())
    return {(sv["operator"], sv["occurrence"]) for sv in prev["survivors"]}, prev


def run_module(module: str, tests: list[str], commit: str, work: Path, run_cfg: dict, excluded: list[str],
               sample: int | None = None, seed: int = 0, survivors_of: str | None = None) -> dict:
    """Mutation-test one module at one commit; returns the summary (also written to
    bench/results/mutation/)."""
    slug = _slug(module)
    keys = prev = None
    if survivors_of is not None:
        keys, prev = _earlier_survivors(module, commit, survivors_of)
        slug += f".survivors-of-{survivors_of[:7]}"
    tree = work / slug / "tree"
    db = work / slug / "session.sqlite"
    cfg = work / slug / "cosmic-ray.toml"
    log = work / slug / "log.txt"
    if not (tree / module).exists():
        _snapshot(commit, tree)
    else:
        _restore(commit, tree, module)  # a stopped run may have left a mutant in place
    missing = [t for t in tests if not (tree / t.split("::")[0]).exists()]
    if missing:
        print(f"{module}: not in {commit[:12]}, skipped: {missing}", flush=True)
        tests = [t for t in tests if t not in missing]
    env = _env(tree)
    command = shlex.join([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests])
    t0 = time.perf_counter()
    base = subprocess.run(shlex.split(command), cwd=tree, env=env, capture_output=True, text=True)
    baseline_s = time.perf_counter() - t0
    if base.returncode != 0:
        raise RuntimeError(f"{module}: the unmutated tests fail at {commit}:\n{base.stdout[-3000:]}")
    timeout = max(run_cfg["min_timeout"], run_cfg["timeout_factor"] * baseline_s)
    _write_config(cfg, module, command, timeout, excluded)
    cr = str(BIN / "cosmic-ray")
    with open(log, "a") as lf:
        if not db.exists():
            subprocess.run([cr, "init", str(cfg), str(db)], cwd=tree, env=env, check=True, stdout=lf, stderr=lf)
            subprocess.run([str(BIN / "cr-filter-operators"), str(db), str(cfg)], cwd=tree, env=env, check=True,
                           stdout=lf, stderr=lf)
            if keys is not None:
                _only(db, keys)
            if sample is not None:
                _sample(db, sample, seed)
        t1 = time.perf_counter()
        subprocess.run([cr, "exec", str(cfg), str(db)], cwd=tree, env=env, check=True, stdout=lf, stderr=lf)
        exec_s = time.perf_counter() - t1
    _restore(commit, tree, module)
    dump = subprocess.run([cr, "dump", str(db)], cwd=tree, env=env, check=True, capture_output=True, text=True).stdout
    summary = _summarise(module, tests, commit, dump, baseline_s, timeout, exec_s)
    if prev is not None:  # the earlier run's kills stand (same module file), its survivors re-run here
        summary["rerun_of"] = prev["commit"]
        for k in ("killed", "timeout"):
            summary[k] += prev[k]
        summary["exec_s"] += prev["exec_s"]
        done = summary["killed"] + summary["timeout"] + summary["survived"]
        summary["score"] = round((summary["killed"] + summary["timeout"]) / done, 4) if done else None
        summary["mutants"] = prev["mutants"]
        summary["not_rerun"] = 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{commit[:7]}-{_slug(module)}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _summarise(module, tests, commit, dump: str, baseline_s, timeout, exec_s) -> dict:
    counts = {"killed": 0, "survived": 0, "timeout": 0, "incompetent": 0, "pending": 0, "not_sampled": 0}
    survivors = []
    for line in dump.splitlines():
        item, result = json.loads(line)
        if result is None:
            counts["pending"] += 1
            continue
        if result["worker_outcome"] == "skipped":
            if result["output"] == UNSAMPLED:
                counts["not_sampled"] += 1
            continue  # else a filtered operator, or not re-run (--survivors-of)
        outcome = result["test_outcome"]
        if result["worker_outcome"] != "normal" or outcome == "incompetent":
            counts["incompetent"] += 1
        elif outcome == "killed":
            counts["timeout" if result["output"] == "timeout" else "killed"] += 1
        else:
            counts["survived"] += 1
            m = item["mutations"][0]
            diff = result.get("diff") or ""
            survivors.append({
                "line": m["start_pos"][0],
                "operator": m["operator_name"],
                "occurrence": m["occurrence"],
                "change": _change(diff),
                "diff": diff,
            })
    done = counts["killed"] + counts["survived"] + counts["timeout"]
    return {
        "module": module,
        "tests": tests,
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tool": "cosmic-ray " + _version(),
        "mutants": done + counts["incompetent"] + counts["pending"] + counts["not_sampled"],
        **counts,
        "score": round((counts["killed"] + counts["timeout"]) / done, 4) if done else None,
        "baseline_s": round(baseline_s, 1),
        "timeout_s": round(timeout, 1),
        "exec_s": round(exec_s, 1),
        "survivors": sorted(survivors, key=lambda s: (s["line"], s["operator"], s["occurrence"])),
    }


def _change(diff: str) -> str:
    """'old -> new' from a one-line mutation's unified diff."""
    lines = diff.splitlines()
    minus = [x[1:].strip() for x in lines if x.startswith("-") and not x.startswith("---")]
    plus = [x[1:].strip() for x in lines if x.startswith("+") and not x.startswith("+++")]
    return f"{' / '.join(minus)} -> {' / '.join(plus)}"


def _version() -> str:
    out = subprocess.run([str(BIN / "cosmic-ray"), "--version"], capture_output=True, text=True).stdout
    return out.strip().split()[-1] if out.strip() else "?"


def table(commit: str) -> str:
    """Markdown table of the results JSONs of one commit (bench/RESULTS.md)."""
    rows = ["| module | tests | mutants run | killed | timeout | survived | score | time (min) | note |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob(f"{commit[:7]}-*.json")):
        s = json.loads(path.read_text())
        tests = ", ".join(sorted({t.split("::")[0].removeprefix("tests/") for t in s["tests"]}))
        run = s["killed"] + s["timeout"] + s["survived"]
        note = f"sample of {run} of {run + s['not_sampled']}" if s.get("not_sampled") else "all"
        if s.get("rerun_of"):
            note += f" (survivors of {s['rerun_of'][:7]} re-run here, its kills kept: same file)"
        if s["pending"]:
            note += f", {s['pending']} not finished"
        rows.append(f"| {s['module']} | {tests} | {run} | {s['killed']} | {s['timeout']} | {s['survived']} | "
                    f"{s['score']:.0%} | {s['exec_s'] / 60:.0f} | {note} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    conf = tomllib.loads(CONFIG.read_text())
    modules = conf["modules"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="module paths (default: every module of bench/mutation.toml)")
    ap.add_argument("--rev", default="HEAD", help="the commit to test (default HEAD; uncommitted edits are not seen)")
    ap.add_argument("--work", default="/tmp/orthograd-mutate", help="work folder (snapshots, sessions)")
    ap.add_argument("--jobs", type=int, default=1, help="modules run in parallel")
    ap.add_argument("--sample", type=int, default=None,
                    help="run a random N of each module's mutants (an estimate; the rest are 'not_sampled')")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample")
    ap.add_argument("--survivors-of", default=None, metavar="REV",
                    help="re-run only the survivors recorded at REV (same module file); its kills stand")
    ap.add_argument("--list", action="store_true", help="print the modules and their test files")
    ap.add_argument("--table", action="store_true", help="print the Markdown score table of --rev's results")
    args = ap.parse_args(argv)
    if args.list:
        for m, spec in modules.items():
            print(f"{m}: {' '.join(spec['tests'])}")
        return 0
    if args.table:
        print(table(_git("rev-parse", args.rev, text=True).stdout.strip()))
        return 0
    chosen = [m for arg in args.modules for m in arg.replace(",", " ").split()] or list(modules)
    unknown = [m for m in chosen if m not in modules]
    if unknown:
        raise SystemExit(f"not in bench/mutation.toml: {unknown} (known: {', '.join(modules)})")
    commit = _git("rev-parse", args.rev, text=True).stdout.strip()
    work = Path(args.work) / commit[:12]
    excluded = _excluded_operators(conf["run"]["operators"])
    print(f"mutation testing {len(chosen)} module(s) at {commit[:12]} in {work}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_module, m, modules[m]["tests"], commit, work, conf["run"], excluded,
                               args.sample, args.seed,
                               args.survivors_of and _git("rev-parse", args.survivors_of, text=True).stdout.strip()): m
                   for m in chosen}
        failed = False
        for fut in concurrent.futures.as_completed(futures):
            m = futures[fut]
            try:
                s = fut.result()
            except Exception as e:  # report the others' results all the same
                failed = True
                print(f"{m}: FAILED: {e}", flush=True)
                continue
            sampled = f" (a sample: {s['not_sampled']} not run)" if s["not_sampled"] else ""
            print(f"{m}: {s['killed']} killed, {s['survived']} survived, {s['timeout']} timeout, "
                  f"{s['incompetent']} incompetent{sampled}; score {s['score']}; {s['exec_s'] / 60:.1f} min",
                  flush=True)
            for sv in s["survivors"]:
                print(f"  survived line {sv['line']}: {sv['operator']} #{sv['occurrence']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
