"""Same-process A/B of OrthoGrad.step at two trees (issue 11): both versions of orthograd_fast
loaded in one process (the first tree's modules are set aside before the second is
imported), timed interleaved with a plain step and the authors' path (reference.
authors_orthograd_direction + .grad = -direction + optimizer.step()), best-of-reps.

    python bench/ab_step_fixed_costs.py OLD_TREE NEW_TREE --workload transformer --B 8,16,32,128 --threads 1 --reps 15
"""
import argparse, sys, time, importlib, warnings
warnings.filterwarnings("ignore")
ap = argparse.ArgumentParser()
ap.add_argument("old"); ap.add_argument("new")
ap.add_argument("--workload", default="transformer"); ap.add_argument("--B", default="8,16,32,128")
ap.add_argument("--threads", type=int, default=1); ap.add_argument("--reps", type=int, default=15)
ap.add_argument("--gran", default="per_tensor"); ap.add_argument("--no-authors", action="store_true")
a = ap.parse_args()
import torch
torch.set_num_threads(a.threads)
import torch.nn.functional as F

def load(tree):
    for k in [k for k in sys.modules if k == "orthograd_fast" or k.startswith("orthograd_fast.") or k == "workloads"]:
        del sys.modules[k]
    sys.path[:0] = [tree, tree + "/bench"]
    og = importlib.import_module("orthograd_fast.orthograd")
    ref = importlib.import_module("orthograd_fast.reference")
    wl = importlib.import_module("workloads")
    del sys.path[:2]
    return og, ref, wl

old, ref, wl = load(a.old)
new, _, _ = load(a.new)
loss = lambda o, y: F.cross_entropy(o, y, reduction="none")
print(f"threads {a.threads}, workload {a.workload}, granularity {a.gran}, reps {a.reps}")
print("| B | plain (ms) | authors (ms) | before (ms) | after (ms) | before / plain | after / plain | after / authors |")
print("|---|---|---|---|---|---|---|---|")
for B in [int(b) for b in a.B.split(",")]:
    w = wl.WORKLOADS[a.workload]
    f, r = w.batches(B, 0)
    steps = {}
    for name, mod in (("old", old), ("new", new)):
        m = w.model(0); opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        o = mod.OrthoGrad(m, opt, loss_fn=loss, granularity=a.gran, alpha=0.0)
        steps[name] = (lambda o=o: o.step(f, r))
    mp = w.model(0); optp = torch.optim.SGD(mp.parameters(), lr=1e-3)
    x = torch.cat([r[0], f[0]]); y = torch.cat([r[1], f[1]])
    def plain():
        optp.zero_grad(set_to_none=True)
        l = loss(mp(x), y); (l[:B].sum() + l[B:].mean()).backward(); optp.step()
    steps["plain"] = plain
    if not a.no_authors:
        ma = w.model(0); opta = torch.optim.SGD(ma.parameters(), lr=1e-3)
        named = [(n, p) for n, p in ma.named_parameters() if p.requires_grad]
        def authors():
            opta.zero_grad(set_to_none=True)
            d = ref.authors_orthograd_direction(ma, F.cross_entropy, f[0], f[1], r[0], r[1])
            for n, p in named:
                p.grad = d[n].neg()
            opta.step()
        steps["authors"] = authors
    best = {k: float("inf") for k in steps}
    for fn in steps.values():
        fn(); fn()
    for _ in range(a.reps):
        for k, fn in steps.items():
            t = time.perf_counter(); fn(); best[k] = min(best[k], time.perf_counter() - t)
    b = {k: v * 1e3 for k, v in best.items()}
    au = b.get("authors", float("nan"))
    print(f"| {B} | {b['plain']:.1f} | {au:.1f} | {b['old']:.1f} | {b['new']:.1f} | {b['old']/b['plain']:.2f} | "
          f"{b['new']/b['plain']:.2f} | {b['new']/au:.2f} |", flush=True)
